"""`m`: the merge dialog, then live progress (escape cancels), then the result or the error."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, replace

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import (
    Button,
    Checkbox,
    ContentSwitcher,
    Input,
    Label,
    RadioButton,
    RadioSet,
    Static,
)
from textual.worker import Worker, WorkerState, get_current_worker

from zinspect.core import fmt
from zinspect.core import states as states_mod
from zinspect.core.dtypes import OUTPUT_DTYPES
from zinspect.core.merge import MergeResult, merge, parse_size
from zinspect.core.plan import output_nbytes, plan_merge
from zinspect.core.stream import Progress, ShouldStop
from zinspect.core.writers import WRITERS, writer
from zinspect.errors import MergeCancelled, UsageError, ZinspectError
from zinspect.tui.errors import explain
from zinspect.tui.inspection import Inspection, default_output_dir, display_path
from zinspect.tui.keys import FORM_BINDINGS, path_field
from zinspect.tui.text import counted, params_and_buffers
from zinspect.tui.widgets.work_progress import WorkProgressPanel


@dataclass
class MergeRequest:
    out_dir: str
    format: str
    max_shard_size: int | None
    force: bool
    salvage: bool
    dtype: str = "fp32"
    peft: bool = False
    state: str = states_mod.CHOICES[0]


def state_label(choice: str, ckpt) -> str:
    """How the form words a `--state` choice (zinspect.core.states.CHOICES, the CLI's too)."""
    if choice == "weights":
        return "weights only"
    if choice == "all":
        held = states_mod.held_states(ckpt)
        return f"+ {', '.join(held)}" if held else "+ optimizer state"
    return choice


def error_text(title: str, error: BaseException) -> Text:
    """`title`, then what went wrong and what to try, as the app words every failure."""
    return replace(explain(error, "merging"), title=title).text()


def shard_size(text: str) -> int:
    """The form's shard size; anything parse_size cannot make a byte count of is a UsageError."""
    try:
        return parse_size(text)
    except (ValueError, OverflowError) as e:  # e.g. '1' and 400 zeros: float('inf')
        raise UsageError(f"bad size {text!r}", "use a number with a unit, e.g. 500MB, 5GB") from e


class MergeScreen(ModalScreen[None]):
    """Three faces in a ContentSwitcher: #merge-form, #merge-running, #merge-done."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="cancel-merge"), *FORM_BINDINGS]

    def __init__(self, view: Inspection) -> None:
        super().__init__()
        self.view = view

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="merge", classes="dialog") as box:  # scrolls at 80x24
            box.border_title = "Merge to fp32"
            with ContentSwitcher(initial="merge-form"):
                with Vertical(id="merge-form"):
                    yield Label("Output directory")
                    yield path_field(default_output_dir(self.view.ckpt), "merge-out")
                    with Horizontal(classes="form-row"):
                        with Vertical(classes="fit"):
                            yield Label("Format")
                            with RadioSet(id="merge-format"):
                                for i, w in enumerate(WRITERS.values()):
                                    yield RadioButton(w.label or w.name, value=i == 0,
                                                      id=f"fmt-{w.name}")
                        with Vertical(classes="fit"):
                            yield Label("Weights")
                            with RadioSet(id="merge-dtype"):
                                for name in OUTPUT_DTYPES:
                                    yield RadioButton(name, value=name == "fp32", id=f"dtype-{name}")
                            if self.view.peft is not None:
                                yield Checkbox("adapter only", id="merge-peft", compact=True)
                        with Vertical():
                            yield Label("Max shard size")
                            yield Input(placeholder="empty: one file", id="merge-shard")
                    # one row each, compact: at 80x24 the options and the plan fit without a scroll
                    with Horizontal(id="merge-state-row"):
                        yield Label("Optimizer state")
                        with RadioSet(id="merge-state", compact=True):
                            for i, name in enumerate(states_mod.CHOICES):
                                yield RadioButton(state_label(name, self.view.ckpt),
                                                  value=i == 0, id=f"state-{name}")
                    yield Static(id="merge-state-why", classes="dim")
                    # full width: a third of the dialog cut these labels, at 160 columns too
                    yield Checkbox("overwrite an existing output", id="merge-force", compact=True)
                    if self.view.ckpt.errors:
                        yield Checkbox("salvage: skip params that cannot be rebuilt",
                                       id="merge-salvage", compact=True)
                    yield Static(self.plan_text(), id="merge-plan")
                    yield Static(id="merge-form-error")
                    with Horizontal(classes="buttons"):
                        yield Button("Merge", variant="primary", id="merge-start")
                        yield Button("Cancel", id="merge-close-form")
                with Vertical(id="merge-running"):
                    yield Label("", id="merge-target")
                    yield WorkProgressPanel("escape: cancel (nothing is left on disk)")
                with Vertical(id="merge-done"):
                    yield Static(id="merge-outcome")
                    with Horizontal(classes="buttons"):
                        yield Button("Close", variant="primary", id="merge-close")
                        yield Button("Back to the form", id="merge-back")

    def plan_text(self, dtype: str = "fp32") -> Text:
        text = self.salvage_text() if self.salvage_ticked() else self.weights_text(dtype)
        if self.form_state() != states_mod.CHOICES[0]:
            text.append("\n")
            text.append_text(self.states_text())
        return text

    def weights_text(self, dtype: str) -> Text:
        out = self.view.output
        text = Text()
        text.append("Writes ", style="dim")
        text.append(f"{params_and_buffers(out.params, out.buffers)}, "
                    f"{fmt.size(self.output_nbytes(dtype))}", style="bold")
        excluded = sorted(self.view.excluded)
        if excluded:
            text.append(f"\nExcludes {fmt.count(len(excluded))} ({fmt.size(out.excluded_nbytes)}): ",
                        style="dim")
            text.append(", ".join(excluded[:4]) + (" …" if len(excluded) > 4 else ""))
        else:
            text.append("\nExcludes nothing", style="dim")
        unmatched = self.view.selection.unmatched(self.view.ckpt)
        if unmatched:
            text.append(f"\nwarning: {len(unmatched)} exclusion(s) match nothing: ", style="yellow")
            text.append(", ".join(fmt.shown(u, 60) for u in unmatched[:4]))
        errors = len(self.view.ckpt.errors)
        if errors:
            text.append(f"\n{errors} validation error(s): the merge refuses unless the params "
                        "they name are excluded, or salvage is on", style="yellow")
        return text

    def salvage_ticked(self) -> bool:
        box = self.query("#merge-salvage")
        return bool(box) and box.first(Checkbox).value

    def salvage_text(self) -> Text:
        """With salvage ticked, what the salvage plan really writes (not the unsalvaged count)."""
        try:
            plan = plan_merge(self.view.ckpt, self.view.selection, salvage=True)
        except ZinspectError as e:
            return error_text("Salvage cannot work around these errors", e)
        params = sum(t.name in self.view.ckpt.params for t in plan.tensors)
        text = Text("Writes ", style="dim")
        text.append(f"{params_and_buffers(params, len(plan.tensors) - params)}, "
                    f"{fmt.size(plan.total_bytes)} as fp32", style="bold")
        dropped = list(plan.dropped)
        text.append(f"\nSalvage leaves out {fmt.count(len(dropped))}: ", style="yellow")
        text.append(", ".join(fmt.shown(n, 60) for n in dropped[:4]) + (" …" if len(dropped) > 4 else ""))
        return text

    def states_text(self) -> Text:
        """With the optimizer state chosen, what it adds (planned as the merge plans it)."""
        try:
            plan = plan_merge(self.view.ckpt, self.view.selection, salvage=self.salvage_ticked())
            held = states_mod.plan_states(self.view.ckpt, plan, salvage=self.salvage_ticked())
        except ZinspectError as e:
            return error_text("The optimizer state cannot be written", e)
        text = Text("Also: ", style="dim")
        text.append(f"{counted(sum(map(len, held.tensors.values())), 'state tensor')} "
                    f"({', '.join(held.tensors)}), {fmt.size(held.total_bytes)} fp32",
                    style="bold")
        text.append(f" + {states_mod.STATE_JSON}", style="dim")
        if held.dropped:
            text.append(f"\nSalvage leaves out {counted(len(held.dropped), 'state tensor')}",
                        style="yellow")
        return text

    def state_blocker(self) -> str | None:
        """Why the optimizer state cannot be chosen with this checkpoint and form, or None."""
        if self.form_format() in WRITERS and writer(self.form_format()).tree is not None:
            return f"the {self.form_format()} format writes the optimizer state itself"
        if self.query("#merge-peft") and self.query_one("#merge-peft", Checkbox).value:
            return "adapter only: the optimizer state is the whole model's"
        return states_mod.unavailable(self.view.ckpt)

    @on(Checkbox.Changed, "#merge-salvage, #merge-peft")
    @on(RadioSet.Changed, "#merge-format, #merge-dtype, #merge-state")
    def form_changed(self) -> None:
        why = self.state_blocker()
        choices = self.query_one("#merge-state", RadioSet)
        if why and self.form_state() != states_mod.CHOICES[0]:
            self.query_one(f"#state-{states_mod.CHOICES[0]}", RadioButton).value = True
        choices.disabled = why is not None
        self.query_one("#merge-state-why", Static).update(Text(f"not available: {why}" if why else ""))
        self.query_one("#merge-state-why").display = why is not None
        self.query_one("#merge-plan", Static).update(self.plan_text(self.form_dtype()))

    def output_nbytes(self, dtype: str) -> int:
        """The preview's size: 16-bit output halves every float, buffers' ints keep theirs."""
        if dtype == "fp32":
            return self.view.output.nbytes
        return output_nbytes(self.view.ckpt, self.view.excluded, OUTPUT_DTYPES[dtype])

    def form_state(self) -> str:
        """The chosen --state (the first choice, weights, until the form is mounted)."""
        return next((n for n in states_mod.CHOICES if self.query(f"#state-{n}")
                     and self.query_one(f"#state-{n}", RadioButton).value), states_mod.CHOICES[0])

    def form_dtype(self) -> str:
        return next((n for n in OUTPUT_DTYPES if self.query_one(f"#dtype-{n}", RadioButton).value),
                    "fp32")

    def form_format(self) -> str:
        return next((n for n in WRITERS if self.query_one(f"#fmt-{n}", RadioButton).value),
                    next(iter(WRITERS)))

    def on_mount(self) -> None:
        self.form_changed()
        self.query_one("#merge-out", Input).focus()

    # -- form -----------------------------------------------------------------------------
    def read_form(self) -> MergeRequest:
        shard = self.query_one("#merge-shard", Input).value.strip()
        salvage = self.query("#merge-salvage")
        return MergeRequest(
            out_dir=self.query_one("#merge-out", Input).value.strip(),
            format=self.form_format(),
            max_shard_size=shard_size(shard) if shard else None,
            force=self.query_one("#merge-force", Checkbox).value,
            salvage=bool(salvage) and salvage.first(Checkbox).value,
            dtype=self.form_dtype(),
            peft=bool(self.query("#merge-peft")) and self.query_one("#merge-peft", Checkbox).value,
            state=self.form_state(),
        )

    @on(Button.Pressed, "#merge-start")
    @on(Input.Submitted, "#merge-out, #merge-shard")
    def start(self) -> None:
        try:
            request = self.read_form()
            if not request.out_dir:
                raise ZinspectError("give an output directory")
            writer(request.format).check(OUTPUT_DTYPES[request.dtype])  # dtype, torch
        except ZinspectError as e:
            self.query_one("#merge-form-error", Static).update(error_text("Cannot merge", e))
            return
        self.query_one(ContentSwitcher).current = "merge-running"
        self.set_focus(None)  # a hidden form field kept it: q and every key went into it
        self.query_one("#merge-target", Label).update(
            f"Writing {request.format} to {display_path(request.out_dir)}")
        self.run_merge(request, *self.query_one(WorkProgressPanel).start())
        # SIGTERM/SIGHUP (Textual leaves them fatal) end the app as `q` does: the worker is
        # cancelled and removes its partial output before the process exits
        for sig in (signal.SIGTERM, signal.SIGHUP):
            asyncio.get_running_loop().add_signal_handler(sig, self.app.exit, None, 128 + sig)

    @on(Button.Pressed, "#merge-close-form, #merge-close")
    def close(self) -> None:
        self.dismiss()

    @on(Button.Pressed, "#merge-back")
    def back_to_form(self) -> None:
        self.query_one(ContentSwitcher).current = "merge-form"
        self.query_one("#merge-out", Input).focus()  # not the hidden "Back" button

    def action_cancel(self) -> None:
        if self.query_one(ContentSwitcher).current == "merge-running":
            self.query_one(WorkProgressPanel).cancel()
        else:
            self.dismiss()

    # -- the work -------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="merge",
          description="merging to fp32")
    def run_merge(self, request: MergeRequest, progress: Progress,
                  stop_requested: ShouldStop) -> MergeResult:
        worker = get_current_worker()
        return merge(
            self.view.ckpt, request.out_dir, selection=self.view.selection, fmt=request.format,
            max_shard_size=request.max_shard_size, force=request.force, salvage=request.salvage,
            progress=progress, should_stop=lambda: stop_requested() or worker.is_cancelled,
            dtype=request.dtype, peft=request.peft, state=request.state,
        )

    @on(Worker.StateChanged)
    def merge_finished(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "merge":
            return
        if event.state == WorkerState.SUCCESS:
            self.show_outcome(self.result_text(event.worker.result), ok=True)
        elif event.state == WorkerState.ERROR:
            error = event.worker.error
            title = "Cancelled" if isinstance(error, MergeCancelled) else "The merge failed"
            self.show_outcome(error_text(title, error), ok=False)

    def show_outcome(self, text: Text, ok: bool) -> None:
        self.query_one("#merge-outcome", Static).update(text)
        self.query_one("#merge-back").display = not ok
        self.query_one(ContentSwitcher).current = "merge-done"
        self.query_one("#merge-close", Button).focus()

    def result_text(self, result: MergeResult) -> Text:
        text = Text("Merged\n\n", style="bold green")
        text.append(f"{fmt.count(result.tensors)} tensors, {fmt.size(result.bytes)} in "
                    f"{fmt.duration(result.seconds)} → {display_path(result.out_dir)}\n")
        for path in result.files[:12]:
            text.append(f"  {path.name}  {fmt.size(path.stat().st_size)}\n")
        if len(result.files) > 12:
            text.append(f"  … {len(result.files) - 12} more\n")
        if result.excluded:
            text.append(f"excluded: {fmt.count(len(result.excluded))}\n", style="dim")
        if result.dropped:
            text.append(f"salvage left out {len(result.dropped)}: ", style="yellow")
            text.append(", ".join(list(result.dropped)[:5]))
        if result.states:
            text.append(f"optimizer state: {', '.join(result.states)} + {states_mod.STATE_JSON}\n",
                        style="dim")
        for note in result.notes[:3]:  # files copied, what a universal load leaves out
            text.append(f"\n{fmt.shown(note, 300)}", style="dim")
        if result.warnings:  # NaN/Inf written, replicas that drifted: said, not refused
            text.append(f"\n{len(result.warnings)} warning(s): ", style="yellow")
            text.append("; ".join(fmt.shown(w, 120) for w in result.warnings[:5]))
        return text
