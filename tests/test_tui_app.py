"""The app driven with a Pilot: every screen and flow, on real fixtures and damaged copies."""

from __future__ import annotations

import shutil
import time
from contextlib import suppress
from pathlib import Path

import pytest
from rich.console import Console
from safetensors import safe_open
from test_tui_scale import serve
from textual.widgets import DataTable, Input, Static
from textual.worker import WorkerFailed

from zinspect.core import open_checkpoint
from zinspect.core.merge import plan_merge
from zinspect.core.model import Param
from zinspect.core.selection import Selection
from zinspect.report import totals
from zinspect.tui import app as app_module
from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens import merge as merge_screen_module
from zinspect.tui.screens.help import HelpScreen
from zinspect.tui.screens.merge import MergeScreen
from zinspect.tui.screens.param_detail import ParamDetailScreen
from zinspect.tui.widgets.findings_pane import FindingTable
from zinspect.tui.widgets.param_table import ParamTable
from zinspect.tui.widgets.param_tree import ParamTree
from zinspect.tui.widgets.ranks_pane import RankGrid, RanksPane

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
SAMPLE = TESTS.parent / "zinspect" / "sample"
SIZE = (120, 36)


def text_of(widget: Static) -> str:
    """What a Static shows, as plain text."""
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(widget.content)
    return console.export_text()


async def settle(app: ZinspectApp, pilot) -> None:
    with suppress(WorkerFailed):  # a failed load or merge is shown in the app
        await app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.pause()


