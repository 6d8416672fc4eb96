"""The merge form with salvage ticked says what salvage will really write, and the app's refusal
hint points to the Findings tab and the checkbox (not to the CLI)."""

from __future__ import annotations

from test_tui_app import SIZE, damaged_copy, settle, text_of
from textual.widgets import Button, Checkbox, Static

from zinspect.core import open_checkpoint
from zinspect.core.plan import plan_merge
from zinspect.tui.app import ZinspectApp


async def test_salvage_ticked_shows_the_salvage_plan_and_the_refusal_hint_is_the_apps(tmp_path):
    path = damaged_copy(tmp_path)  # rank 1's optimizer file is gone
    ckpt = open_checkpoint(path)
    plan = plan_merge(ckpt, salvage=True)
    written = sum(t.name in ckpt.params for t in plan.tensors)
    assert 0 < written < len(ckpt.params)
    app = ZinspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("m")
        await pilot.pause()
        screen = app.screen
        plan_widget = screen.query_one("#merge-plan", Static)
        assert f"Writes {len(ckpt.params)} params" in text_of(plan_widget)
        screen.query_one("#merge-out").value = str(tmp_path / "out")
        screen.query_one("#merge-start", Button).press()
        await settle(app, pilot)
        outcome = text_of(screen.query_one("#merge-outcome", Static))
        assert "Findings tab" in outcome and "salvage" in outcome
        assert "zinspect validate" not in outcome and "--salvage" not in outcome
        screen.query_one("#merge-back", Button).press()
        await pilot.pause()
        screen.query_one("#merge-salvage", Checkbox).value = True
        await pilot.pause()
        shown = text_of(plan_widget)
        assert f"Writes {written} param" in shown, shown
        assert f"Salvage leaves out {len(plan.dropped)}" in shown
        assert not (tmp_path / "out").exists()
