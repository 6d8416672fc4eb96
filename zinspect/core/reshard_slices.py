"""What a reshard keeps and what it changes, per layout: the data-parallel slices of a checkpoint.

A tensor-parallel run is one ZeRO checkpoint over dp per tp rank (its shards), a pipeline one per
stage (its layers' params), a native MoE run one whose expert groups are partitioned over the
expert-data-parallel group (dp / ep ranks, position rank // ep) beside the dense groups over all
dp ranks. Each slice is resharded by the plain ZeRO planner (`zinspect.core.reshard_zero`), with
its files' mp_rank kept; the files no data-parallel size changes (a pipeline's layer files, the
MoE expert files) are written again as they are.

`--world-size N` is DeepSpeed's world size: every rank, N = dp * tp * pp (the expert-parallel
ranks are data-parallel ranks: ep divides dp). tp, pp and ep are kept, so N must be a multiple
of tp * pp, and of ep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zinspect.core.fmt import shown
from zinspect.core.layouts.moe_names import EXPERT_ID
from zinspect.core.model import Checkpoint, ParamGroup, RankFile
from zinspect.core.validate import PLAIN_ZERO  # the layouts whose files are one data-parallel set
from zinspect.errors import NotMergeable, UsageError

#: the layouts that can be resharded
RESHARDABLE = (*PLAIN_ZERO, "tensor_parallel", "pipeline", "pipeline_tp", "moe")
#: how a refusal names the layouts that can
LAYOUT_NAMES = {"zero": "plain ZeRO-1/2/3", "bf16_optimizer": "BF16_Optimizer",
                "tensor_parallel": "tensor-parallel (AutoTP, ZeRO-1/2/3)",
                "pipeline": "pipeline (ZeRO-1)", "pipeline_tp": "pipeline x tensor-parallel (ZeRO-1)",
                "moe": "native MoE (ZeRO-1/2)"}
#: the ZeRO stages whose optimizer files a reshard rewrites, per layout
STAGES = {"tensor_parallel": (1, 2, 3), "pipeline": (1,), "pipeline_tp": (1,), "moe": (1, 2)}


def refusal(ckpt: Checkpoint) -> tuple[str, str] | None:
    """(what, hint) when `ckpt`'s layout can be resharded but not this one of it."""
    stages = STAGES.get(ckpt.layout)
    if stages is None or ckpt.stage in stages:
        return None
    if ckpt.stage == 0 and ckpt.files_of("optim"):  # a pipeline's bf16 ZeRO-0: BF16_Optimizer files
        return (f"a {ckpt.layout} checkpoint at ZeRO-0 with bf16 optimizer files cannot be "
                "resharded: no DeepSpeed engine loads one, at any size (DeepSpeed 0.19.8 hands "
                "BF16_Optimizer the mp_rank file's single state dict and fails with KeyError: 0, "
                "even at the size it was saved at)",
                "nothing loadable can be written from it; train with ZeRO-1 to be able to "
                "resume at another size")
    if ckpt.stage == 0:
        return (f"a {ckpt.layout} checkpoint at ZeRO-0 keeps whole optimizer states, not "
                "partitions: it needs no reshard", "load it at the new data-parallel size as it is")
    return (f"a {ckpt.layout} checkpoint at ZeRO-{ckpt.stage} cannot be resharded",
            f"DeepSpeed saves {ckpt.layout} checkpoints at ZeRO {', '.join(map(str, stages))}")


@dataclass
class Slice:
    """The files of one data-parallel slice: a plain ZeRO checkpoint over dp."""

    mp: int  # the mp_rank its files are named with (tp rank, pipeline stage)
    optim: dict[int, RankFile]  # old dp rank -> optimizer file
    models: dict[int, RankFile]  # ZeRO-3: old dp rank -> model states; else {0: the model states}
    groups: list[tuple[ParamGroup, int | None]]  # (flat group, its ep rank when an expert group)
    shard: int | None = None  # the tp rank whose shards its params are
    files: frozenset[str] = frozenset()  # its files' names (fragments are looked up in them)
    #: MoE: a global expert param name -> the local name its ep rank's files record it under
    local: dict[str, str] = field(default_factory=dict)

    def groups_of(self, rank: int, ep: int) -> list[tuple[ParamGroup, int | None]]:
        """The flat groups of data-parallel rank `rank`'s files, in their order: the dense
        ones and the expert groups of its ep rank (rank % ep)."""
        return [(g, e) for g, e in self.groups if e is None or e == rank % ep]


