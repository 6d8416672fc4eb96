"""The checks of a tensor-parallel checkpoint (layouts/tensor_parallel.py): at load, each tp
rank's files present and of this world size (`report_missing`, `check_sizes`); once described
(`validate`, called by core/validate.py), the optimizer files saved at one step and stage. How the
shards tile the full tensors is found when each param is placed (`tensor_parallel.place`); that
each tp rank's shard of each param is held once by its fragments and whole in its file is
`shard_findings`, run by core/validate.py on every layout whose params are tp shards cut into
ZeRO partitions (tensor_parallel, pipeline_tp)."""

from __future__ import annotations

from collections import Counter

from zinspect.core import codes, coverage, partition
from zinspect.core.layouts.base import LoadContext
from zinspect.core.layouts.pickled import numel
from zinspect.core.model import Checkpoint, Finding, Param, RankFile

REPLACE = "restore the tp rank's files from the run (every tp rank saves its own shards)"


#: missing files of one tp rank named one by one up to this many, then in one finding
NAMED = 8


def global_rank(rf: RankFile, tp: int) -> int | None:
    """A rank file's global rank: dp rank * tp + tp rank."""
    return None if rf.rank is None else rf.rank * tp + rf.coords.tp


def grid_rank(c: Checkpoint, pp: int, d: int, t: int) -> int:
    """The global rank of (stage pp, dp rank d, tp rank t) in DeepSpeed's pipe x data x model
    grid (PipeModelDataParallelTopology; without a pipeline, `global_rank`'s)."""
    return (pp * c.topology.dp + d) * c.topology.tp + t


def validate(c: Checkpoint) -> list[Finding]:
    """The tp ranks' optimizer files saved at one step and stage (a pipeline compares its
    stages' files when opened). Which files are missing or stale, and how the shards tile the
    full tensors, were found when the checkpoint was opened; the shards' coverage is
    `shard_findings`."""
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
    return out


def shard_findings(c: Checkpoint) -> list[Finding]:
    """Each tp rank's shard of each param held once by its ZeRO partitions, whole in its file:
    the one rule for every layout whose params are tp shards (`Param.shards`, placed by
    `tensor_parallel.place`) with their masters in optimizer files: tensor_parallel and
    pipeline_tp (its ZeRO-0 bf16 too: BF16_Optimizer files). Not ZeRO-0 with the masters in
    the model states (tensor_parallel_zero0, pipeline_tp's refused fp32): each tp rank's are
    whole tensors of its one file, matched at load (`zero0.attach` names any that fits no order,
    a truncated file is its own finding), as plain ZeRO-0's are."""
    if c.topology.tp < 2 or not c.files_of("optim"):  # no shards (spares a walk over 300k
        return []  # params), or no partitions
    return [f for p in c.owners() for t, shard in sorted(p.shards.items())
            for f in _shard_coverage(c, p, t, numel(shard.shape))]


def _shard_coverage(c: Checkpoint, p: Param, t: int, n: int) -> list[Finding]:
    held = [f for f in p.fragments if f.shard == t]
    cov = coverage.cover(n, held)
    out = []
    if cov.overlaps:
        a, b = cov.overlaps[0]
        out.append(codes.finding("param-overlap", f"{p.name}: elements {a:,}..{b:,} of tp rank {t}'s "
                                 "shard are held twice", REPLACE, param=p.name))
    pp = _stage_of(c, p, t) if cov.gaps or any(not f.intact for f in held) else 0
    if cov.gaps:
        dps = sorted(_dp_ranks_in(c, p, t, cov.gaps))
        ranks = [grid_rank(c, pp, d, t) for d in dps]
        there = c.topology.files_at(dp=dps[0], tp=t, pp=pp, kind="optim") if len(dps) == 1 else []
        out.append(codes.finding("param-coverage", f"{p.name}: {cov.missing:,} of the {n:,} elements "
                                 f"of tp rank {t}'s shard are held by no file"
                                 + (f" (rank {', '.join(map(str, ranks))})" if ranks else ""),
                                 REPLACE, param=p.name, rank=ranks[0] if len(ranks) == 1 else None,
                                 file=there[0].name if len(there) == 1 else None))
    bad = [f for f in held if not f.intact and f.numel]
    if bad:
        out.append(codes.finding("param-truncated", f"{p.name}: the bytes of tp rank {t}'s shard are "
                                 f"not all in {bad[0].file}", "that file is truncated; copy it again",
                                 param=p.name, file=bad[0].file, rank=grid_rank(c, pp, bad[0].rank or 0, t)))
    return out


def _group_of(c: Checkpoint, p: Param, t: int):
    """The flat group of tp rank t's slice that holds p's fragments: a pipeline's tied param is
    in a group of each stage it is on, its fragments the lowest stage's (the others' are copies)."""
    return min((g for g in c.groups if g.index == p.sub_group and g.coords.tp == t
                and p.name in g.params), key=lambda g: g.coords.pp, default=None)


def _stage_of(c: Checkpoint, p: Param, t: int) -> int:
    g = _group_of(c, p, t)
    return 0 if g is None else g.coords.pp


def _dp_ranks_in(c: Checkpoint, p: Param, t: int, gaps: list[tuple[int, int]]) -> set[int]:
    """The dp ranks whose share of tp rank t's shard falls in the gaps (ZeRO-3: ceil(n/dp)
    elements each; ZeRO-1/2 and BF16_Optimizer: the flat group's partitions)."""
    dp, n = c.topology.dp, numel(p.shards[t].shape)
    if c.stage == 3:
        part = partition.zero3_share(n, dp)
        return {r for a, b in gaps for r in partition.ranks_of(a, b, part, dp)}
    g = _group_of(c, p, t)
    if g is None:
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
