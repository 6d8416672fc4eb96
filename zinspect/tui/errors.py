"""How the app tells the user that something failed: one presenter, one worker-outcome path.

`explain()` turns any exception (a ZinspectError, an OSError, a bug) into a `Problem`: what
failed, where, and what to try, every string escaped for the terminal. `WorkerOutcomes` is
mixed into the app and every screen that runs a thread worker: a worker's end reaches its owner
as `worker_succeeded` / `worker_failed`, and a failure the owner does not show in place becomes
one notification. No other code reads `Worker.StateChanged` or formats an exception.
"""

from __future__ import annotations

import inspect
import os
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.worker import Worker, WorkerState

from zinspect.core.fmt import shown
from zinspect.errors import MergeCancelled, NotMergeable, ZinspectError
from zinspect.tui.text import explained

if TYPE_CHECKING:
    from textual.app import App

#: in the app, a validation refusal is answered on the Findings tab and the merge form, not by
#: the CLI commands a NotMergeable's own hint names
NOT_MERGEABLE_HINT = ("the Findings tab (4) says what is wrong; exclude the params it names, "
                      "or tick salvage to write the rest and list what it left out")
BUG_HINT = ("this looks like a zinspect bug: please report it with this message and what "
            "`zinspect info --json PATH` prints")


def _lines(text: str, limit: int = 600) -> str:
    """Escaped line by line: a message's own line breaks stay, a forged one cannot add any."""
    return "\n".join(shown(line, limit) for line in str(text).split("\n"))


@dataclass(frozen=True)
class Problem:
    """A failure as the user reads it. Every field is already escaped."""

    title: str  # "The deep check failed", "Cancelled"
    message: str  # what happened, naming the file / param / record
    hint: str = ""  # what to try
    where: str = ""  # for an unexpected error: the code it came from
    severity: str = "error"  # or "information" for a cancel

    def text(self) -> Text:
        """For a place on screen (the load error, the merge dialog)."""
        text = Text(f"{self.title}\n\n", style="bold" if self.severity != "error" else "bold red")
        return explained(text, self.message, f"at {self.where}" if self.where else "", self.hint,
                         gap="\n\n")

    def notify(self, app: App) -> None:
        """As one notification; errors stay long enough to read the hint."""
        body = self.message + (f"\nat {self.where}" if self.where else "") + \
            (f"\nhint: {self.hint}" if self.hint else "")
        app.notify(body, title=self.title, severity=self.severity,
                   timeout=4 if self.severity == "information" else 10, markup=False)


def explain(error: BaseException, doing: str) -> Problem:
    """`doing` says what was being done, as a worker's description does
    ("reading every byte of the checkpoint")."""
    failed = f"{doing[:1].upper()}{doing[1:]} failed"
    if isinstance(error, MergeCancelled):
        return Problem("Cancelled", _lines(error.message), _lines(error.hint), severity="information")
    if isinstance(error, NotMergeable):
        return Problem(failed, _lines(error.message), NOT_MERGEABLE_HINT)
    if isinstance(error, ZinspectError):
        return Problem(failed, _lines(error.message), _lines(error.hint))
    if isinstance(error, OSError):
        what = error.strerror or str(error) or type(error).__name__
        path = f"{shown(os.fsdecode(error.filename), 300)}: " if error.filename is not None else ""
        return Problem(failed, f"{path}{shown(what, 300)}",
                       "check that the file is still there and readable, then press v to read "
                       "the checkpoint again")
    detail = str(error)
    message = f"{type(error).__name__}: {detail}" if detail else f"{type(error).__name__} raised"
    return Problem(failed, _lines(message), BUG_HINT, where=_origin(error))


def _origin(error: BaseException) -> str:
    """The innermost frame of zinspect's own code the error passed through, `zinspect/core/
    deep.py:88 in deep_check` (else the innermost frame): where to look, without a traceback."""
    marker = f"{os.sep}zinspect{os.sep}"
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    frame = ([f for f in frames if marker in f.filename] or frames)[-1]
    path = (f"zinspect/{frame.filename.rsplit(marker, 1)[1]}" if marker in frame.filename
            else os.path.basename(frame.filename))
    return shown(f"{path}:{frame.lineno} in {frame.name}", 200)


class WorkerOutcomes:
    """Mixed into the app and each screen that starts thread workers (before the Textual base
    class). Override `worker_succeeded` and, to show a failure in place, `worker_failed`."""

    async def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state == WorkerState.SUCCESS:
            await _settle(self.worker_succeeded(worker.group, worker.result))
        elif event.state == WorkerState.ERROR:
            problem = explain(worker.error, worker.description or "the work")
            if not await _settle(self.worker_failed(worker.group, problem)):
                problem.notify(self.app)  # type: ignore[attr-defined]

    def worker_succeeded(self, group: str, result: Any) -> Any:
        """The worker of `group` returned `result` (may be a coroutine)."""

    def worker_failed(self, group: str, problem: Problem) -> Any:
        """The worker of `group` failed; return True when the failure is shown in place
        (may be a coroutine). By default it becomes a notification."""
        return False


async def _settle(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
