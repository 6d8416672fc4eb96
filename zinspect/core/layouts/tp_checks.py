"""The checks of a tensor-parallel checkpoint (layouts/tensor_parallel.py): at load, each tp
rank's files present and of this world size (`report_missing`, `check_sizes`); that the optimizer
files were saved at one step and stage is `one_save.outliers`, run by core/validate.py. How the
shards tile the full tensors is found when each param is placed (`tensor_parallel.place`); that
each tp rank's shard of each param is held once by its fragments and whole in its file is
`shard_findings`, run by core/validate.py on every layout whose params are tp shards cut into
ZeRO partitions (tensor_parallel, pipeline_tp)."""

from __future__ import annotations

from collections import defaultdict

from zinspect.core import codes, coverage, partition
from zinspect.core.layouts.base import LoadContext
from zinspect.core.layouts.gaps import missing_files
from zinspect.core.layouts.pickled import numel
from zinspect.core.model import Checkpoint, Finding, Param

REPLACE = "restore the tp rank's files from the run (every tp rank saves its own shards)"


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
    out = []
    for p in c.owners():
        if p.shards:
            by_shard = defaultdict(list)  # one pass over a param's fragments, not one per tp rank
            for f in p.fragments:
                by_shard[f.shard].append(f)
            for t, shard in sorted(p.shards.items()):
                out += _shard_coverage(c, p, t, numel(shard.shape), by_shard[t])
    return out


def _shard_coverage(c: Checkpoint, p: Param, t: int, n: int, held: list) -> list[Finding]:
    """`held`: p's fragments of tp rank t's shard."""
    cov = coverage.cover(n, held)
    out = []
    if cov.overlaps:
        a, b = cov.overlaps[0]
        out.append(codes.finding("param-overlap", f"{p.name}: elements {a:,}..{b:,} of tp rank {t}'s "
                                 "shard are held twice", REPLACE, param=p.name))
    pp = _stage_of(c, p, t) if cov.gaps or any(not f.intact for f in held) else 0
    if cov.gaps:
        dps = sorted(_dp_ranks_in(c, p, t, cov.gaps))
        there = c.topology.files_at(dp=dps[0], tp=t, pp=pp, kind="optim") if len(dps) == 1 else []
        stage = f"stage {pp}, " if c.topology.pp > 1 else ""
        out.append(codes.finding("param-coverage", f"{p.name}: {cov.missing:,} of the {n:,} elements "
                                 f"of tp rank {t}'s shard are held by no file"
                                 + (f" ({stage}dp rank {', '.join(map(str, dps))})" if dps else ""),
                                 REPLACE, param=p.name, rank=dps[0] if len(dps) == 1 else None,
                                 file=there[0].name if len(there) == 1 else None))
    bad = [f for f in held if not f.intact and f.numel]
    if bad:
        out.append(codes.finding("param-truncated", f"{p.name}: the bytes of tp rank {t}'s shard are "
                                 f"not all in {bad[0].file}", "that file is truncated; copy it again",
                                 param=p.name, file=bad[0].file, rank=bad[0].rank))
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


def check_sizes(ctx: LoadContext, s, dp: int) -> None:
    """Each optimizer file of a tp rank is partitioned over this checkpoint's dp ranks (the
    model states' declared sizes are checked by topology.cross_check)."""
    for d, rf in sorted(s.optim.items()):
        if rf.partition_count and rf.partition_count[0] != dp:
            ctx.find("world-size-mismatch", f"{rf.name} is partitioned over {rf.partition_count[0]} "
                     f"dp ranks; this checkpoint has dp {dp}", "it comes from a run of another "
                     "world size; " + REPLACE, file=rf.name, rank=d)


def report_missing(ctx: LoadContext, slices: list, tp: int, dp: int) -> None:
    """Each tp rank's model states (one, or at ZeRO-3 one per dp rank) and optimizer files
    there (`gaps.missing_files`: the first named, the rest counted)."""
    c = ctx.ckpt
    if c.stage == 3:
        missing_files(ctx.find, [("tp", tp), ("dp", dp)], {(s.tp, d) for s in slices for d in s.models},
                      "missing-tp-rank", "model-states files",
                      lambda t, d: f"zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt",
                      lambda t, d: "its frozen-param partitions are unknown" if slices[t].models else
                      "its shards' shapes are unknown", REPLACE)
    else:
        missing_files(ctx.find, [("tp", tp)], {(s.tp,) for s in slices if 0 in s.models},
                      "missing-tp-rank", "model-states files", lambda t: f"mp_rank_{t:02d}_model_states.pt",
                      "its shards' shapes are unknown", REPLACE)
    for s in slices:
        if s.models and s.state is None:
            rf = next(iter(s.models.values()))
            ctx.find("missing-tp-rank", f"tp rank {s.tp}'s model states cannot be read", REPLACE,
                     file=rf.name, rank=rf.rank)
    if ctx.optim_files:
        prefix = ctx.optim_files[0].prefix
        missing_files(ctx.find, [("tp", tp), ("dp", dp)], {(s.tp, d) for s in slices for d in s.optim},
                      "missing-optimizer-file", "optimizer files",
                      lambda t, d: f"{prefix}zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt",
                      "its part of its tp rank's shards is lost", REPLACE)
