"""One exception type per kind of failure, each carrying a message that says what, where and what to try.

They are raised by the headless core and caught at the edges: the CLI turns them into exit codes,
the app into notifications. None of them is ever shown as a traceback.
"""

from __future__ import annotations


class ZinspectError(Exception):
    """Base class. `hint` says what the user can do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class CheckpointNotFound(ZinspectError):
    """The path does not lead to a checkpoint tag dir (no `latest`, no such tag, empty dir...)."""


class UnreadableFile(ZinspectError):
    """A file could not be parsed as a torch.save file (not a zip, truncated pickle, hostile pickle...)."""

    #: the globals its pickle named before it broke (a payload may sit before the damage)
    unknown_globals: frozenset[str] = frozenset()


class NotMergeable(ZinspectError):
    """Validation found errors (or an unsupported layout) that make a correct merge impossible."""

    exit_code = 1


class OutputError(ZinspectError):
    """The output location is unusable: exists without --force, inside the checkpoint, no space..."""


class MergeCancelled(ZinspectError):
    """The user stopped a merge (nothing was written) or a deep check (no findings added)."""

    exit_code = 130


class MissingDependency(ZinspectError):
    """An optional package is needed for what was asked (torch for .pt output and tensors)."""


class UsageError(ZinspectError):
    """Bad arguments: an unknown format, a malformed shard size, a bad selection file."""
