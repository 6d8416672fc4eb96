"""Validation of a tensor-parallel checkpoint once described (layouts/tensor_parallel.py):
each tp rank's shard of each param covered once by its fragments and whole in its file, and the
tp ranks' optimizer files saved at one step and stage. Which files are missing or stale and how
the shards tile the full tensors are found when the checkpoint is opened."""

from __future__ import annotations

from collections import Counter

from zinspect.core import codes, coverage, partition
from zinspect.core.layouts.pickled import numel
from zinspect.core.model import Checkpoint, Coords, Finding, Param, RankFile

REPLACE = "restore the tp rank's files from the run (every tp rank saves its own shards)"


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
