"""The tabs come as soon as the checkpoint is read; the load worker validates while they are on
screen. Until the findings are in, what shows them says "validating", the merge and the deep
check wait, and the user can browse and filter; when they come, the Findings, Ranks and Overview
fill in and the Parameters tab keeps what the user did there."""

from __future__ import annotations

import threading

from test_tui_app import FIXTURES, SIZE, damaged_copy, settle, text_of
from textual.widgets import DataTable, Static

from zinspect.core.layouts import zero3
from zinspect.core.validate import validate
from zinspect.tui import app as app_module
from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens.main import Inspector
from zinspect.tui.screens.merge import MergeScreen
from zinspect.tui.widgets.findings_pane import FindingTable
from zinspect.tui.widgets.param_table import ParamTable
from zinspect.tui.widgets.params_pane import ParamsPane
from zinspect.tui.widgets.ranks_pane import RankGrid


def held_validation(monkeypatch) -> threading.Event:
    """validate() waits in the load worker until the returned event is set."""
    release = threading.Event()

    def held(ckpt):
        assert release.wait(30), "the test never released the validation"
        return validate(ckpt)

    monkeypatch.setattr(app_module, "validate", held)
    return release


async def until(pilot, done) -> None:
    for _ in range(600):
        if done():
            return
        await pilot.pause(0.05)
    raise AssertionError("the app did not get there")


def tab_label(app: ZinspectApp, tab: str) -> str:
    return str(app.main.query_one("#tabs").get_tab(f"tab-{tab}").label)


async def test_tabs_before_the_findings_which_fill_in_without_undoing_the_filter(
        tmp_path, monkeypatch):
    path = damaged_copy(tmp_path)  # rank 1's optimizer file deleted: errors naming params
    release = held_validation(monkeypatch)
    app = ZinspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: bool(app.screen.query(Inspector)))
        await pilot.pause()
        assert not app.view.validated
        assert tab_label(app, "findings") == "Findings (…)"
        assert "validating" in text_of(app.screen.query_one("#overview-body", Static))
        await pilot.press("4")
        assert "Validating" in text_of(app.screen.query_one("#finding-detail", Static))
        await pilot.press("3")
        assert not app.screen.query(RankGrid)
        await pilot.press("m")  # the merge wants the findings: it says so and waits
        await pilot.pause()
        assert not isinstance(app.screen, MergeScreen)
        assert "still validating" in [n.message for n in app._notifications][-1]

        await pilot.press("slash", *"blocks.1")  # browsing goes on meanwhile
        await pilot.pause()
        table = app.screen.query_one(ParamTable)
        rows = list(table.names)
        assert rows and all("blocks.1" in n for n in rows)
        table.cursor = len(rows) - 1

        release.set()
        await settle(app, pilot)
        assert app.view.validated
        errors = app.view.ckpt.errors
        assert errors
        pane = app.screen.query_one(ParamsPane)
        assert pane.filter_text == "blocks.1" and table.names == rows  # the user's filter stays
        assert table.cursor == len(rows) - 1
        flagged = [i for i, n in enumerate(rows) if n in app.view.flagged]
        assert flagged and table.row_cells(flagged[0])[0].endswith("!")  # marks came in
        roots = sum(f.cause is None for f in app.view.ckpt.findings)
        assert tab_label(app, "findings") == f"Findings ({roots}) !"
        overview = text_of(app.screen.query_one("#overview-body", Static))
        assert "validating" not in overview and "errors: a merge would be wrong" in overview
        await pilot.press("escape", "4")
        findings = app.screen.query_one(FindingTable)
        assert findings.row_count == len(app.view.ckpt.findings)
        assert app.screen.focused is findings  # the tab it was on gets its new table
        await pilot.press("3")
        assert app.screen.query_one(RankGrid).row_count == app.view.ckpt.world_size
        await pilot.press("m")
        await pilot.pause()
        assert isinstance(app.screen, MergeScreen)


async def test_a_failure_while_validating_replaces_the_tabs_with_it(monkeypatch):
    def broken(ckpt):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(app_module, "validate", broken)
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        shown = text_of(app.screen.query_one("#load-error", Static))
        assert "RuntimeError: validation broke" in shown
        assert not app.screen.query(Inspector)


async def test_reading_again_while_validating_ends_on_the_new_reading(tmp_path, monkeypatch):
    """`v` while the first reading validates: the first one's end is not shown over the new."""
    path = damaged_copy(tmp_path)
    release = held_validation(monkeypatch)
    app = ZinspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: bool(app.screen.query(Inspector)))
        first = app.view
        await pilot.press("v")
        await until(pilot, lambda: app.view is not first and bool(app.screen.query(Inspector)))
        second = app.view
        release.set()
        await settle(app, pilot)
        await until(pilot, lambda: second.validated)
        assert app.view is second and not first.validated
        assert tab_label(app, "findings").startswith("Findings (") and "…" not in \
            tab_label(app, "findings")


