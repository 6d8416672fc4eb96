"""The merge form with salvage ticked says what salvage will really write, and the app's refusal
hint points to the Findings tab and the checkbox (not to the CLI). The optimizer state choice
(`merge --state all`) writes the moments, or is disabled with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_state_merge import by_hand
from test_tui_app import FIXTURES, SIZE, damaged_copy, settle, text_of
from textual import events
from textual.widgets import Button, Checkbox, RadioButton, RadioSet, Static

from zinspect.core import open_checkpoint, states
from zinspect.core.plan import plan_merge
from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens.selection_file import PathScreen


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


# -- the optimizer state (`merge --state all` in the form) ----------------------------------------

async def open_form(app, pilot):
    await settle(app, pilot)
    await pilot.press("m")
    await pilot.pause()
    return app.screen


async def test_the_state_choices_are_the_clis_and_all_writes_the_moments_deepspeed_saved(tmp_path):
    """The form's choices are zinspect.core.states.CHOICES (what `merge --state` takes); "all"
    says what it adds and writes exp_avg/exp_avg_sq equal to torch.load of the optimizer files."""
    name = "s2_w2_bf16"
    app = ZinspectApp(str(FIXTURES / name))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_form(app, pilot)
        choices = screen.query_one("#merge-state", RadioSet)
        assert not choices.disabled
        assert [b.id for b in choices.query(RadioButton)] == [f"state-{c}" for c in states.CHOICES]
        assert not screen.query_one("#merge-state-why").display
        plan_widget = screen.query_one("#merge-plan", Static)
        assert "moment" not in text_of(plan_widget)
        screen.query_one("#state-all", RadioButton).value = True
        await pilot.pause()
        ckpt = open_checkpoint(FIXTURES / name)
        moments = states.plan_states(ckpt, plan_merge(ckpt))
        shown = text_of(plan_widget)
        assert f"Also: {sum(map(len, moments.tensors.values()))} state tensors (exp_avg, " \
            "exp_avg_sq)" in shown, shown
        screen.query_one("#merge-out").value = str(tmp_path / "out")
        screen.query_one("#merge-start", Button).press()
        await settle(app, pilot)
        outcome = text_of(screen.query_one("#merge-outcome", Static))
        assert "Merged" in outcome and "optimizer state: exp_avg, exp_avg_sq" in outcome, outcome
    hand = by_hand(name)
    for key in states.MOMENTS:
        got = load_file(tmp_path / "out" / f"{key}.safetensors")
        assert set(got) == set(hand[key])
        assert all(torch.equal(got[n], want.float()) for n, want in hand[key].items()), key
    assert json.loads((tmp_path / "out" / states.STATE_JSON).read_text())["step"] == 2


async def test_the_state_choice_names_what_the_files_hold():
    app = ZinspectApp(str(FIXTURES / "optim" / "sgd_s2_w2_fp32"))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_form(app, pilot)
        assert str(screen.query_one("#state-all", RadioButton).label) == \
            "+ momentum_buffer"


#: fixtures whose optimizer state the core does not read (ZeRO-0 pipelines and MoE today)
STATELESS = [m.parent for m in sorted(FIXTURES.glob("parallel/*/manifest.json"))
             if "_s0_" in m.parent.name]


async def test_no_optimizer_state_the_choice_is_disabled_with_the_reason():
    path, why = next(((p, w) for p in STATELESS
                      if (w := states.unavailable(open_checkpoint(p)))), (None, None))
    if path is None:
        pytest.skip("every fixture's optimizer state is read now: no checkpoint without one")
    app = ZinspectApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_form(app, pilot)
        assert screen.query_one("#merge-state", RadioSet).disabled
        assert screen.query_one("#state-weights", RadioButton).value
        assert text_of(screen.query_one("#merge-state-why", Static)).strip() == f"not available: {why}"
        assert screen.read_form().state == "weights"


async def test_universal_and_adapter_only_switch_the_state_choice_off_and_say_why():
    app = ZinspectApp(str(FIXTURES / "hf_mistral_lora_s3_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_form(app, pilot)
        choices = screen.query_one("#merge-state", RadioSet)
        why = screen.query_one("#merge-state-why", Static)
        screen.query_one("#state-all", RadioButton).value = True
        await pilot.pause()
        screen.query_one("#fmt-universal", RadioButton).value = True
        await pilot.pause()
        assert choices.disabled and screen.read_form().state == "weights"
        assert "universal format writes the optimizer state itself" in text_of(why)
        screen.query_one("#fmt-safetensors", RadioButton).value = True
        await pilot.pause()
        assert not choices.disabled and not why.display
        screen.query_one("#merge-peft", Checkbox).value = True
        await pilot.pause()
        assert choices.disabled and "adapter only" in text_of(why)


async def test_keys_typed_right_behind_tab_reach_the_field_tab_moved_to():
    """Keys arrive together from a fast typist, a paste or a script (tmux send-keys): Textual
    hands each to the widget focused when the app reads it, so before tab was a priority
    binding, the space meant for the optimizer state went into the output directory field
    behind it and replaced the whole (selected) path with ' '."""
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_form(app, pilot)
        out = screen.query_one("#merge-out").value
        for key, char in [("tab", "\t")] * 4 + [("right", None), ("space", " ")]:
            app.post_message(events.Key(key, char))  # all queued at once, as a terminal sends
        await settle(app, pilot)
        assert app.focused is screen.query_one("#merge-state", RadioSet)
        assert screen.query_one("#merge-out").value == out
        assert screen.read_form().state == "all"
        for key, char in [("shift+tab", None), ("x", "x")]:
            app.post_message(events.Key(key, char))
        await settle(app, pilot)
        assert screen.query_one("#merge-shard").value == "x"


async def test_a_path_dialogs_field_keeps_its_path_when_a_space_comes_right_behind_tab(tmp_path):
    """The selection / compare path dialog: a space typed right behind tab (on the button, which
    takes enter) never replaces the dialog's (selected) path with ' '."""
    answers = []
    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        path = str(tmp_path / "picked.json")
        app.push_screen(PathScreen("Save selection", "File:", "Save", path, "p"), answers.append)
        await pilot.pause()
        for key, char in (("tab", "\t"), ("space", " ")):
            app.post_message(events.Key(key, char))
        await settle(app, pilot)
        assert app.screen.query_one("#p").value == path
        assert app.focused is app.screen.query_one("#path-ok")
        await pilot.press("enter")
        await settle(app, pilot)
    assert answers == [path]


# -- path fields: keys typed go into the path ----------------------------------------------------

async def test_typing_question_mark_and_q_into_a_path_field_appends_them_to_the_path():
    """The output directory opens focused with its default path: `?` and `q` (the app's help and
    quit keys) go into the field, after the path, instead of replacing it (Textual selected the
    field's text on focus, so the first key typed wiped the default path)."""
    from textual.widgets import Input

    from zinspect.tui.inspection import default_output_dir

    app = ZinspectApp(str(FIXTURES / "s2_w2_bf16"))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_form(app, pilot)
        field = screen.query_one("#merge-out", Input)
        assert field.has_focus
        await pilot.press("question_mark", "q")
        assert field.value == default_output_dir(app.view.ckpt) + "?q"
        assert app.screen is screen and app.is_running
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("s")  # the selection file's dialog: the same kind of field
        await pilot.pause()
        assert isinstance(app.screen, PathScreen)
        await pilot.press("q", "question_mark")
        assert app.screen.query_one(Input).value == "zinspect-selection.jsonq?"
