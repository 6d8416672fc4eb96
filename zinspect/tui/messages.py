"""Messages the app's workers and widgets post to each other."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from zinspect.core.model import Finding


@dataclass
class WorkProgress(Message):
    """Posted from a merge or deep-check worker, at most a few dozen times a second."""

    done: int
    total: int
    name: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, WorkProgress)


@dataclass
class LoadProgress(Message):
    """Posted from the load worker as each rank file's metadata is read."""

    done: int
    total: int
    name: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LoadProgress)


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
