"""The app at its edges (issues 8, 9 and 14): names forged to be markup or terminal escapes, one
error presenter for every failure, help and palette read from the bindings, a tied param's
detail, a tag picker, the footer at 80 columns. Real fixtures and forged copies of them."""

from __future__ import annotations

import shutil
from contextlib import suppress
from pathlib import Path

import pytest
from conftest import FIXTURES, copy_fixture, manifest
from damage import TAG, copy_root, set_crc, zip_entry
from rich.console import Console
from textual.command import CommandPalette
from textual.widgets import Header, OptionList, Static
from textual.worker import WorkerFailed

from zinspect.core.fmt import shown
from zinspect.errors import NotMergeable, UnreadableFile
from zinspect.tui import app as app_module
from zinspect.tui.app import ZinspectApp
from zinspect.tui.errors import BUG_HINT, NOT_MERGEABLE_HINT, explain
from zinspect.tui.screens.param_detail import ParamDetailScreen

SIZE = (120, 36)
#: markup that would turn bold and become a link that quits, then escapes that clear the line
#: and ring the bell: as long as the name it replaces, so the pickles' string lengths stay right
FORGED = "[bold]x[/][@click=app.quit]\x1b[2K\x07"
FORGED_OF = "encoder.blocks.1.mlp.down.weight"  # held by rank 1 only
assert len(FORGED) == len(FORGED_OF)