@dataclass
class Reshape:
    world: int  # the new world size (every rank)
    dp: int  # the new data-parallel size
    old_dp: int
    ep: int = 1
    slices: list[Slice] = field(default_factory=list)
    whole: list[str] = field(default_factory=list)  # files written again as they are


def reshape(ckpt: Checkpoint, world_size: int) -> Reshape:
    """The slices of `ckpt` and the new data-parallel size for `world_size` ranks; UsageError
    when tp * pp or ep does not divide it."""
    topo = ckpt.topology
    tp, pp, ep = max(topo.tp, 1), max(topo.pp, 1), max(topo.ep, 1)
    if ckpt.layout in PLAIN_ZERO:
        tp = pp = ep = 1
    kept = tp * pp
    if world_size % kept or world_size % (kept * ep):
        what = " x ".join(f"{k} {v}" for k, v in (("tp", tp), ("pp", pp), ("ep", ep)) if v > 1)
        raise UsageError(f"--world-size {world_size} is not a multiple of {what} = {kept * ep} "
                         f"(the {ckpt.layout} degrees a reshard keeps)",
                         f"--world-size counts every rank, as DeepSpeed's does (dp x tp x pp): "
                         f"e.g. --world-size {kept * ep * 2}")
    rs = Reshape(world_size, world_size // kept, topo.dp if ckpt.layout not in PLAIN_ZERO
                 else (ckpt.world_size or 1), ep)
    optim, models = ckpt.files_of("optim"), ckpt.files_of("model")
    if ckpt.layout == "tensor_parallel":
        rs.slices = [_slice(ckpt, t, [f for f in optim if f.coords.tp == t],
                            [f for f in models if f.coords.tp == t],
                            [g for g in ckpt.groups if g.coords and g.coords.tp == t], shard=t)
                     for t in range(tp)]
    elif ckpt.layout in ("pipeline", "pipeline_tp"):  # one slice per (stage, tp rank)
        def at(c, s: int, t: int) -> bool:
            return c is not None and c.pp == s and (tp == 1 or c.tp == t)

        rs.slices = [_slice(ckpt, s * tp + t, [f for f in optim if at(f.coords, s, t)],
                            [f for f in models if at(f.coords, s, t)],
                            [g for g in ckpt.groups if at(g.coords, s, t)], t if tp > 1 else None)
                     for s in range(pp) for t in range(tp)]
        rs.whole = sorted(f.name for f in ckpt.files_of("layer"))
    else:
        rs.slices = [_slice(ckpt, 0, optim, models, ckpt.groups)]
        rs.slices[0].local = _local_expert_names(ckpt, ep)
        rs.whole = sorted(f.name for f in ckpt.files_of("expert"))
    return rs


def _local_expert_names(ckpt: Checkpoint, ep: int) -> dict[str, str]:
    """global expert id = ep rank * experts per ep rank + local id, per MoE layer (the experts
    of a layer: the ids its params' names hold)."""
    ids: dict[str, set[int]] = {}
    for name in ckpt.params:
        m = EXPERT_ID.search(name)
        if m:
            ids.setdefault(name[:m.start(1)], set()).add(int(m[1]))
    out = {}
    for name in ckpt.params:
        m = EXPERT_ID.search(name)
        if m:
            per_rank = max(len(ids[name[:m.start(1)]]) // ep, 1)
            out[name] = f"{name[:m.start(1)]}{int(m[1]) % per_rank}{name[m.end(1):]}"
    return out


def _slice(ckpt: Checkpoint, mp: int, optim: list[RankFile], models: list[RankFile],
           groups: list[ParamGroup], shard: int | None = None) -> Slice:
    by_rank = {f.rank: f for f in optim}
    if sorted(by_rank) != list(range(len(optim))) or not optim:
        raise NotMergeable(f"{shown(str(ckpt.path))}: cannot reshard: the optimizer files of "
                           f"mp_rank {mp:02d} are not data-parallel ranks 0..{len(optim) - 1}",
                           "run `zinspect validate` for details")
    held = {f.rank or 0: f for f in models} if ckpt.stage == 3 else \
        {0: min(models, key=lambda f: f.name)} if models else {}
    if not held:
        raise NotMergeable(f"{shown(str(ckpt.path))}: cannot reshard: mp_rank {mp:02d} has no "
                           "model-states file", "run `zinspect validate` for details")
    moe = ckpt.layout == "moe"
    tagged = [(g, g.coords.ep if moe and g.coords is not None else None) for g in groups]
    files = frozenset(f.name for f in [*optim, *models])
    return Slice(mp, by_rank, held, tagged, shard, files)