def damaged_copy(tmp_path: Path, fixture: str = "s2_w2_bf16", rank: int = 1) -> Path:
    """A copy of a fixture with one rank's optimizer file deleted."""
    dest = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, dest)
    victim = next((dest / "global_step2").glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    victim.unlink()
    return dest


@pytest.mark.parametrize("fixture", sorted(p.parent.name for p in FIXTURES.glob("*/manifest.json")))
async def test_every_fixture_opens_on_every_tab(fixture):
    ckpt = open_checkpoint(FIXTURES / fixture)
    app = ZinspectApp(str(FIXTURES / fixture))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        overview = text_of(app.screen.query_one("#overview-body", Static))
        assert f"world size      {ckpt.world_size}" in overview
        assert f"ZeRO stage {ckpt.stage}" in overview
        for tab in "234":
            await pilot.press(tab)
        tree = app.screen.query_one(ParamTree)
        # params and buffers: both are written, so both are shown (issue 14.6)
        assert sum(n.data.count for n in tree.root.children) == len(ckpt.params) + len(ckpt.buffers)
        ranks = app.screen.query_one("#rank-table", RankGrid)  # one row per cell of the grid
        assert ranks.row_count == ckpt.world_size
        findings = app.screen.query_one("#findings-table", FindingTable)
        assert findings.row_count == len(ckpt.findings)


async def test_unreadable_path_shows_message_and_hint(tmp_path):
    app = ZinspectApp(str(tmp_path / "no-such-checkpoint"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        shown = text_of(app.screen.query_one("#load-error", Static))
        assert "Cannot open the checkpoint" in shown
        assert "no-such-checkpoint" in shown
        assert "hint:" in shown
    assert app.return_value is None  # no crash: the app was quit by the test, not by an error


async def test_filter_as_you_type_then_escape_back_to_tree():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"mlp up")
        table = app.screen.query_one(ParamTable)
        assert table.display and table.names == [
            "encoder.blocks.0.mlp.up.weight", "encoder.blocks.0.mlp.up.bias",
            "encoder.blocks.1.mlp.up.weight", "encoder.blocks.1.mlp.up.bias"]
        # of the 27 params and 4 buffers the table lists
        assert "4 of 31 match" in text_of(app.screen.query_one("#output-summary", Static))
        await pilot.press("backspace", "backspace", "backspace")  # "mlp" alone
        assert len(table.names) == 8
        await pilot.press("escape")
        assert app.screen.query_one("#param-views").current == "param-tree"
        assert app.focused is app.screen.query_one(ParamTree)


async def test_sort_by_size_and_name_in_table():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("2", "t")
        table = app.screen.query_one(ParamTable)
        assert table.names == [*app.view.ckpt.params, *app.view.ckpt.buffers]  # then buffers
        await pilot.press("o")  # name
        assert table.names == sorted([*app.view.ckpt.params, *app.view.ckpt.buffers])
        await pilot.press("o")  # size
        sizes = [app.view.sizes[n][1] for n in table.names]
        assert sizes == sorted(sizes, reverse=True)
        tree = app.screen.query_one(ParamTree)
        top = [n.data.nbytes for n in tree.root.children]
        assert top == sorted(top, reverse=True)


async def test_space_excludes_param_and_whole_subtree():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        tree = app.screen.query_one(ParamTree)
        assert tree.cursor_node.data.path == "embed"
        await pilot.press("space")
        assert app.view.excluded == {"embed.weight"}
        await pilot.press("down", "space")  # the encoder module: 22 params
        encoder = {n for n in app.view.ckpt.params if n.startswith("encoder.")}
        assert app.view.excluded == encoder | {"embed.weight"}
        assert "22/22 excluded" in str(tree.cursor_node.label)
        summary = text_of(app.screen.query_one("#output-summary", Static))
        assert "output: 4 params + 4 buffers" in summary and "excluded: 23" in summary
        await pilot.press("space")  # all of encoder excluded: include them again
        assert app.view.excluded == {"embed.weight"}


async def test_exclude_frozen_then_include_one_frozen_back():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("f")
        assert app.view.selection.exclude_frozen
        assert app.view.excluded == {"encoder.frozen_proj.weight"}
        await pilot.press("slash", *"frozen", "enter", "space")
        assert app.view.excluded == set()
        assert not app.view.selection.exclude_frozen


async def test_save_and_load_selection_file(tmp_path):
    path = tmp_path / "sel.json"
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("2", "space", "s")
        app.screen.query_one("#selection-path", Input).value = str(path)
        await pilot.press("enter")
        assert Selection.load(path).exclude == {"embed.weight"}
        await pilot.press("space")
        assert app.view.excluded == set()
        await pilot.press("l")
        assert app.screen.query_one("#selection-path", Input).value == str(path)
        await pilot.press("enter")
        assert app.view.excluded == {"embed.weight"}
        tree = app.screen.query_one(ParamTree)
        assert "excluded" in str(tree.root.children[0].label)


async def test_loading_a_bad_selection_file_is_a_notification(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("l")
        app.screen.query_one("#selection-path", Input).value = str(bad)
        await pilot.press("enter")
        assert any("not a JSON selection file" in n.message for n in app._notifications)
        assert app.view.excluded == set()


async def test_param_detail_lists_fragments_and_coverage():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"cube", "enter", "enter")
        assert isinstance(app.screen, ParamDetailScreen)
        param = app.view.ckpt.params["encoder.cube"]
        table = app.screen.query_one("#fragment-table", DataTable)
        assert table.row_count == len(param.fragments) == 4
        assert [table.get_row_at(i)[0] for i in range(4)] == ["0", "1", "2", "3"]
        segments = app.screen.query_one("#coverage").segments
        assert [s for s in segments if s[0] == "rank"] == [
            ("rank", f.rank, f.numel) for f in param.fragments]
        assert ("pad", 3, 3) in segments
        await pilot.press("space")
        assert "encoder.cube" in app.view.excluded
        assert "excluded" in text_of(app.screen.query_one("#param-facts", Static))
        await pilot.press("escape")
        assert not isinstance(app.screen, ParamDetailScreen)


async def test_help_opens_and_closes():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_palette_goes_to_param_and_excludes_frozen():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+g", *"odd in")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ParamDetailScreen)
        assert app.screen.param_name == "encoder.odd_in.weight"
        await pilot.press("escape", "ctrl+p", *"exclude frozen")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert app.view.selection.exclude_frozen


async def merge_into(app, pilot, out: Path, shard: str = "") -> MergeScreen:
    await pilot.press("m")
    screen = app.screen
    assert isinstance(screen, MergeScreen)
    screen.query_one("#merge-out", Input).value = str(out)
    screen.query_one("#merge-shard", Input).value = shard
    await pilot.click("#merge-start")
    return screen


async def test_merge_writes_selected_tensors(tmp_path):
    out = tmp_path / "merged"
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("f")
        screen = await merge_into(app, pilot, out, shard="10KB")
        await settle(app, pilot)
        outcome = text_of(screen.query_one("#merge-outcome", Static))
        assert "Merged" in outcome
        expected = [t.name for t in plan_merge(app.view.ckpt, app.view.selection).tensors]
        assert "encoder.frozen_proj.weight" not in expected
        keys = []
        for shard in sorted(out.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                keys += list(f.keys())
        assert sorted(keys) == sorted(expected)
        assert (out / "model.safetensors.index.json").exists()
        await pilot.press("escape")
        assert not isinstance(app.screen, MergeScreen)


async def test_merge_refused_output_shows_error_in_app(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.safetensors").write_text("someone else's")
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = await merge_into(app, pilot, out)
        await settle(app, pilot)
        outcome = text_of(screen.query_one("#merge-outcome", Static))
        assert "The merge failed" in outcome and "hint:" in outcome
        assert (out / "model.safetensors").read_text() == "someone else's"
        await pilot.click("#merge-back")
        assert screen.query_one("#merge-form").display


async def test_merge_bad_shard_size_is_a_form_error(tmp_path):
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = await merge_into(app, pilot, tmp_path / "out", shard="lots")
        assert "bad size 'lots'" in text_of(screen.query_one("#merge-form-error", Static))
        assert not (tmp_path / "out").exists()


async def test_escape_cancels_a_running_merge_and_leaves_nothing(tmp_path, monkeypatch):
    real_merge = merge_screen_module.merge
    polled = []

    def slow_merge(*args, should_stop, **kwargs):
        def patient_stop() -> bool:  # a long merge: keeps polling until told to stop
            polled.append(True)
            deadline = time.monotonic() + 10
            while not should_stop() and time.monotonic() < deadline:
                time.sleep(0.01)
            return should_stop()
        return real_merge(*args, should_stop=patient_stop, **kwargs)

    monkeypatch.setattr(merge_screen_module, "merge", slow_merge)
    out = tmp_path / "merged"
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = await merge_into(app, pilot, out, shard="4KB")
        while not polled:
            await pilot.pause(0.05)
        assert screen.query_one("ContentSwitcher").current == "merge-running"
        await pilot.press("escape")
        await settle(app, pilot)
        assert "Cancelled" in text_of(screen.query_one("#merge-outcome", Static))
        assert not out.exists()


async def test_findings_on_a_damaged_copy_jump_to_rank_and_param(tmp_path):
    path = damaged_copy(tmp_path)
    app = ZinspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        overview = text_of(app.screen.query_one("#overview-body", Static))
        assert "errors: a merge would be wrong" in overview
        await pilot.press("4")
        table = app.screen.query_one("#findings-table", FindingTable)
        first = app.view.ckpt.findings[0]
        assert first.code == "missing-optimizer-file" and first.rank == 1
        assert table.has_focus
        await pilot.press("enter")
        assert app.screen.query_one("#tabs").active == "tab-ranks"
        ranks = app.screen.query_one(RanksPane).query_one("#rank-table", RankGrid)
        assert ranks.cursor == 1
        await pilot.press("4", "down")
        assert "hint: restore the missing rank files" in text_of(
            app.screen.query_one("#finding-detail", Static))
        await pilot.press("enter")
        assert isinstance(app.screen, ParamDetailScreen)
        assert app.screen.param_name == app.view.ckpt.findings[1].param == "embed.weight"
        await pilot.press("escape")  # back to the finding, not to the tree (issue 14.6)
        assert app.screen.query_one("#tabs").active == "tab-findings"
        table = app.screen.query_one("#findings-table", FindingTable)
        assert table.cursor == 1 and table.has_focus


async def test_knock_on_findings_are_folded_under_their_cause(tmp_path):
    """Issue 14.4 in the app: a lost rank file is one finding; the params it takes down are its
    knock-ons, listed right under it, marked and dimmed, and not counted as findings of their
    own in the summary."""
    app = ZinspectApp(str(damaged_copy(tmp_path)))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("4")
        table = app.screen.query_one("#findings-table", FindingTable)
        knock_ons = [f for f in app.view.ckpt.findings if f.cause]
        assert knock_ons, "a missing rank file leaves params incomplete"
        root = table.findings[0]
        assert root.code == "missing-optimizer-file" and root.cause is None
        under = table.findings[1:1 + len(knock_ons)]
        assert {id(f) for f in under} == {id(f) for f in knock_ons}
        assert table.row_cells(1)[1] == "↳ " + under[0].code
        assert table.cell_style(1, 0).dim
        summary = text_of(app.screen.query_one("#findings-summary", Static))
        roots = len(app.view.ckpt.findings) - len(knock_ons)
        assert summary.startswith(f"{roots} finding")
        assert f"+{len(knock_ons)} knock-on" in summary
        assert "param-coverage" not in summary.split("(+")[0]
        assert app.screen.query_one("#tabs").get_tab("tab-findings").label.plain.startswith(
            f"Findings ({roots})")
        await pilot.press("down")
        assert f"knock-on of {root.code}: {root.where()}" in text_of(
            app.screen.query_one("#finding-detail", Static))


async def test_validate_again_rereads_from_disk(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "s2_w2_bf16", path)
    app = ZinspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("2", "space")
        assert not app.view.ckpt.errors
        next((path / "global_step2").glob("*rank_1_*optim_states.pt")).unlink()
        await pilot.press("v")
        await settle(app, pilot)
        assert app.view.ckpt.errors
        assert app.view.excluded == {"embed.weight"}  # the selection survives
        assert app.screen.query_one("#tabs").active == "tab-params"


async def test_load_failure_of_unexpected_kind_is_shown_not_raised(monkeypatch):
    def broken(path, tag=None, progress=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module, "load_checkpoint", broken)
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert "RuntimeError: boom" in text_of(app.screen.query_one("#load-error", Static))


async def test_overview_counts_a_frozen_tied_alias_once_like_info(monkeypatch):
    ckpt = open_checkpoint(FIXTURES / "s2_w2_bf16")
    frozen = next(p for p in ckpt.params.values() if p.frozen)
    ckpt.params["alias.of.frozen"] = Param("alias.of.frozen", frozen.shape, frozen.dtype,
                                           frozen=True, tied_to=frozen.name)
    t = totals(ckpt)
    assert (t["params"], t["trainable"], t["frozen"], t["tied"]) == (28, 25, 1, 2)
    serve(monkeypatch, ckpt)
    app = ZinspectApp("s2_w2_bf16")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        overview = text_of(app.screen.query_one("#overview-body", Static))
        assert "28: 25 trainable · 1 frozen · 2 tied" in overview


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b'{"exclude": "embed.weight"}'])
async def test_a_binary_or_malformed_selection_file_is_a_notification(tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        for path in (str(bad), str(tmp_path / "nul\0.json")):  # NUL: a ValueError from open
            await pilot.press("l")
            app.screen.query_one("#selection-path", Input).value = path
            await pilot.press("enter")
            assert app._notifications and list(app._notifications)[-1].severity == "error"
            assert app.view.excluded == set()
        await pilot.press("s")
        app.screen.query_one("#selection-path", Input).value = str(tmp_path / "nul\0.json")
        await pilot.press("enter")
        assert "cannot write" in list(app._notifications)[-1].message
        assert app.is_running


async def test_merge_shard_size_too_big_for_a_float_is_a_form_error(tmp_path, monkeypatch):
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        huge = "1" + "0" * 400
        screen = await merge_into(app, pilot, tmp_path / "out", shard=huge)
        assert "bad size" in text_of(screen.query_one("#merge-form-error", Static))

        def overflowing(text):
            raise OverflowError("cannot convert float infinity to integer")

        monkeypatch.setattr(merge_screen_module, "parse_size", overflowing)
        shard = screen.query_one("#merge-shard", Input)
        shard.value = "5GB"
        shard.focus()
        await pilot.press("enter")  # the long error above pushed the button out of view
        assert "bad size '5GB'" in text_of(screen.query_one("#merge-form-error", Static))
        assert screen.query_one("ContentSwitcher").current == "merge-form"
        assert not (tmp_path / "out").exists()


async def test_validate_again_redraws_an_open_param_detail(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "s2_w2_bf16", path)
    app = ZinspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.goto_param("embed.weight")
        await pilot.pause()
        detail = app.screen
        table = detail.query_one("#fragment-table", DataTable)
        assert table.row_count == 2
        next((path / "global_step2").glob("*rank_1_*optim_states.pt")).unlink()
        await pilot.press("v")
        await settle(app, pilot)
        assert app.screen is detail
        assert table.row_count == 1 == len(app.view.ckpt.params["embed.weight"].fragments)
        facts = text_of(detail.query_one("#param-facts", Static))
        assert "held by no rank file" in facts and "in 1 fragment(s)" in facts
        await pilot.press("space")
        assert "embed.weight" in app.view.excluded
        assert "excluded" in text_of(detail.query_one("#param-facts", Static))


def test_name_sort_is_natural_like_the_tree():
    """blocks.2 sorts before blocks.10 in the flat table, as it does in the tree (issue 14.6)."""
    from zinspect.tui.inspection import Inspection
    ckpt = open_checkpoint(str(SAMPLE))
    first, *_ = ckpt.params
    p = ckpt.params[first]
    ckpt.params = {"blocks.10.w": p, "blocks.2.w": p, "blocks.1.w": p}
    ckpt.buffers = {}
    assert Inspection(ckpt).orders.rows("name").names == ["blocks.1.w", "blocks.2.w", "blocks.10.w"]


async def test_help_says_how_to_close_it():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("question_mark")
        assert "esc" in str(app.screen.query_one("#help").border_subtitle)


async def test_validate_again_says_what_changed(tmp_path):
    """`v` on unchanged files says so; after a file is removed it says the findings grew."""
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "s2_w2_bf16", path)
    app = ZinspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("v")
        await settle(app, pilot)
        messages = [n.message for n in app._notifications]
        assert "validated again: no change" in messages
        next((path / "global_step2").glob("*rank_1_*optim_states.pt")).unlink()
        await pilot.press("v")
        await settle(app, pilot)
        last = [n.message for n in app._notifications][-1]
        assert last.startswith("validated again:") and "no change" not in last, last


async def test_a_filter_matching_nothing_says_so_not_an_empty_table():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"zzz")
        assert app.screen.query_one("#param-views").current == "param-empty"
        assert "zzz" in text_of(app.screen.query_one("#param-empty", Static))
        await pilot.press("backspace", "backspace", "backspace", *"mlp")
        assert app.screen.query_one("#param-views").current == "param-table"
        await pilot.press("escape")
        assert app.screen.query_one("#param-views").current == "param-tree"


async def test_a_rank_missing_its_optimizer_file_is_not_ok_in_ranks(tmp_path):
    """Issue 14.3: the status cell reflects the findings about the rank."""
    app = ZinspectApp(str(damaged_copy(tmp_path)))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("3")
        ranks = app.screen.query_one(RanksPane).query_one("#rank-table", RankGrid)
        status = [ranks.row_cells(i)[-1] for i in range(ranks.row_count)]
        assert status[0] == "ok"
        assert status[1].startswith("error: missing-optimizer-file"), status


async def test_overview_names_a_peft_runs_adapter_like_info():
    """A LoRA run (real DeepSpeed ZeRO-3 + peft fixture): the overview says what `info` says."""
    from zinspect.core import peft

    ckpt = open_checkpoint(FIXTURES / "hf_mistral_lora_s3_w2_bf16")
    expected = peft.describe(peft.summary(ckpt))
    assert expected.startswith("LORA")
    app = ZinspectApp(str(FIXTURES / "hf_mistral_lora_s3_w2_bf16"))
    async with app.run_test(size=(200, 50)) as pilot:
        await settle(app, pilot)
        overview = text_of(app.screen.query_one("#overview-body", Static))
        assert "PEFT" in overview and expected[:40] in overview
    plain = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with plain.run_test(size=SIZE) as pilot:
        await settle(plain, pilot)
        assert "PEFT" not in text_of(plain.screen.query_one("#overview-body", Static))
