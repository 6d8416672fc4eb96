"""`d`: the deep check in the app: every byte read (zip CRCs, NaN/Inf per param), with live
progress; escape cancels. Dismissed with the new findings, or None when cancelled or failed."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.worker import get_current_worker

from zinspect.core import fmt
from zinspect.core.deep import deep_check
from zinspect.core.model import Checkpoint, Finding
from zinspect.core.stream import Progress, ShouldStop
from zinspect.tui.errors import Problem, WorkerOutcomes
from zinspect.tui.widgets.work_progress import WorkProgressPanel, running_dialog


class DeepCheckScreen(WorkerOutcomes, ModalScreen[list[Finding] | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="cancel-deep-check",
                        tooltip="cancel the deep check (the findings stay as they were)")]

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__()
        self.ckpt = ckpt

    def compose(self) -> ComposeResult:
        readable = [f for f in self.ckpt.files if f.readable]
        yield running_dialog("deep-check", "Deep check", f"Reading every byte of {len(readable)} "
                             f"files ({fmt.size(sum(f.size for f in readable))}): zip CRCs, "
                             "NaN/Inf, the copies a merge compares")

    def on_mount(self) -> None:
        self.run_check(*self.query_one(WorkProgressPanel).start())

    def action_cancel(self) -> None:
        self.query_one(WorkProgressPanel).cancel()

    @work(thread=True, exclusive=True, exit_on_error=False, group="deep-check",
          description="reading every byte of the checkpoint")
    def run_check(self, progress: Progress, stop_requested: ShouldStop) -> list[Finding]:
        worker = get_current_worker()
        return deep_check(self.ckpt, progress=progress,
                          should_stop=lambda: stop_requested() or worker.is_cancelled)

    def worker_succeeded(self, group: str, result: list[Finding]) -> None:
        self.dismiss(result)

    def worker_failed(self, group: str, problem: Problem) -> bool:
        self.dismiss(None)
        return False  # the app's notification says why
