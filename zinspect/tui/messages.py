"""Messages the app's workers and widgets post to each other."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from textual.message import Message
from textual.worker import Worker

from zinspect.core.model import Finding

if TYPE_CHECKING:
    from zinspect.tui.inspection import Inspection


@dataclass
class _Progress(Message):
    done: int
    total: int
    name: str

    def can_replace(self, message: Message) -> bool:
        """A newer report of the same work makes an older one still in the queue moot."""
        return type(message) is type(self)


class WorkProgress(_Progress):
    """Posted from a merge or deep-check worker (bytes), at most a few dozen times a second."""


class LoadProgress(_Progress):
    """Posted from the load worker as each rank file's metadata is read (files)."""


@dataclass
class Loaded(Message):
    """Posted by the load worker as soon as the checkpoint is read, before it validates it: the
    tabs are drawn from `view` while the findings are still being made (the worker's result).
    The UI sets `drawn` once they are on screen: the worker waits for it, so as not to take
    the interpreter from the first paint."""

    view: Inspection
    worker: Worker
    drawn: threading.Event = field(default_factory=threading.Event)


@dataclass
class ExclusionToggled(Message):
    """The user asked to exclude (or include again) these parameters."""

    names: list[str]
    what: str  # for messages: a param name or "module (12 params)"


@dataclass
class ParamChosen(Message):
    """The user picked a parameter to look at in detail."""

    name: str


@dataclass
class FindingChosen(Message):
    """The user picked a finding: show its param or rank."""

    finding: Finding
