"""`d` in the app: the deep check on demand, its findings in the Findings tab, and cancel."""

from __future__ import annotations

import struct
import time

from conftest import copy_fixture
from test_tui_app import SIZE, settle, text_of
from textual.widgets import Static

from zinspect.core import open_checkpoint
from zinspect.errors import MergeCancelled
from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens import deep_check as deep_screen_module
from zinspect.tui.screens.deep_check import DeepCheckScreen
from zinspect.tui.screens.param_detail import ParamDetailScreen

PARAM = "encoder.blocks.0.mlp.up.weight"


def with_nan(tmp_path):
    """A fixture copy whose fp32 master of PARAM holds a NaN (its zip CRC no longer matches)."""
    tag = copy_fixture(tmp_path, "s3_w2_fp32")
    frag = open_checkpoint(tag).params[PARAM].fragments[0]
    with open(tag / frag.file, "r+b") as f:
        f.seek(frag.offset)
        f.write(struct.pack("<f", float("nan")))
    return tag, frag.file


async def test_deep_check_adds_crc_and_nan_findings(tmp_path):
    tag, damaged_file = with_nan(tmp_path)
    app = ZinspectApp(str(tag))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert not app.view.ckpt.errors  # the metadata alone cannot see it
        await pilot.press("d")
        await settle(app, pilot)
        codes = {(f.code, f.param or f.file) for f in app.view.ckpt.findings}
        assert ("nan-values", PARAM) in codes
        assert any(code == "crc-mismatch" and where == damaged_file for code, where in codes)
        # the param is flagged in the tree and table
        assert "!" in app.view.marks(app.view.names.index(PARAM))
        assert not isinstance(app.screen, DeepCheckScreen)
        await pilot.press("d")  # a second run replaces the first one's findings
        await settle(app, pilot)
        assert sum(f.code == "nan-values" for f in app.view.ckpt.findings) == 1


async def test_escape_cancels_the_deep_check(tmp_path, monkeypatch):
    def slow_check(ckpt, progress=None, should_stop=None):
        for step in range(2000):
            progress(step, 2000, "rank 0")
            if should_stop():
                raise MergeCancelled("the deep check was cancelled")
            time.sleep(0.005)
        raise AssertionError("never cancelled")

    monkeypatch.setattr(deep_screen_module, "deep_check", slow_check)
    app = ZinspectApp(str(copy_fixture(tmp_path, "s2_w2_bf16")))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        before = list(app.view.ckpt.findings)
        await pilot.press("d")
        await pilot.pause(0.2)
        assert isinstance(app.screen, DeepCheckScreen)
        await pilot.press("escape")
        await settle(app, pilot)
        assert not isinstance(app.screen, DeepCheckScreen)
        assert app.view.ckpt.findings == before


async def test_deep_check_from_a_param_detail_updates_that_screen(tmp_path):
    tag, _ = with_nan(tmp_path)
    app = ZinspectApp(str(tag))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        view = app.view
        app.goto_param(PARAM)
        await pilot.pause()
        detail = app.screen
        assert isinstance(detail, ParamDetailScreen)
        await pilot.press("d")
        await settle(app, pilot)
        assert app.screen is detail and app.view is view  # updated in place, not rebuilt
        nan = next(f for f in app.view.ckpt.findings_for(PARAM) if f.code == "nan-values")
        assert nan.message in text_of(detail.query_one("#param-facts", Static))
        await pilot.press("space")
        assert PARAM in app.view.excluded
        assert "excluded" in text_of(detail.query_one("#param-facts", Static))


async def test_deep_check_reports_a_drifted_replica_once_per_run(tmp_path):
    """`d` on a tp2 copy whose tp rank 1 norm drifted: the merge's tp-replica-drift finding in
    the Findings tab; a second `d` replaces it (one finding, not two)."""
    from test_deep_replicas import NORM, drifted_replica

    root, want = drifted_replica(tmp_path)
    app = ZinspectApp(str(root))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        for _ in range(2):
            await pilot.press("d")
            await settle(app, pilot)
            drift = [f for f in app.view.ckpt.findings if f.code == "tp-replica-drift"]
            assert [(f.param, f.severity) for f in drift] == [(NORM, "warning")]
            assert f"up to {want:.6g}" in drift[0].message
