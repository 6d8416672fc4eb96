"""The headless core: parse, validate, plan and merge. Imports neither textual nor torch."""

from __future__ import annotations

import os
from collections.abc import Callable

from zinspect.core.gcpause import gc_paused  # the one rule: re-entrant, thread-safe
from zinspect.core.load import load_checkpoint
from zinspect.core.model import Checkpoint
from zinspect.core.validate import validate


def open_checkpoint(path: str | os.PathLike, tag: str | None = None,
                    progress: Callable[[int, int, str], None] | None = None) -> Checkpoint:
    """Read a checkpoint's metadata (no tensor bytes) and validate it.

    PATH is the dir holding `latest` or a tag dir itself; `tag` picks another tag;
    `progress(files_done, files_total, file_name)` follows the reading of the rank files."""
    with gc_paused():
        ckpt = load_checkpoint(path, tag, progress)
        validate(ckpt)
    return ckpt


__all__ = ["Checkpoint", "gc_paused", "open_checkpoint"]
