"""The fp32 merge: plan, check the output location, stream every shard to a temporary name, and
rename them into place only when all are complete. After an error or a cancel, nothing is left."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zinspect.core.model import Checkpoint
from zinspect.core.outdir import OutputDir
from zinspect.core.plan import MergePlan, parse_size, plan_merge
from zinspect.core.selection import Selection
from zinspect.core.stream import Progress, ProgressMeter, ShouldStop
from zinspect.core.writers import FORMATS, WRITERS, index_json, plan_shards, require_torch
from zinspect.errors import MergeCancelled, OutputError, UsageError

__all__ = ["MergePlan", "MergeResult", "merge", "parse_size", "plan_merge"]


@dataclass
class MergeResult:
    out_dir: Path
    files: list[Path]
    tensors: int
    bytes: int
    seconds: float
    format: str = "safetensors"
    dropped: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "format": self.format,
                "files": [p.name for p in self.files], "tensors": self.tensors,
                "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "excluded": self.excluded, "dropped": self.dropped}


def merge(ckpt: Checkpoint, out_dir: str | os.PathLike, *, selection: Selection | None = None,
          fmt: str = "safetensors", max_shard_size: int | str | None = None, force: bool = False,
          salvage: bool = False, progress: Progress | None = None,
          should_stop: ShouldStop | None = None, plan: MergePlan | None = None,
          notice: Callable[[str], None] | None = None) -> MergeResult:
    """Write the consolidated fp32 state dict of `ckpt` into `out_dir`.

    `progress(done_bytes, total_bytes, current_name)` is called about 20 times a second;
    `should_stop()` is polled between chunks and, when true, cancels (MergeCancelled);
    `notice(text)` hears what was done to OUT_DIR besides the output (a dead merge's lock taken
    over, its partial files removed). OUT_DIR is handled by OutputDir (zinspect.core.outdir)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    if fmt == "pt":
        require_torch()  # before anything is written
    if isinstance(max_shard_size, str):
        max_shard_size = parse_size(max_shard_size)
    started = time.monotonic()
    plan = plan or plan_merge(ckpt, selection, salvage=salvage)
    out_dir = Path(out_dir).expanduser()
    shards = plan_shards(plan.tensors, fmt, max_shard_size)
    names = [s.name for s in shards] + ([FORMATS[fmt][2]] if len(shards) > 1 else [])
    inputs = [*ckpt.path.iterdir()] + ([ckpt.root / "latest"] if ckpt.root else [])
    meter = ProgressMeter(plan.total_bytes, progress)
    try:
        with OutputDir(out_dir, names, inputs=inputs, nbytes=plan.total_bytes, force=force,
                       forbidden_dirs=[ckpt.path] + ([ckpt.root] if ckpt.root else []),
                       notice=notice) as out:
            for shard in shards:
                fd = out.create(shard.name)
                try:
                    WRITERS[fmt](fd, shard, meter, should_stop)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if len(shards) > 1:
                out.write_text(FORMATS[fmt][2], index_json(shards))
            if should_stop is not None and should_stop():
                raise MergeCancelled("merge cancelled; nothing was written")
            final = out.commit()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{out_dir}: the disk is full; nothing was written",
                              "free some space or write to another disk") from e
        raise OutputError(f"{out_dir}: writing failed ({e.strerror or e}); nothing was "
                          "written", "check the output directory") from e
    except KeyboardInterrupt as e:
        raise MergeCancelled("merge interrupted; nothing was written") from e
    return MergeResult(out_dir, final, len(plan.tensors), plan.total_bytes,
                       time.monotonic() - started, fmt, dict(plan.dropped), sorted(plan.excluded))
