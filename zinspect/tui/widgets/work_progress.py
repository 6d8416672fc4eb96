"""Live progress of byte-counting work in a thread worker (the merge, the deep check)."""

from __future__ import annotations

import threading
import time

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar

from zinspect.core import fmt
from zinspect.core.stream import Progress, ShouldStop
from zinspect.tui.messages import WorkProgress


class WorkProgressPanel(Vertical):
    """A bar, bytes · rate · ETA, and the item at hand; escape's cancel shows as `cancelling …`.

    The worker gets `progress` and `should_stop` from here: `progress` posts a message (thread
    safe, and replaced in the queue when the UI is behind), `should_stop` reads an Event.
    """

    DEFAULT_CSS = """
    WorkProgressPanel { height: auto; }
    WorkProgressPanel > ProgressBar { margin: 1 0; }
    WorkProgressPanel > ProgressBar Bar { width: 1fr; }
    WorkProgressPanel > .work-hint { color: $text-muted; }
    """

    def __init__(self, cancel_hint: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cancel_hint = cancel_hint
        self.stop_requested = threading.Event()
        self.started = time.monotonic()

    def compose(self) -> ComposeResult:
        yield ProgressBar(show_eta=False)
        yield Label("", classes="work-stats")
        yield Label("", classes="work-current")
        yield Label(self.cancel_hint, classes="work-hint")

    def start(self) -> tuple[Progress, ShouldStop]:
        """Reset the display; return the (progress, should_stop) callbacks for the worker."""
        self.stop_requested.clear()
        self.started = time.monotonic()
        self.query_one(ProgressBar).update(total=None, progress=0)
        self.query_one(".work-current", Label).update("")

        def progress(done: int, total: int, name: str) -> None:
            self.post_message(WorkProgress(done, total, name))

        return progress, self.stop_requested.is_set

    def cancel(self) -> None:
        self.stop_requested.set()
        self.query_one(".work-current", Label).update("cancelling …")

    @on(WorkProgress)
    def show(self, event: WorkProgress) -> None:
        event.stop()
        self.query_one(ProgressBar).update(total=event.total, progress=event.done)
        self.query_one(".work-stats", Label).update(
            fmt.progress(event.done, event.total, time.monotonic() - self.started))
        if not self.stop_requested.is_set():
            self.query_one(".work-current", Label).update(f"at {event.name}")


def running_dialog(box_id: str, title: str, what: Text | str) -> Vertical:
    """The dialog a screen shows while its worker reads (the deep check, statistics, the
    optimizer, a compare): what is read, then the live progress; escape cancels."""
    box = Vertical(Label(what), WorkProgressPanel("escape: cancel"), id=box_id, classes="dialog")
    box.border_title = title
    return box
