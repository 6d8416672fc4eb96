"""The fp32 merge: plan, check the output location, stream every shard to a temporary name, and
rename them into place only when all are complete. After an error or a cancel, nothing is left."""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from zinspect.core.model import Checkpoint
from zinspect.core.plan import MergePlan, parse_size, plan_merge
from zinspect.core.selection import Selection
from zinspect.core.stream import Progress, ProgressMeter, ShouldStop
from zinspect.core.writers import FORMATS, WRITERS, index_json, plan_shards, require_torch
from zinspect.errors import MergeCancelled, OutputError, UsageError

TMP_SUFFIX = ".zinspect-partial"
#: free space kept beyond the output's size
DISK_MARGIN = 64 << 20

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
          should_stop: ShouldStop | None = None, plan: MergePlan | None = None) -> MergeResult:
    """Write the consolidated fp32 state dict of `ckpt` into `out_dir`.

    `progress(done_bytes, total_bytes, current_name)` is called about 20 times a second;
    `should_stop()` is polled between chunks and, when true, cancels (MergeCancelled)."""
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
    try:
        _check_output(ckpt, out_dir, names, plan.total_bytes, force)
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot use it as the output directory "
                          f"({e.strerror or e})", "check the path and its permissions") from e
    meter = ProgressMeter(plan.total_bytes, progress)
    temps: list[Path] = []
    try:
        for shard in shards:
            temps.append(_write_temp(out_dir / shard.name, WRITERS[fmt], shard, meter, should_stop))
        if len(shards) > 1:
            tmp = out_dir / (FORMATS[fmt][2] + TMP_SUFFIX)
            temps.append(tmp)
            _write_text(tmp, index_json(shards))
        final = []
        for tmp in temps:
            target = tmp.with_name(tmp.name.removesuffix(TMP_SUFFIX))
            os.replace(tmp, target)
            final.append(target)
        _fsync_dir(out_dir)
    except BaseException as e:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{out_dir}: the disk is full; nothing was written",
                              "free some space or write to another disk") from e
        if isinstance(e, OSError):
            raise OutputError(f"{out_dir}: writing failed ({e.strerror or e}); nothing was "
                              "written", "check the output directory") from e
        if isinstance(e, KeyboardInterrupt):
            raise MergeCancelled("merge interrupted; nothing was written") from e
        raise
    return MergeResult(out_dir, final, len(plan.tensors), plan.total_bytes,
                       time.monotonic() - started, fmt, dict(plan.dropped), sorted(plan.excluded))


def _write_temp(target: Path, writer, shard, meter, should_stop) -> Path:
    tmp = target.with_name(target.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer(fd, shard, meter, should_stop)
        os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return tmp


def _write_text(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = memoryview(text.encode())
        while len(data):
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_output(ckpt: Checkpoint, out_dir: Path, names: list[str], nbytes: int,
                  force: bool) -> None:
    resolved = out_dir.resolve()
    tag_dir = ckpt.path.resolve()
    if resolved == tag_dir or tag_dir in resolved.parents:
        raise OutputError(f"{out_dir}: is inside the checkpoint's tag dir {ckpt.path}",
                          "write the merged weights somewhere else, e.g. beside the checkpoint")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory",
                          "give a directory for the output")
    if out_dir.is_dir() and not force:
        existing = [p.name for p in out_dir.iterdir()]
        if existing:
            clash = [n for n in names if n in existing]
            what = f"it already holds {', '.join(clash)}" if clash else \
                f"it is not empty ({len(existing)} entries)"
            raise OutputError(f"{out_dir}: {what}",
                              "pick an empty or new directory, or pass --force to overwrite")
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < nbytes + DISK_MARGIN:
        raise OutputError(f"{out_dir}: needs {nbytes:,} bytes, only {free:,} are free",
                          "free some space or write to another disk")
