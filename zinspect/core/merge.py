"""The fp32 merge: plan, check the output location, stream every shard to a temporary name, and
rename them into place only when all are complete. After an error or a cancel, nothing is left."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zinspect.core import hf
from zinspect.core import states as states_mod
from zinspect.core.drift import DRIFT, drift_axes, drift_finding, drift_warning
from zinspect.core.dtypes import NARROW, output_dtype
from zinspect.core.model import WARNING, Checkpoint, Finding
from zinspect.core.outdir import OutputDir, writing_failed
from zinspect.core.plan import MergePlan, parse_size, plan_merge
from zinspect.core.selection import Selection
from zinspect.core.stats import tensor_nonfinite
from zinspect.core.stream import Progress, ProgressMeter, ShouldStop
from zinspect.core.verify import Verification, plan_without
from zinspect.core.writers import WRITERS, index_json, plan_shards, writer
from zinspect.errors import MergeCancelled, NotMergeable, UsageError

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
    #: zip records read whole and CRC-checked; records read only in part ("file: record")
    verified: int = 0
    unverified: list[str] = field(default_factory=list)
    nonfinite: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (NaN, Inf)
    format_dtype: str = "float32"
    overflow: dict[str, int] = field(default_factory=dict)  # 16-bit output: name -> finite->inf
    notes: list[str] = field(default_factory=list)  # what hf.prepare did (files copied...)
    #: params whose copies differ from the one written: name -> {tp rank or stage: max |a-b|}
    drift: dict[str, dict[int, float]] = field(default_factory=dict)
    states: list[str] = field(default_factory=list)  # optimizer states written (--state all)
    #: what each drifted param's copies are on ("tp" ranks or pipeline "stage"s; DRIFT)
    drift_axis: dict[str, str] = field(default_factory=dict)
    #: elements of each tensor with NaN/Inf (for its findings' "n of N values")
    nonfinite_numel: dict[str, int] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """NaN/Inf written, overflows, replicas that drifted, one line per param (warnings:
        --strict refuses instead)."""
        return [nonfinite_warning(name, nan, inf) for name, (nan, inf) in self.nonfinite.items()] + [
            f"{name}: {n:,} finite values overflowed to +-inf in {self.format_dtype}"
            for name, n in self.overflow.items()] + [
            drift_warning(name, ranks, self.drift_axis.get(name, "tp"))
            for name, ranks in self.drift.items()]

    @property
    def findings(self) -> list[Finding]:
        """What the stream found that validation could not: NaN/Inf written (the codes and
        words of validate --deep, stats and diff) and copies that drifted."""
        return [f for name, (nan, inf) in self.nonfinite.items() for f in tensor_nonfinite(
                    name, self.nonfinite_numel.get(name, 0), nan, inf, "the output")] + [
            drift_finding(name, ranks, self.drift_axis.get(name, "tp"))
            for name, ranks in self.drift.items()]

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "format": self.format,
                "files": [p.name for p in self.files], "tensors": self.tensors,
                "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "excluded": self.excluded, "dropped": self.dropped,
                "verified_records": self.verified, "unverified_records": self.unverified,
                "nonfinite": {n: {"nan": a, "inf": b} for n, (a, b) in self.nonfinite.items()},
                "warnings": self.warnings, "dtype": self.format_dtype, "overflow": self.overflow,
                "notes": self.notes,
                "drift": {n: {str(t): d for t, d in r.items()} for n, r in self.drift.items()},
                "findings": [f.to_json() for f in self.findings], "states": self.states}


def merge(ckpt: Checkpoint, out_dir: str | os.PathLike, *, selection: Selection | None = None,
          fmt: str = "safetensors", max_shard_size: int | str | None = None, force: bool = False,
          salvage: bool = False, progress: Progress | None = None,
          should_stop: ShouldStop | None = None, plan: MergePlan | None = None,
          notice: Callable[[str], None] | None = None,
          ready: Callable[[], None] | None = None, strict: bool = False, dtype: str = "fp32",
          peft: bool = False, hf_files: bool = True, output: hf.Output | None = None,
          state: str = "weights") -> MergeResult:
    """Write the consolidated fp32 state dict of `ckpt` into `out_dir`.

    `progress(done_bytes, total_bytes, current_name)` is called about 20 times a second;
    `should_stop()` is polled between chunks and, when true, cancels (MergeCancelled);
    `notice(text)` hears what was done to OUT_DIR besides the output (a dead merge's lock taken
    over, its partial files removed); `ready()` is called once OUT_DIR passed its checks and
    is locked, before a byte is written (the CLI announces the merge then, not before a refusal).
    OUT_DIR is handled by OutputDir (zinspect.core.outdir).

    Every zip record read whole is CRC-checked as it streams, the source files are pinned and
    re-checked before the commit, NaN/Inf are counted per param (`zinspect.core.verify`). A
    bad record refuses (NotMergeable, nothing written); under `salvage` the stream goes on to
    find every bad record, the output is thrown away and the merge restarts without their
    params (so the common, intact case reads once). `strict` refuses validation warnings
    and NaN/Inf. `dtype` (fp32, bf16, fp16) is the float output; `hf.prepare` shapes the output
    (`peft`: the adapter alone; `hf_files`: copy config/tokenizer files), or pass its `output`.
    `state` "all" writes the Adam moments beside the weights (`zinspect.core.states`)."""
    if isinstance(max_shard_size, str):
        max_shard_size = parse_size(max_shard_size)
    started = time.monotonic()
    try:
        dtype = output_dtype(dtype)
    except ValueError as e:
        raise UsageError(str(e), "e.g. --dtype bf16") from e
    w = writer(fmt)
    w.check(dtype)  # before anything is written
    if w.tree is not None:
        return _write_tree(w, ckpt, out_dir, selection=selection, salvage=salvage, peft=peft,
                           state=state, strict=strict, force=force, progress=progress,
                           should_stop=should_stop, notice=notice, ready=ready)
    if output is None:
        plan = plan or plan_merge(ckpt, selection, salvage=salvage, dtype=dtype)
        output = hf.prepare(ckpt, plan, peft=peft, copy_files=hf_files)
    if state not in states_mod.CHOICES:
        raise UsageError(f"unknown --state {state!r}", f"use one of: {', '.join(states_mod.CHOICES)}")
    if state == "all" and output.states is None:
        if output.peft:
            raise UsageError("--state all writes the whole model's optimizer state, not an "
                             "adapter's", "leave out --peft or --state all")
        output.states = states_mod.plan_states(ckpt, output.plan, salvage)
    plan = output.plan
    if strict:
        refuse_warnings(ckpt, plan)
    out_dir = Path(out_dir).expanduser()
    while True:
        try:
            return _attempt(ckpt, output, out_dir, fmt, max_shard_size, force, salvage, strict,
                            progress, should_stop, notice, ready, started)
        except _Restart as e:
            output.plan, ready = plan_without(output.plan, e.failures), None  # announced once
            if output.states is not None:  # a bad moment record drops its params' weights too
                output.states = output.states.without(set(output.plan.dropped))


def _write_tree(w, ckpt: Checkpoint, out_dir, *, selection, salvage, peft, state, strict,
                **callbacks) -> MergeResult:
    """A tree writer (`--format universal`): it writes every param itself; what it cannot
    honour is refused, not ignored."""
    asked = [opt for opt, on in (("--exclude / a selection", bool(selection and (
        selection.exclude_globs or selection.exclude_frozen or selection.excluded(ckpt)))),
        ("--salvage", salvage), ("--peft", peft)) if on]
    if asked:
        raise UsageError(f"--format {w.name} writes every param: {', '.join(asked)} cannot apply",
                         f"leave out {', '.join(asked)}, or use --format {next(iter(WRITERS))}")
    if state not in states_mod.CHOICES:
        raise UsageError(f"unknown --state {state!r}", f"use one of: {', '.join(states_mod.CHOICES)}")
    plan = plan_merge(ckpt)  # the same validation refusals as every merge
    if strict:
        refuse_warnings(ckpt, plan)
    r = w.tree(ckpt, Path(out_dir).expanduser(), **callbacks)
    return MergeResult(r.out_dir, r.files, len(r.files), r.bytes, r.seconds, w.name,
                       verified=r.verified, unverified=list(r.unverified), notes=list(r.notes),
                       states=["fp32", *states_mod.MOMENTS])


class _Restart(Exception):  # noqa: N818 (control flow, never seen outside merge)
    def __init__(self, failures: list) -> None:
        self.failures = failures


def _attempt(ckpt, output, out_dir, fmt, max_shard_size, force, salvage, strict, progress,
             should_stop, notice, ready, started) -> MergeResult:
    plan = output.plan
    w = writer(fmt)
    files = {None: hf.shards_of(output, fmt, max_shard_size)}  # stem -> shards (None: weights)
    if output.states is not None:
        files.update({s: plan_shards(ts, fmt, max_shard_size, stem=s)
                      for s, ts in output.states.tensors.items()})
    names = []
    for stem, shards in files.items():
        names += [s.name for s in shards] + ([w.index_name(stem)] if len(shards) > 1 else [])
    names += list(output.copies) + ([states_mod.STATE_JSON] if output.states is not None else [])
    inputs = [*ckpt.path.iterdir()] + ([ckpt.root / "latest"] if ckpt.root else [])
    streamed = [t for shards in files.values() for s in shards for t in s.tensors]
    total = sum(t.nbytes for t in streamed)
    meter = ProgressMeter(total, progress)
    verification = meter.verification = Verification(streamed, salvage=salvage,
                                                     shown=_shown_in(ckpt))
    try:
        with OutputDir(out_dir, names, inputs=inputs, nbytes=total, force=force,
                       forbidden_dirs=[ckpt.path] + ([ckpt.root] if ckpt.root else []),
                       notice=notice) as out:
            if ready is not None:
                ready()
            for stem, shards in files.items():
                for shard in shards:
                    fd = out.create(shard.name)
                    try:
                        w.write(fd, shard, meter, should_stop)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                if len(shards) > 1:
                    out.write_text(w.index_name(stem), index_json(shards))
            if output.states is not None:
                out.write_text(states_mod.STATE_JSON, states_mod.state_json(
                    ckpt, output.states, {s: [sh.name for sh in files[s]] for s in output.states.tensors}))
            hf.copy_into(out, output.copies)
            if should_stop is not None and should_stop():
                raise MergeCancelled("merge cancelled; nothing was written")
            verification.check_unchanged()
            failures = verification.failures()
            if failures:
                raise _Restart(failures)  # only under salvage: the stream refuses otherwise
            if strict and verification.nonfinite:
                raise NotMergeable("; ".join(nonfinite_warning(n, a, b) for n, (a, b) in
                                             list(verification.nonfinite.items())[:5])
                                   + "; nothing was written (--strict)", NONFINITE_HINT)
            if strict and verification.drift:
                axes = drift_axes(plan)
                drifted = list(verification.drift.items())[:5]
                raise NotMergeable("; ".join(drift_warning(n, r, axes.get(n, "tp")) for n, r in
                                             drifted) + "; nothing was written (--strict)",
                                   DRIFT[axes.get(drifted[0][0], "tp")][3])
            final = out.commit()
    except OSError as e:
        raise writing_failed(out_dir, e) from e
    except KeyboardInterrupt as e:
        raise MergeCancelled("merge interrupted; nothing was written") from e
    dropped = {**plan.dropped, **(output.states.dropped if output.states else {})}
    return MergeResult(out_dir, final, len(streamed), total,
                       time.monotonic() - started, fmt, dropped, sorted(plan.excluded),
                       len(verification.checks),
                       [f"{c.file}: {c.record}" for c in verification.unverified],
                       dict(verification.nonfinite),
                       next((t.dtype for t in plan.tensors if t.dtype in NARROW), "float32"),
                       dict(meter.overflow), list(output.notes), dict(verification.drift),
                       list(output.states.tensors) if output.states else [],
                       {n: a for n, a in drift_axes(plan).items() if n in verification.drift},
                       {t.name: t.numel for t in plan.tensors if t.name in verification.nonfinite})


NONFINITE_HINT = ("training diverged before this save (or the bytes are corrupt); use an "
                  "earlier checkpoint, or --exclude the params")


def nonfinite_warning(name: str, nan: int, inf: int) -> str:
    what = " and ".join(f"{n:,} {w}" for n, w in ((nan, "NaN"), (inf, "Inf")) if n)
    return f"{name}: {what} values written"


def refuse_warnings(ckpt: Checkpoint, plan: MergePlan) -> None:
    """--strict: any validation warning about what is written refuses the merge."""
    warned = [f for f in ckpt.findings if f.severity == WARNING and
              not (f.param is not None and f.param in plan.excluded)]
    if warned:
        lines = "\n".join(f"  - {f.message}" for f in warned[:8])
        raise NotMergeable(f"{ckpt.path}: --strict: validation found {len(warned)} "
                           f"warning(s):\n{lines}", "run `zinspect validate` for details, or "
                           "merge without --strict")


def _shown_in(ckpt: Checkpoint):
    def shown(path: str) -> str:
        p = Path(path)
        return p.name if p.parent == ckpt.path else str(p)
    return shown