async def test_zero3_frozen_param_detail_reads_the_ranks_in_a_thread(monkeypatch):
    """A ZeRO-3 frozen param's fragments need every rank's model states parsed (validate reads
    them too, once the tabs are drawn): opened before that, the screen comes at once, says so,
    and fills in the table and bar when its thread is done, then the findings when they are."""
    release, threads = threading.Event(), []
    real = zero3.FrozenFragments.fragments

    def gated(self, name, numel):
        threads.append(threading.current_thread())
        release.wait(10)
        return real(self, name, numel)

    monkeypatch.setattr(zero3.FrozenFragments, "fragments", gated)
    validated = held_validation(monkeypatch)
    name = "encoder.frozen_proj.weight"
    app = ZinspectApp(str(FIXTURES / "s3_w4_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.browsing is not None)
        assert app.view.ckpt.params[name].frozen and app.view.slow_fragments(name)
        app.goto_param(name)
        await until(pilot, lambda: bool(app.screen.query("#fragment-table")))  # (under load)
        screen = app.screen
        table = screen.query_one("#fragment-table", DataTable)
        assert "reading the ranks' model states" in str(screen.query_one("#coverage").render())
        facts = text_of(screen.query_one("#param-facts", Static))
        assert "saved as …" in facts and "validating the checkpoint" in facts
        assert table.row_count == 0
        release.set()
        await until(pilot, lambda: table.row_count)
        assert threads and threads[0] is not threading.main_thread()
        assert [table.get_row_at(i)[0] for i in range(table.row_count)] == ["0", "1", "2", "3"]
        segments = screen.query_one("#coverage").segments
        assert sum(n for kind, _, n in segments if kind == "rank") == \
            app.view.ckpt.params[name].numel
        assert "in 4 fragment(s)" in text_of(screen.query_one("#param-facts", Static))
        validated.set()
        await settle(app, pilot)
        assert app.view.validated
        assert "validating" not in text_of(screen.query_one("#param-facts", Static))


async def test_keys_while_the_checkpoint_is_read_again_wait_for_its_tabs(monkeypatch):
    """`v` shows a spinner until the new reading's tabs come: the keys that act on the tabs
    (`/` looked for a Parameters tab that was not there: the app crashed) wait meanwhile, then
    act on the new tabs (tests/test_tui_typeahead.py)."""
    release, reads = threading.Event(), []
    real = app_module.load_checkpoint

    def second_read_held(path, tag=None, progress=None):
        reads.append(path)
        if len(reads) > 1:
            assert release.wait(30), "the test never released the second reading"
        return real(path, tag, progress)

    monkeypatch.setattr(app_module, "load_checkpoint", second_read_held)
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        first = app.view
        await pilot.press("v")
        await until(pilot, lambda: len(reads) == 2)
        assert app.browsing is None and not app.screen.query(Inspector)
        keys = ("slash", "m", "d", "f", "ctrl+g", "c", "p", "a", "space", "2", "escape")
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
            assert app.screen is app.main, key  # no dialog opened on the old reading
        assert not first.excluded  # f (exclude frozen) did not reach it
        assert [k.key for k in app._ahead] == list(keys)  # kept for the new tabs
        release.set()
        await settle(app, pilot)
        await until(pilot, lambda: not app._ahead and not app._replaying)
        await settle(app, pilot)
        assert app.browsing is app.view and app.view is not first and app.view.validated
        # `/`, then m d f its text; ctrl+g's dialog got c p a space 2, and escape closed it
        assert app.screen is app.main and not app.view.excluded
        pane = app.screen.query_one(ParamsPane)
        assert pane.filter_text == "mdf"
        await pilot.press("escape", "slash", *"blocks.1")
        await pilot.pause()
        assert pane.filter_text == "blocks.1"


async def test_the_findings_coming_move_no_focus_off_the_tab_the_user_is_on(monkeypatch):
    """Focusing a widget of a pane makes its tab the active one (Textual's TabPane.Focused,
    handled later): the Overview focused as the findings came undid a `2` typed just then."""
    release = held_validation(monkeypatch)
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: bool(app.screen.query(Inspector)))
        await pilot.pause()
        before = app.screen.focused
        release.set()
        await settle(app, pilot)
        assert app.view.validated and app.main.active_tab == "overview"
        assert app.screen.focused is before