def text_of(renderable) -> str:
    console = Console(width=300, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


async def settle(app: ZinspectApp, pilot) -> None:
    with suppress(WorkerFailed):
        await app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.pause()


def forge(tmp: Path, fixture: str = "s2_w2_fp32_plain", old: str = FORGED_OF,
          new: str = FORGED, tag_name: str | None = None) -> Path:
    """A copy of `fixture` with param `old` renamed `new` in every pickle (CRCs fixed up);
    with `tag_name`, the tag dir renamed too. Returns the tag dir."""
    root = copy_root(tmp, fixture, "forged")
    tag = root / TAG
    for p in tag.iterdir():
        off, size = zip_entry(p, "data.pkl")
        data = bytearray(p.read_bytes())
        pkl = bytes(data[off:off + size])
        if old.encode() in pkl:
            data[off:off + size] = pkl.replace(old.encode(), new.encode())
            p.write_bytes(bytes(data))
            set_crc(p, "data.pkl")
    if tag_name is not None:
        tag = tag.rename(root / tag_name)
    return tag


# ------------------------------------------------------------------ issue 8: escaped, no markup
async def test_a_forged_name_stays_text_in_palette_detail_and_notifications(tmp_path):
    tag = forge(tmp_path)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # findings now quote names
    sel = tmp_path / "sel.json"
    sel.write_text('{"zinspect_selection": 1, "exclude_globs": ["*click*"]}')
    app = ZinspectApp(str(tag))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert FORGED in app.view.ckpt.params
        escaped = shown(FORGED)
        assert "\\e" in escaped and "[@click=app.quit]" in escaped

        await pilot.press("ctrl+g", *"click")  # the palette: the name as text, not a link
        await pilot.pause(0.5)
        palette = app.screen
        assert isinstance(palette, CommandPalette)
        prompts = [str(o.prompt) for o in palette.query_one(OptionList).options]
        assert any(escaped in p for p in prompts), prompts
        await pilot.press("enter")
        await pilot.pause()
        detail = app.screen
        assert isinstance(detail, ParamDetailScreen) and detail.param_name == FORGED
        assert app.is_running  # the name's [@click=app.quit] was not run
        assert detail.title == escaped
        facts = text_of(detail.query_one("#param-facts", Static).content)
        assert escaped in facts and "\x1b" not in facts
        quoting = [f for f in app.view.ckpt.findings_for(FORGED) if FORGED in f.message]
        assert quoting and shown(quoting[0].message, 600) in facts

        app.load_selection(str(sel))
        await pilot.press("space")  # excluded by the glob: the notice names the param
        notes = [n for n in app._notifications if "still excluded" in n.message]
        assert notes and escaped in notes[-1].message
        assert all(not n.markup and "\x1b" not in n.message for n in app._notifications)


async def test_a_forged_tag_dir_name_is_escaped_in_the_title(tmp_path):
    name = "[bold red]t[@click=app.quit]q\x1b]0;x\x07"  # no closing tag: no "/" in a dir name
    tag = forge(tmp_path, tag_name=name)
    app = ZinspectApp(str(tag))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert app.view.ckpt.tag == name
        assert app.title == f"zinspect · {shown(name)}"
        assert shown(name) in str(app.screen.query_one(Header).format_title())


# ------------------------------------------------------------------ issue 9: one presenter
def test_the_presenter_says_what_where_and_what_to_try():
    try:
        {}["x"]
    except KeyError as e:
        bug = explain(e, "reading every byte of the checkpoint")
    assert bug.title == "Reading every byte of the checkpoint failed"
    assert bug.message == "KeyError: 'x'" and bug.hint == BUG_HINT
    assert bug.where.endswith("in test_the_presenter_says_what_where_and_what_to_try")

    refused = explain(NotMergeable("3 errors", "run `zinspect validate`"), "merging")
    assert refused.hint == NOT_MERGEABLE_HINT  # the app's tabs, not the CLI
    forged = explain(UnreadableFile(f"{FORGED}: cut short\nsecond line", "restore it"), "opening")
    assert forged.message == f"{shown(FORGED)}: cut short\nsecond line"
    gone = explain(FileNotFoundError(2, "No such file or directory", "/x/rank\x1b.pt"), "reading")
    assert gone.message == "/x/rank\\e.pt: No such file or directory" and "press v" in gone.hint


async def test_a_failing_worker_is_one_notification_with_a_hint(tmp_path, monkeypatch):
    """The deep check, the statistics and a param's fragments fail through one path."""
    from zinspect.tui.screens import deep_check as deep_module

    def broken(ckpt, progress=None, should_stop=None):
        raise UnreadableFile(f"{FORGED}: the record is cut short", "restore the file")

    monkeypatch.setattr(deep_module, "deep_check", broken)
    app = ZinspectApp(str(copy_fixture(tmp_path, "s2_w2_bf16")))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("d")
        await settle(app, pilot)
        (note,) = [n for n in app._notifications if n.severity == "error"]
        assert note.title == "Reading every byte of the checkpoint failed"
        assert note.message == f"{shown(FORGED)}: the record is cut short\nhint: restore the file"
        assert app.screen is app.main  # the dialog closed, the app answers
        await pilot.press("2")
        assert app.main.active_tab == "params"


async def test_an_unexpected_load_error_names_where_it_came_from(monkeypatch):
    def broken(path, tag=None, progress=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module, "load_checkpoint", broken)
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        shown_text = text_of(app.screen.query_one("#load-error", Static).content)
        assert "RuntimeError: boom" in shown_text
        assert "at zinspect/" in shown_text or "test_tui_app_edges.py" in shown_text
        assert "please report it" in shown_text and "v: try again" in shown_text


# ------------------------------------------------------------------ help and palette
async def test_help_and_palette_are_read_from_the_bindings(monkeypatch):
    """A binding's description and tooltip change: the help and the palette follow."""
    from textual.binding import Binding

    bindings = list(ZinspectApp.BINDINGS)
    i = next(i for i, b in enumerate(bindings) if b.id == "deep-check")
    bindings[i] = Binding("D", "deep_check", "Deep scan", id="deep-check", tooltip="scan it all")
    monkeypatch.setattr(ZinspectApp, "BINDINGS", bindings)
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("question_mark")
        help_text = text_of(app.screen.query_one("#help Static", Static).content)
        assert any(line.split()[:3] == ["D", "Scan", "it"] for line in help_text.splitlines())
        await pilot.press("escape", "ctrl+p", *"deep scan")
        await pilot.pause(0.5)
        prompts = [str(o.prompt) for o in app.screen.query_one(OptionList).options]
        assert any("Deep scan" in p and "Scan it all (D)" in p for p in prompts), prompts


# ------------------------------------------------------------------ issue 14.2: tied params
TIED = "hf_llama_tied_s3_w4_fp32"


async def test_a_tied_params_detail_shows_its_owner_and_jumps_to_it():
    app = ZinspectApp(str(FIXTURES / TIED))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        alias = next(p for p in app.view.ckpt.params.values() if p.tied_to)
        owner = app.view.ckpt.params[alias.tied_to]
        app.goto_param(alias.name)
        await settle(app, pilot)
        detail = app.screen
        facts = text_of(detail.query_one("#param-facts", Static).content)
        assert f"tied to {owner.name}" in facts and "saved once" in facts
        assert "saved as ?" not in facts
        assert f"{owner.numel:,} of {owner.numel:,} elements in {len(owner.fragments)} " \
               "fragment(s) of the owner" in facts
        segments = detail.query_one("#coverage").segments
        assert segments and not [s for s in segments if s[0] == "missing"]
        assert detail.query_one("#fragment-table").row_count == len(owner.fragments)
        await pilot.press("o")
        await pilot.pause()
        assert isinstance(app.screen, ParamDetailScreen) and app.screen.param_name == owner.name
        assert f"owner of the tied {alias.name}" in text_of(
            app.screen.query_one("#param-facts", Static).content)
        await pilot.press("escape")
        assert app.screen is detail
        app.goto_param(owner.name)  # not tied: no `o`, and o does nothing
        await settle(app, pilot)
        untied = app.screen
        assert "open_owner" not in {b.action for _, b, _, _ in untied.active_bindings.values()}
        await pilot.press("o")
        assert app.screen is untied



# ------------------------------------------------------------------ issue 14.6: the tag picker
def several_tags(tmp_path: Path) -> Path:
    """A root with two tag dirs and no `latest` (which DeepSpeed writes last: a copy cut
    short, or a run that saved twice)."""
    root = tmp_path / "two_tags"
    for name, fixture in (("global_step2", "s2_w2_bf16"), ("global_step9", "s1_w2_fp32")):
        shutil.copytree(FIXTURES / fixture / manifest(fixture)["tag"], root / name)
    return root


@pytest.mark.parametrize("pick", [0, 1])
async def test_several_tags_without_latest_offer_a_picker(tmp_path, pick):
    from zinspect.tui.screens.tag_picker import TagPickerScreen

    root = several_tags(tmp_path)
    app = ZinspectApp(str(root), tags=["global_step2", "global_step9"])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, TagPickerScreen)
        await pilot.press(*["down"] * pick, "enter")
        await settle(app, pilot)
        assert app.view.ckpt.tag == ["global_step2", "global_step9"][pick]
        assert app.view.ckpt.stage == (2, 1)[pick]


