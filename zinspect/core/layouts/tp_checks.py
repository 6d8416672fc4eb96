"""The checks of a tensor-parallel checkpoint (layouts/tensor_parallel.py): at load, each tp
rank's files present and of this world size (`report_missing`, `check_sizes`); once described
(`validate`, called by core/validate.py), each tp rank's shard of each param held once by its
fragments and whole in its file, and the optimizer files saved at one step and stage. How the
shards tile the full tensors is found when each param is placed."""

from __future__ import annotations

from collections import Counter

from zinspect.core import codes, coverage, partition
from zinspect.core.layouts.base import LoadContext
from zinspect.core.layouts.pickled import numel
from zinspect.core.model import Checkpoint, Coords, Finding, Param, RankFile

REPLACE = "restore the tp rank's files from the run (every tp rank saves its own shards)"


#: missing files of one tp rank named one by one up to this many, then in one finding
NAMED = 8


def global_rank(rf: RankFile, tp: int) -> int | None:
    """A rank file's global rank: dp rank * tp + tp rank."""
    return None if rf.rank is None else rf.rank * tp + rf.coords.tp


def validate(c: Checkpoint) -> list[Finding]:
    """Each tp rank's shard of each param held once by its fragments, whole in its file; the tp
    ranks' optimizer files saved at one step and stage. (Which files are missing or stale, and
    how the shards tile the full tensors, were found when the checkpoint was opened.)"""
    out: list[Finding] = []
    steps = Counter(f.step for f in c.files_of("optim") if f.step is not None)
    stages = Counter(f.stage for f in c.files_of("optim") if f.stage is not None)
    for f in c.files_of("optim"):
        where = dict(file=f.name, rank=global_rank(f, c.topology.tp))
        if len(steps) > 1 and f.step is not None and f.step != steps.most_common(1)[0][0]:
            out.append(codes.finding("step-mismatch", f"{f.name} was saved at optimizer step "
                                     f"{f.step}, the other tp/dp ranks at {steps.most_common(1)[0][0]}",
                                     "a stale file of another save: " + REPLACE, **where))
        if len(stages) > 1 and f.stage is not None and f.stage != stages.most_common(1)[0][0]:
            out.append(codes.finding("stage-mismatch", f"{f.name} is a ZeRO-{f.stage} file, the others "
                                     f"ZeRO-{stages.most_common(1)[0][0]}", REPLACE, **where))
    for p in c.owners():
        for t, shard in sorted(p.shards.items()):
            out.extend(_shard_coverage(c, p, t, numel(shard.shape)))
    return out


def _shard_coverage(c: Checkpoint, p: Param, t: int, n: int) -> list[Finding]:
    held = [f for f in p.fragments if f.shard == t]
    cov = coverage.cover(n, held)
    out = []
    tp = c.topology.tp
    if cov.overlaps:
        a, b = cov.overlaps[0]
        out.append(codes.finding("param-overlap", f"{p.name}: elements {a:,}..{b:,} of tp rank {t}'s "
                                 "shard are held twice", REPLACE, param=p.name))
    if cov.gaps:
        ranks = sorted({r * tp + t for r in _dp_ranks_in(c, p, t, cov.gaps)})
        out.append(codes.finding("param-coverage", f"{p.name}: {cov.missing:,} of the {n:,} elements "
                                 f"of tp rank {t}'s shard are held by no file"
                                 + (f" (rank {', '.join(map(str, ranks))})" if ranks else ""),
                                 REPLACE, param=p.name, rank=ranks[0] if len(ranks) == 1 else None))
    bad = [f for f in held if not f.intact and f.numel]
    if bad:
        out.append(codes.finding("param-truncated", f"{p.name}: the bytes of tp rank {t}'s shard are "
                                 f"not all in {bad[0].file}", "that file is truncated; copy it again",
                                 param=p.name, file=bad[0].file, rank=bad[0].rank * tp + t))
    return out


def _dp_ranks_in(c: Checkpoint, p: Param, t: int, gaps: list[tuple[int, int]]) -> set[int]:
    """The dp ranks whose share of tp rank t's shard falls in the gaps (ZeRO-3: ceil(n/dp)
    elements each; ZeRO-1/2: the flat group's partitions)."""
    dp, n = c.topology.dp, numel(p.shards[t].shape)
    if c.stage == 3:
        part = partition.zero3_share(n, dp)
        return {r for a, b in gaps for r in partition.ranks_of(a, b, part, dp)}
    g = next((g for g in c.groups if g.index == p.sub_group and g.coords == Coords(tp=t)), None)
    if g is None or p.name not in g.params:
        return set()
    part = partition.zero12_partition(g.numel, dp)
    start = sum(numel(c.params[m].shards[t].shape) if c.params.get(m) and t in c.params[m].shards
                else 0 for m in g.params[:g.params.index(p.name)])
    return {r for a, b in gaps for r in partition.ranks_of(start + a, start + b, part, dp)}


# -- the files of each tp rank (at load; `s`: a tensor_parallel.Slice) -----------------------


def check_sizes(ctx: LoadContext, s, tp: int, dp: int) -> None:
    """Each optimizer file of a tp rank is partitioned over this checkpoint's dp ranks (the
    model states' declared sizes are checked by topology.cross_check)."""
    for d, rf in sorted(s.optim.items()):
        if rf.partition_count and rf.partition_count[0] != dp:
            ctx.find("world-size-mismatch", f"{rf.name} is partitioned over {rf.partition_count[0]} "
                     f"dp ranks; this checkpoint has dp {dp}", "it comes from a run of another "
                     "world size; " + REPLACE, file=rf.name, rank=d * tp + s.tp)


def report_missing(ctx: LoadContext, s, tp: int, dp: int) -> None:
    c = ctx.ckpt
    if c.stage == 3:
        missing_files(ctx, s, tp, [d for d in range(dp) if d not in s.models], "missing-tp-rank",
                 "zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt",
                 "its frozen-param partitions are unknown" if s.models else
                 "its shards' shapes are unknown")
    elif 0 not in s.models:
        missing_files(ctx, s, tp, [0], "missing-tp-rank", "mp_rank_{t:02d}_model_states.pt",
                 "its shards' shapes are unknown")
    if s.models and s.state is None:
        ctx.find("missing-tp-rank", f"tp rank {s.tp}'s model states cannot be read", REPLACE,
                 file=next(iter(s.models.values())).name, rank=s.tp)
    if ctx.optim_files:
        prefix = ctx.optim_files[0].prefix
        missing_files(ctx, s, tp, [d for d in range(dp) if d not in s.optim], "missing-optimizer-file",
                 prefix + "zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt",
                 f"its part of tp rank {s.tp}'s shards is lost")


def missing_files(ctx: LoadContext, s, tp: int, ranks: list[int], code: str, pattern: str,
             lost: str) -> None:
    """The files of tp rank `s.tp` missing at these dp ranks: each named, or (more than NAMED)
    one finding naming the first."""
    if len(ranks) > NAMED:
        first = pattern.format(d=ranks[0], t=s.tp)
        ctx.find(code, f"{len(ranks)} files of tp rank {s.tp} are missing ({first} and the dp "
                 f"ranks' {', '.join(map(str, ranks[1:NAMED]))}, ...): {lost}", REPLACE,
                 file=first, rank=ranks[0] * tp + s.tp)
        return
    for d in ranks:
        name = pattern.format(d=d, t=s.tp)
        ctx.find(code, f"{name} (dp rank {d}, tp rank {s.tp}) is missing: {lost}", REPLACE,
                 file=name, rank=d * tp + s.tp)
