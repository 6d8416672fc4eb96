"""ZeRO-0 with tensor parallelism (AutoTP at ZeRO-0, parallel-layouts.md §1, §3, §5): one
`mp_rank_TT_model_states.pt` per tp rank, written by dp rank 0, each holding that rank's shards
in `module` and its whole optimizer state in `optimizer` (as plain ZeRO-0 does for the full
model); no optimizer files, no `param_shapes`.

So each tp rank's file is a ZeRO-0 checkpoint of its shards: the shard shapes are its module's,
its masters and per-param optimizer states are found as zero0 finds them (`zero0.attach`: the
optimizer's groups matched by shape order, fp32_groups at bf16/fp16, else the fp32 module
weights), and how the shards join is tensor_parallel's (`tensor_parallel.place`: the
universal_checkpoint_info rules and AutoTP's affine map). The files of each tp rank and their
checks are tensor_parallel's too.
"""

from __future__ import annotations

from zinspect.core.layouts import common, tensor_parallel, zero0
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.pickled import get
from zinspect.core.model import Coords, Topology
from zinspect.core.torchzip import TensorRef


def recognise(ctx: LoadContext) -> bool:
    """ZeRO-0 model states (they hold the optimizer) that declare tp > 1 (or, declaring
    nothing, several mp ranks); no pipeline layer or expert files."""
    return not ctx.kinds & {"layer", "expert", "expert_optim"} and zero0.recognise(ctx) and \
        tensor_parallel.declares_tp(ctx)


def describe(ctx: LoadContext) -> None:
    c = ctx.ckpt
    names = zero0.names_at_stage0(ctx)
    if names is None:
        return
    tp = tensor_parallel.tp_degree(ctx) or max(ctx.mp_ranks) + 1
    dp = zero0.dp_size(ctx)
    if tensor_parallel.beyond_any_run(ctx, tp=tp, dp=dp):
        common.finish(ctx, names)
        return
    c.topology = Topology(dp=dp, tp=tp, files=list(c.files))
    zero0.leftover_optimizer_files(ctx)
    slices = tensor_parallel._slices(ctx, tp, dp)  # noqa: SLF001 (its files per tp rank, checked)
    zero0.tie_shared_storages(ctx, names.module)
    owners = [p for p in c.params.values() if not p.tied_to]
    shards = {p.name: {} for p in owners}  # name -> {tp rank: shard shape}, from each module
    for s in slices:
        module = get(s.state, "module")
        for p in owners:
            t = module.get(p.name) if isinstance(module, dict) else None
            if isinstance(t, TensorRef):
                shards[p.name][s.tp] = t.shape
    info = tensor_parallel._split_info(ctx, slices)  # noqa: SLF001 (tp rank 0's, others compared)
    unread = {s.tp for s in slices if s.state is None}
    placed = {p.name for p in owners
              if tensor_parallel.place(ctx, p, info, shards[p.name], tp, unread)}
    for s in slices:
        if s.state is not None:
            held = {n: shp[s.tp] for n, shp in shards.items() if s.tp in shp}
            zero0.attach(ctx, s.model, s.state, held, s.state.get("module") or {}, shard=s.tp,
                         coords=Coords(tp=s.tp))
    for p in c.params.values():
        owner = c.params.get(p.tied_to) if p.tied_to else None
        if owner is not None:  # a tied alias: its owner's full shape and frozen flag
            p.shape, p.frozen = owner.shape, owner.frozen
    tensor_parallel._attach_frozen(ctx, slices, dp)  # noqa: SLF001 (each tp rank's module shard)
    for p in owners:
        if p.name not in placed:  # its shards cannot be joined: nothing to merge
            p.fragments = []
    common.finish(ctx, names)
    c.world_size = dp * tp


LAYOUT = Layout("tensor_parallel_zero0", recognise, describe)
