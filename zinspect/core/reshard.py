"""Reshard a ZeRO checkpoint to another data-parallel world size: the files DeepSpeed itself would
have saved had the run used N ranks, so a stock engine at N resumes with `load_checkpoint()`.
Tensor, pipeline and expert parallelism are kept: each tp rank's / stage's files are a ZeRO
checkpoint over dp, resharded alike (`zinspect.core.reshard_slices`).

The optimizer state of a ZeRO rank is a slice of flat groups (ZeRO-1/2, BF16_Optimizer: each
param group flattened, padded to a multiple of 2*N and cut into N partitions; ZeRO-3: each param
cut into ceil(n/N) per rank, the pieces of a sub-group concatenated). Every per-element state
(the fp32 masters, Adam's exp_avg and exp_avg_sq) follows the same slicing, so each new rank's
tensors are runs of byte ranges of the old files plus zero padding: planned here from the
checkpoint model (`zinspect.core.reshard_zero`), then streamed once, verified, into new
torch.save files (`zinspect.core.torchsave`) under a temporary name, renamed into place at the
end, `latest` written last as DeepSpeed does. The pickles' non-tensor parts (ds_config, loss
scaler, param_groups, ...) are written back as the source files hold them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zinspect.core.fmt import shown
from zinspect.core.model import Checkpoint
from zinspect.core.outdir import OutputDir, temp_name, writing_failed
from zinspect.core.reshard_slices import LAYOUT_NAMES, RESHARDABLE, refusal, reshape
from zinspect.core.reshard_verify import AnyOrderVerification
from zinspect.core.stream import Progress, ProgressMeter, ShouldStop, copy_tensors
from zinspect.core.torchsave import FilesSink, output_bytes, stream_tensors
from zinspect.errors import MergeCancelled, NotMergeable, OutputError, UsageError

#: ZeRO-0 needs no reshard: DeepSpeed 0.19.8 engines load it at another data-parallel size
#: holding every master and moment unchanged (tests/test_reshard_zero0.py)
_WHOLE_STATES = ("ZeRO-0 keeps whole optimizer states, not partitions: it loads at any data-parallel "
                 "size as it is")
#: why a layout is refused, and what to do instead
REFUSED = {
    "zero0": _WHOLE_STATES,
    "tensor_parallel_zero0": f"{_WHOLE_STATES}, its tensor-parallel size kept",
    "universal": "a universal checkpoint loads at any data-parallel size as it is, with "
                 "\"checkpoint\": {\"load_universal\": true}",
}


@dataclass
class ReshardResult:
    out_dir: Path
    tag: str
    files: list[Path]
    world_size: int
    source_world_size: int
    stage: int
    bytes: int
    seconds: float
    verified: int = 0  # zip records read whole and CRC-checked
    unverified: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "tag": self.tag,
                "files": [p.name for p in self.files], "world_size": self.world_size,
                "source_world_size": self.source_world_size, "stage": self.stage,
                "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "verified_records": self.verified, "unverified_records": self.unverified,
                "notes": self.notes}


def check_reshardable(ckpt: Checkpoint, world_size: int, what: str = "resharded",
                      layouts: tuple[str, ...] = RESHARDABLE) -> None:
    """Refuse (NotMergeable, naming why) what cannot be `what` (resharded, converted) correctly
    (`layouts`: the layouts that can)."""
    where = shown(str(ckpt.path))
    if world_size < 1:
        raise UsageError(f"--world-size must be at least 1 (got {world_size})", "e.g. --world-size 4")
    if ckpt.layout not in layouts:
        a = "an" if ckpt.layout[:1] in "aeiou" else "a"
        if what == "resharded" and ckpt.layout in REFUSED:
            raise NotMergeable(f"{where}: {a} {ckpt.layout} checkpoint needs no reshard",
                               REFUSED[ckpt.layout])
        can = ", ".join(LAYOUT_NAMES[x] for x in layouts if x in LAYOUT_NAMES)
        raise NotMergeable(f"{where}: {a} {ckpt.layout} checkpoint cannot be {what} (only {can} "
                           "checkpoints can)", "give a plain ZeRO checkpoint")
    if what == "resharded" and (why := refusal(ckpt)):
        raise NotMergeable(f"{where}: {why[0]}", why[1])
    if ckpt.errors:
        first = ckpt.errors[0]
        raise NotMergeable(f"{where}: validation found {len(ckpt.errors)} error(s), the first: "
                           f"{first.message}", "run `zinspect validate` for details; a "
                           f"damaged checkpoint cannot be {what}")
    odd = set(ckpt.features or ()) & {"nvme", "mics"}
    if odd:
        raise NotMergeable(f"{where}: a run with {', '.join(sorted(odd))} cannot be {what}",
                           "give a plain ZeRO checkpoint")


def reshard(ckpt: Checkpoint, out_dir: str | os.PathLike, world_size: int, *,
            force: bool = False, progress: Progress | None = None,
            should_stop: ShouldStop | None = None, notice: Callable[[str], None] | None = None,
            ready: Callable[[], None] | None = None) -> ReshardResult:
    """Write `ckpt` resharded for `world_size` ranks (every rank: dp x tp x pp) into OUT_DIR/<tag>/ and
    OUT_DIR/latest. Every source byte read is CRC-checked; nothing is written under a final
    name until everything was read and written; a failure or cancel leaves nothing behind."""
    from zinspect.core.reshard_zero import plan_units

    check_reshardable(ckpt, world_size)
    started = time.monotonic()
    out_dir = Path(out_dir).expanduser()
    forbidden = [ckpt.path] + ([ckpt.root] if ckpt.root else [])
    if out_dir.resolve() in [d.resolve() for d in forbidden]:
        raise OutputError(f"{out_dir}: is the checkpoint's own directory",
                          "write the resharded checkpoint to a directory of its own")
    latest = out_dir / "latest"
    if os.path.lexists(latest) and not force:
        raise OutputError(f"{out_dir}: already holds a `latest`",
                          "pick an empty or new directory, or pass --force to replace it")
    rs = reshape(ckpt, world_size)
    units, notes = plan_units(ckpt, rs)
    # pass 1, planning one rank's files at a time and keeping only their names and sizes:
    # the output dir's names and space, the progress total
    names, nbytes, total = [], 0, 0
    for unit in units:
        files = unit()
        names += [f.name for f in files]
        nbytes += output_bytes(files)
        total += sum(t.src_nbytes for t in stream_tensors(files))
    meter = ProgressMeter(total, progress)
    verification = meter.verification = AnyOrderVerification()
    inputs = [*ckpt.path.iterdir()] + ([ckpt.root / "latest"] if ckpt.root else [])
    try:
        with OutputDir(out_dir / ckpt.tag, names, inputs=inputs, forbidden_dirs=forbidden,
                       nbytes=nbytes, force=force, notice=notice) as out:
            if ready is not None:
                ready()

            def done(name: str, fd: int) -> None:
                os.fsync(fd)
                os.close(fd)

            for unit in units:  # pass 2: planned again, streamed, dropped
                files = unit()
                sink = FilesSink(files, out.create, done)
                copy_tensors(stream_tensors(files), sink, meter, should_stop)
                sink.finish()
                if should_stop is not None and should_stop():
                    raise MergeCancelled("reshard cancelled; nothing was written")
            verification.finish()
            verification.check_unchanged()
            final = out.commit()
            _write_latest(out_dir, ckpt.tag)
    except OSError as e:
        raise writing_failed(out_dir, e) from e
    except KeyboardInterrupt as e:
        raise MergeCancelled("reshard interrupted; nothing was written") from e
    return ReshardResult(out_dir, ckpt.tag, final, world_size, ckpt.world_size or 0,
                         ckpt.stage or 0, nbytes, time.monotonic() - started,
                         len(verification.checks), [], list(dict.fromkeys(notes)))


def _write_latest(out_dir: Path, tag: str) -> None:
    """`latest` names the tag (no newline, as DeepSpeed writes it), replaced by rename."""
    tmp = out_dir / temp_name("latest")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, tag.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, out_dir / "latest")
