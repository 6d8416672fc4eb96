"""`m`: the merge dialog, then live progress (escape cancels), then the result or the error."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

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

from zinspect.core import fmt, peft
from zinspect.core.dtypes import OUTPUT_DTYPES
from zinspect.core.merge import MergeResult, merge, parse_size
from zinspect.core.plan import output_nbytes, plan_merge
from zinspect.core.stream import Progress, ShouldStop
from zinspect.core.writers import WRITERS, writer
from zinspect.errors import MergeCancelled, NotMergeable, UsageError, ZinspectError
from zinspect.tui.inspection import Inspection, default_output_dir, display_path
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


#: the app's hint for a merge validation refuses: the CLI's names `zinspect validate`/--salvage
APP_NOT_MERGEABLE_HINT = ("the Findings tab (4) says what is wrong; exclude the params it names, "
                          "or tick salvage to write the rest and list what it left out")


def error_text(title: str, error: BaseException) -> Text:
    text = Text(f"{title}\n\n", style="bold red")
    if isinstance(error, ZinspectError):
        text.append(error.message)
        hint = APP_NOT_MERGEABLE_HINT if isinstance(error, NotMergeable) else error.hint
        if hint:
            text.append("\n\nhint: ", style="bold")
            text.append(hint)
    else:
        text.append(f"{type(error).__name__}: {error}")
    return text


def shard_size(text: str) -> int:
    """The form's shard size; anything parse_size cannot make a byte count of is a UsageError."""
    try:
        return parse_size(text)
    except (ValueError, OverflowError) as e:  # e.g. '1' and 400 zeros: float('inf')
        raise UsageError(f"bad size {text!r}", "use a number with a unit, e.g. 500MB, 5GB") from e


class MergeScreen(ModalScreen[None]):
    """Three faces in a ContentSwitcher: #merge-form, #merge-running, #merge-done."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="cancel-merge")]

    def __init__(self, view: Inspection) -> None:
        super().__init__()
        self.view = view

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="merge", classes="dialog") as box:  # scrolls at 80x24
            box.border_title = "Merge to fp32"
            with ContentSwitcher(initial="merge-form"):
                with Vertical(id="merge-form"):
                    yield Label("Output directory")
                    yield Input(default_output_dir(self.view.ckpt), id="merge-out")
                    with Horizontal(classes="form-row"):
                        with Vertical():
                            yield Label("Format")
                            with RadioSet(id="merge-format"):
                                for i, w in enumerate(WRITERS.values()):
                                    yield RadioButton(w.label or w.name, value=i == 0,
                                                      id=f"fmt-{w.name}")
                        with Vertical():
                            yield Label("Weights")
                            with RadioSet(id="merge-dtype"):
                                for name in OUTPUT_DTYPES:
                                    yield RadioButton(name, value=name == "fp32", id=f"dtype-{name}")
                            if peft.summary(self.view.ckpt) is not None:
                                yield Checkbox("adapter only", id="merge-peft")
                        with Vertical():
                            yield Label("Max shard size")
                            yield Input(placeholder="empty: one file", id="merge-shard")
                    # full width: a third of the dialog cut these labels, at 160 columns too
                    yield Checkbox("overwrite an existing output", id="merge-force")
                    if self.view.ckpt.errors:
                        yield Checkbox("salvage: skip params that cannot be rebuilt",
                                       id="merge-salvage")
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
        if self.salvage_ticked():
            return self.salvage_text()
        out = self.view.output
        text = Text()
        text.append("Writes ", style="dim")
        text.append(f"{fmt.count(out.params)} params + {fmt.count(out.buffers)} buffers, "
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
        text.append(f"{fmt.count(params)} param{'s' * (params != 1)} + "
                    f"{fmt.count(len(plan.tensors) - params)} buffers, "
                    f"{fmt.size(plan.total_bytes)} as fp32", style="bold")
        dropped = list(plan.dropped)
        text.append(f"\nSalvage leaves out {fmt.count(len(dropped))}: ", style="yellow")
        text.append(", ".join(fmt.shown(n, 60) for n in dropped[:4]) + (" …" if len(dropped) > 4 else ""))
        return text

    @on(Checkbox.Changed, "#merge-salvage")
    def salvage_changed(self) -> None:
        self.query_one("#merge-plan", Static).update(self.plan_text(self.form_dtype()))

    def output_nbytes(self, dtype: str) -> int:
        """The preview's size: 16-bit output halves every float, buffers' ints keep theirs."""
        if dtype == "fp32":
            return self.view.output.nbytes
        return output_nbytes(self.view.ckpt, self.view.excluded, OUTPUT_DTYPES[dtype])

    @on(RadioSet.Changed, "#merge-dtype")
    def dtype_changed(self, event: RadioSet.Changed) -> None:
        self.query_one("#merge-plan", Static).update(self.plan_text(self.form_dtype()))

    def form_dtype(self) -> str:
        return next((n for n in OUTPUT_DTYPES if self.query_one(f"#dtype-{n}", RadioButton).value),
                    "fp32")

    def form_format(self) -> str:
        return next((n for n in WRITERS if self.query_one(f"#fmt-{n}", RadioButton).value),
                    next(iter(WRITERS)))

    def on_mount(self) -> None:
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
            dtype=request.dtype, peft=request.peft,
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
        for note in result.notes[:3]:  # files copied, what a universal load leaves out
            text.append(f"\n{fmt.shown(note, 300)}", style="dim")
        if result.warnings:  # NaN/Inf written, replicas that drifted: said, not refused
            text.append(f"\n{len(result.warnings)} warning(s): ", style="yellow")
            text.append("; ".join(fmt.shown(w, 120) for w in result.warnings[:5]))
        return text
