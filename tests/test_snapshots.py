"""SVG snapshots of the main screens at a fixed size (pytest --snapshot-update to regenerate).

Paths are given relative to the working dir, so what is rendered is the same on every machine."""

from __future__ import annotations

import shutil
from contextlib import suppress
from pathlib import Path

import pytest
from textual.widgets import Input
from textual.worker import WorkerFailed

from zinspect.tui.app import ZinspectApp

REPO = Path(__file__).parent.parent
SIZE = (120, 36)


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def after_loading(*keys: str):
    async def run_before(pilot) -> None:
        with suppress(WorkerFailed):  # a failed load is shown in the app
            await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        for box in pilot.app.screen.query(Input):
            box.cursor_blink = False
        await pilot.pause()
    return run_before


def test_overview(snap_compare, in_repo):
    assert snap_compare(ZinspectApp("zinspect/sample"), run_before=after_loading(),
                        terminal_size=SIZE)


def test_tree_with_exclusions(snap_compare, in_repo):
    keys = ("2", "down", "enter", "down", "down", "enter", "down", "space", "f")
    assert snap_compare(ZinspectApp("zinspect/sample"), run_before=after_loading(*keys),
                        terminal_size=SIZE)


def test_filtered_table(snap_compare, in_repo):
    keys = ("slash", *"blocks.1", "enter", "down", "space")
    assert snap_compare(ZinspectApp("zinspect/sample"), run_before=after_loading(*keys),
                        terminal_size=SIZE)


def test_param_detail(snap_compare, in_repo):
    keys = ("slash", *"embed", "enter", "enter")
    assert snap_compare(ZinspectApp("zinspect/sample"), run_before=after_loading(*keys),
                        terminal_size=SIZE)


def test_ranks(snap_compare, in_repo):
    assert snap_compare(ZinspectApp("tests/fixtures/s3_w3_fp16_sub"),
                        run_before=after_loading("3"), terminal_size=SIZE)


def test_findings_on_damaged_copy(snap_compare, tmp_path, monkeypatch):
    shutil.copytree(REPO / "tests" / "fixtures" / "s2_w2_bf16", tmp_path / "s2_w2_bf16")
    next((tmp_path / "s2_w2_bf16" / "global_step2").glob("*rank_1_*optim*")).unlink()
    monkeypatch.chdir(tmp_path)
    assert snap_compare(ZinspectApp("s2_w2_bf16"), run_before=after_loading("4", "down"),
                        terminal_size=SIZE)


def test_merge_dialog(snap_compare, in_repo):
    assert snap_compare(ZinspectApp("zinspect/sample"), run_before=after_loading("f", "m"),
                        terminal_size=SIZE)


def test_help(snap_compare, in_repo):
    assert snap_compare(ZinspectApp("zinspect/sample"),
                        run_before=after_loading("question_mark"), terminal_size=SIZE)


def test_unreadable_path(snap_compare, in_repo):
    assert snap_compare(ZinspectApp("no/such/checkpoint"), run_before=after_loading(),
                        terminal_size=SIZE)


def test_ranks_grid_tensor_parallel(snap_compare, in_repo):
    """Issue 10: the grid over tp x dp with a status per cell."""
    assert snap_compare(ZinspectApp("tests/fixtures/parallel/tp2_dp2_s2_toy"),
                        run_before=after_loading("3"), terminal_size=SIZE)


def test_param_detail_tp_shards(snap_compare, in_repo):
    """Issue 10: which tp rank holds which rows of a fused (sub-param) weight."""
    async def run_before(pilot) -> None:
        await after_loading()(pilot)
        pilot.app.goto_param("model.layers.0.mlp.gate_up_proj.weight")
        await after_loading()(pilot)
    assert snap_compare(ZinspectApp("tests/fixtures/parallel/tp2_dp2_s1_toy"),
                        run_before=run_before, terminal_size=SIZE)
