"""Keys typed while a checkpoint is read act once its tabs are shown, in the order typed (they
were lost: nothing is bound on the loading screen); q, escape and ctrl+c leave at once, except
a q or an escape typed into a filter typed ahead. The real terminal: tests/test_tui_pty_flows."""

from __future__ import annotations

import threading

from test_tui_app import FIXTURES, SIZE, settle, text_of
from textual.widgets import Input, Static, TabbedContent

from zinspect.core.load import load_checkpoint
from zinspect.tui import app as app_module
from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens.main import Inspector
from zinspect.tui.widgets.param_table import ParamTable
from zinspect.tui.widgets.params_pane import ParamsPane

LLAMA = FIXTURES / "hf_llama_s2_w2_bf16"


def held_reading(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """load_checkpoint() waits in the load worker until `release` is set; `reading` says it has
    started (the app is on its loading screen)."""
    release, reading = threading.Event(), threading.Event()

    def held(path, tag=None, progress=None):
        reading.set()
        assert release.wait(30), "the test never released the reading"
        return load_checkpoint(path, tag, progress)

    monkeypatch.setattr(app_module, "load_checkpoint", held)
    return release, reading


async def until(pilot, done, what: str = "the app did not get there") -> None:
    for _ in range(600):
        if done():
            return
        await pilot.pause(0.05)
    raise AssertionError(what)


async def loading(app: ZinspectApp, pilot, reading: threading.Event) -> None:
    await until(pilot, reading.is_set)
    await pilot.pause()
    assert app.reading and not app.screen.query(Inspector) and app.main.query("#loading")


def active_tab(app: ZinspectApp) -> str:
    return app.main.query_one("#tabs", TabbedContent).active


async def test_keys_typed_while_reading_act_on_the_tabs_in_order(monkeypatch):
    release, reading = held_reading(monkeypatch)
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await loading(app, pilot, reading)
        await pilot.press("2", "slash", *"blocks.1 down")
        await pilot.pause(0.2)
        assert app.is_running and not app.screen.query(Inspector)  # still reading
        release.set()
        await settle(app, pilot)
        await until(pilot, lambda: app.browsing is not None and not app._ahead)
        await settle(app, pilot)
        pane = app.main.query_one(ParamsPane)
        assert active_tab(app) == "tab-params"
        assert pane.filter_text == "blocks.1 down"  # every key, in order
        assert app.screen.focused is app.main.query_one("#param-filter", Input)
        assert pane.query_one(ParamTable).names == ["encoder.blocks.1.mlp.down.weight",
                                                    "encoder.blocks.1.mlp.down.bias"]
        await pilot.press(*"x")  # the keys typed now go where they always went: the filter
        await pilot.pause()
        assert pane.filter_text == "blocks.1 downx"


async def test_q_typed_into_a_filter_typed_ahead_is_text_then_escape_clears_it(monkeypatch):
    release, reading = held_reading(monkeypatch)
    app = ZinspectApp(str(LLAMA))
    async with app.run_test(size=SIZE) as pilot:
        await loading(app, pilot, reading)
        await pilot.press("slash", *"q_proj", "enter", "4")  # q: a name's letter, not quit
        await pilot.pause(0.2)
        assert app.is_running
        release.set()
        await settle(app, pilot)
        await until(pilot, lambda: app.browsing is not None and not app._ahead)
        await settle(app, pilot)
        assert app.is_running
        pane = app.main.query_one(ParamsPane)
        assert pane.filter_text == "q_proj"
        assert pane.query_one(ParamTable).names == ["model.layers.0.self_attn.q_proj.weight",
                                                    "model.layers.1.self_attn.q_proj.weight"]
        assert active_tab(app) == "tab-findings"  # enter left the filter: 4 was a tab key


async def test_escape_typed_ahead_into_the_filter_clears_it(monkeypatch):
    release, reading = held_reading(monkeypatch)
    app = ZinspectApp(str(LLAMA))
    async with app.run_test(size=SIZE) as pilot:
        await loading(app, pilot, reading)
        await pilot.press("slash", *"q_proj", "escape")
        await pilot.pause(0.2)
        assert app.is_running  # the escape closes the filter typed ahead: not the app
        release.set()
        await settle(app, pilot)
        await until(pilot, lambda: app.browsing is not None and not app._ahead)
        await settle(app, pilot)
        pane = app.main.query_one(ParamsPane)
        assert app.is_running and active_tab(app) == "tab-params"
        assert pane.filter_text == "" and not pane.query_one("#param-filter", Input).display


async def test_q_escape_and_ctrl_c_leave_at_once_while_reading(monkeypatch):
    for keys in (["q"], ["escape"], ["2", "ctrl+c"], ["slash", *"blocks", "ctrl+c"]):
        release, reading = held_reading(monkeypatch)
        app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
        try:
            async with app.run_test(size=SIZE) as pilot:
                await loading(app, pilot, reading)
                await pilot.press(*keys)
                await until(pilot, lambda app=app: not app.is_running, f"{keys} did not quit")
            # it left while the reading was held, before any tabs: the key did not wait for
            # them (that the exit does not wait for the reading thread itself, the pilot cannot
            # tell: tests/test_tui_pty_typeahead.py checks it in a real terminal)
            assert app.reading and app.browsing is None
        finally:
            release.set()  # the left reading thread ends (reads the fixture, posts nothing)


async def test_escape_while_v_reads_again_goes_back_to_the_tabs_read_before(monkeypatch):
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        before = app.view
        await pilot.press("2")
        release, reading = held_reading(monkeypatch)
        await pilot.press("v")
        await loading(app, pilot, reading)
        assert "escape: back" in text_of(app.main.query_one("#loading-keys", Static))
        await pilot.press("escape")
        await until(pilot, lambda: app.browsing is not None)
        await settle(app, pilot)
        assert app.is_running and app.view is before and not app.reading
        assert active_tab(app) == "tab-params"  # the tab the user was on
        assert "reading again cancelled" in [n.message for n in app._notifications][-1]
        release.set()  # the cancelled reading ends; its tabs never replace these
        await pilot.pause(0.3)
        await settle(app, pilot)
        assert app.view is before


async def test_a_failed_reading_drops_the_keys_typed_ahead(monkeypatch, tmp_path):
    release, reading = held_reading(monkeypatch)
    app = ZinspectApp(str(tmp_path))  # no checkpoint there: the reading fails
    async with app.run_test(size=SIZE) as pilot:
        await loading(app, pilot, reading)
        await pilot.press("2", "slash", *"abc")
        release.set()
        await settle(app, pilot)
        await until(pilot, lambda: bool(app.main.query("#load-error")))
        await pilot.pause(0.2)
        assert not app._ahead and not app._replaying and not app.reading
        assert app.main.query("#load-error")  # still the error: no key acted on it
        await pilot.press("q")  # and the error screen's keys work as before
        await until(pilot, lambda: not app.is_running, "q did not quit")