async def test_escape_on_the_tag_picker_quits(tmp_path):
    root = several_tags(tmp_path)
    app = ZinspectApp(str(root), tags=["global_step2", "global_step9"])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert not app.is_running


# ------------------------------------------------------------------ issue 14.1: the footer
@pytest.mark.parametrize("tab", ["1", "2"])
async def test_the_footer_fits_80_columns(tab):
    from textual.widgets import Footer

    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press(tab)
        await pilot.pause()
        await pilot.pause()
        footer = app.screen.query_one(Footer)
        keys = list(footer.children)
        assert keys and footer.compact
        right = max(k.region.right for k in keys)
        assert right <= 80, [(str(k.key_display), k.region) for k in keys]
        shown_keys = {k.key_display for k in keys}
        assert {"?", "m", "v", "q"} <= shown_keys


def test_several_tags_without_a_terminal_keep_the_clear_error(tmp_path):
    from conftest import run_zinspect

    r = run_zinspect(several_tags(tmp_path))  # stdout is a pipe: no app
    assert r.returncode == 2
    assert "global_step2" in r.stderr and "global_step9" in r.stderr and "--tag" in r.stderr


# ------------------------------------------------------------------ issue 13: diff in the app
def merged(tmp_path: Path, fixture: str = "s2_w2_bf16") -> Path:
    from zinspect.core import open_checkpoint
    from zinspect.core.merge import merge

    out = tmp_path / "merged"
    merge(open_checkpoint(FIXTURES / fixture), out)
    return out


def plant_change(out: Path, name: str) -> None:
    """Add 1.0 to the first element of `name` in the merged safetensors file."""
    import json
    import struct

    path = out / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n + json.loads(data[8:8 + n])[name]["data_offsets"][0]
    (v,) = struct.unpack("<f", data[start:start + 4])
    data[start:start + 4] = struct.pack("<f", v + 1.0)
    path.write_bytes(bytes(data))


async def compare(app: ZinspectApp, pilot, other: Path):
    from zinspect.tui.screens.diff import DiffScreen

    await pilot.press("c")
    await pilot.pause()
    app.screen.query_one("#compare-path").value = str(other)
    await pilot.press("enter")
    await settle(app, pilot)
    screen = app.screen
    assert isinstance(screen, DiffScreen)
    return screen


async def test_compare_with_the_merged_output_is_equal_and_a_planted_change_is_found(tmp_path):
    out = merged(tmp_path)
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = await compare(app, pilot, out)
        assert screen.result.equal
        assert "EQUAL" in str(screen.query_one("#diff-summary").content)
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.main

        victim = "encoder.blocks.1.mlp.up.weight"
        plant_change(out, victim)
        screen = await compare(app, pilot, out)
        assert not screen.result.equal
        table = screen.query_one("#diff-table")
        top = table.row_cells(0)
        assert top[0] == victim and top[1] == "differs" and top[4] == "1" and top[5] == "[0, 0]"
        assert all(table.row_cells(i)[1] == "identical" for i in range(1, table.row_count))
        await pilot.press("enter")  # the param's detail, over the diff
        await pilot.pause()
        assert isinstance(app.screen, ParamDetailScreen) and app.screen.param_name == victim
        await pilot.press("escape")
        assert app.screen is screen


async def test_compare_with_something_unreadable_is_one_notification(tmp_path):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"\x00" * 4)
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("c")
        await pilot.pause()
        app.screen.query_one("#compare-path").value = str(bad)
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.screen is app.main
        (note,) = [n for n in app._notifications if n.severity == "error"]
        assert note.title == "Comparing with the other checkpoint failed"
        assert "weights.safetensors" in note.message and "hint:" not in note.title
