"""ZeRO-0 (no partitioning): one `mp_rank_00_model_states.pt` holding the module and the whole
optimizer state (parallel-layouts.md §5).

  * fp32 training: `optimizer` is the torch optimizer's own state dict; the module's fp32
    weights are the masters.
  * bf16 / fp16 training: FP16_UnfusedOptimizer, whose `fp32_groups[g][i]` is the fp32 master
    of the i-th param of optimizer group g; the module holds the 16-bit copies.
Neither records param names, `param_shapes`, frozen params or ties: ties are the module
entries that share a storage, and which master is which param is found from the shapes
(`group_order`); when the shapes allow two assignments the checkpoint is refused, never guessed.
"""

from __future__ import annotations

import math

from zinspect.core.layouts import common
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.gaps import stale
from zinspect.core.layouts.group_order import match_group_order, saved_group_shapes
from zinspect.core.layouts.pickled import get, located
from zinspect.core.model import Coords, ParamGroup, Topology, is_state_key
from zinspect.core.torchzip import TensorRef


def recognise(ctx: LoadContext) -> bool:
    """The model states hold the optimizer (ZeRO-1/2/3 save None there: their state is in the
    optimizer files, so any such file here is a leftover of another run)."""
    return ctx.model_state is not None and isinstance(ctx.model_state.get("optimizer"), dict)


def describe(ctx: LoadContext) -> None:
    c = ctx.ckpt
    names = names_at_stage0(ctx)
    if names is None:
        return
    c.world_size = dp_size(ctx)
    c.topology = Topology(dp=c.world_size, files=c.files)
    leftover_optimizer_files(ctx)
    tie_shared_storages(ctx, names.module)
    attach(ctx, ctx.model_file, ctx.model_state,
           {p.name: p.shape for p in c.params.values() if not p.tied_to}, names.module)
    for p in c.params.values():
        if p.tied_to in c.params:
            p.frozen = c.params[p.tied_to].frozen
    common.attach_whole_frozen(ctx, names)
    common.finish(ctx, names)


def names_at_stage0(ctx: LoadContext) -> common.Names | None:
    """A ZeRO-0 checkpoint's stage (0) and its params' names from the model states (None when
    they cannot name them: a finding says why)."""
    ctx.ckpt.stage = 0
    return common.describe_names(ctx)


def dp_size(ctx: LoadContext) -> int:
    """The data-parallel world size the model states record (1 when they record none): a
    ZeRO-0 checkpoint has no optimizer files whose partition count would say it."""
    dp = get(ctx.model_state, "dp_world_size")
    return dp if type(dp) is int and dp > 0 else 1


def leftover_optimizer_files(ctx: LoadContext) -> None:
    """ZeRO optimizer files beside a ZeRO-0 checkpoint are a leftover of another run (ZeRO-0
    keeps its optimizer state in the model states)."""
    for rf in ctx.ckpt.files_of("optim"):
        stale(ctx.find, rf, "it is a ZeRO optimizer file, and this ZeRO-0 checkpoint keeps its "
              "optimizer state in the model states")


def attach(ctx: LoadContext, rf, state: dict, owners: dict[str, tuple], module: dict,
           shard: int | None = None, coords: Coords | None = None) -> None:
    """What one model-states file's `optimizer` holds for `owners` ({name: shape as this file
    holds it}, module order): each param's group and frozen flag, its fp32 master (fp32_groups,
    else the fp32 module weight `module[name]`) and its per-param optimizer states. A tp rank's
    file gives its `shard` and the groups' `coords`."""
    c = ctx.ckpt
    opt = state.get("optimizer")
    masters = opt.get("fp32_groups") if isinstance(opt.get("fp32_groups"), list) else None
    shapes = saved_group_shapes(opt)
    order = match_group_order(list(owners.items()), shapes or [])
    listed = [len(get(g, "params", default=[]) or []) for g in
              get(opt, "optimizer_state_dict", "param_groups", default=[]) or []]
    problem = "unreadable" if shapes is None else "counts" if masters is not None and \
        listed != [len(g) for g in shapes] else order.problem
    if problem and (masters is not None or problem != "unreadable"):
        ctx.find("zero0-order-unknown", _ORDER_PROBLEM[problem] + f" ({len(owners)} params, "
                 f"optimizer groups of {', '.join(str(len(g)) for g in shapes or [])})",
                 "ZeRO-0 saves the optimizer state by position only; without a unique match "
                 "the masters cannot be named. Load the checkpoint with DeepSpeed and the "
                 "model instead", file=rf.name)
        return
    if problem:  # fp32 training: the module weights are the masters whichever were frozen
        ctx.find("zero0-frozen-unknown", "the optimizer state holds no param shapes: which "
                 "params were frozen is unknown (all are written from the fp32 module "
                 "weights, the masters)", file=rf.name)
        order.groups, order.skipped = [list(owners)], []
    for name in order.skipped:  # frozen: the module weights
        c.params[name].frozen = True
    attach_matched(ctx, rf, opt, order.groups, {n: math.prod(s) for n, s in owners.items()},
                   module, shard, coords, states=not problem)


def attach_matched(ctx: LoadContext, rf, opt: dict, groups: list[list[str]], numels: dict[str, int],
                   module: dict, shard: int | None = None, coords: Coords | None = None,
                   states: bool = True) -> None:
    """Optimizer `opt` of file `rf` (a ZeRO-0 `optimizer` dict) whose group g's i-th entry is
    param `groups[g][i]` (a group given as [] is left alone): each param's group, its fp32
    master (fp32_groups[g][i], else its fp32 module weight `module[name]` when this file holds
    it) and (`states`: the positions are known) its per-param optimizer states."""
    c, tf = ctx.ckpt, ctx.torch_file(rf)
    masters = opt.get("fp32_groups") if isinstance(opt.get("fp32_groups"), list) else None
    for gi, members in enumerate(groups):
        if not members:
            continue
        numel = sum(numels[n] for n in members)
        c.groups.append(ParamGroup(gi, gi, members, numel, {0: numel}, {0: 0}, "float32", coords))
        for i, name in enumerate(members):
            p = c.params[name]
            p.frozen, p.group, p.sub_group = False, gi, gi
            if masters is None:
                t = module.get(name)
            else:
                held = masters[gi] if gi < len(masters) else None
                t = held[i] if isinstance(held, list) and i < len(held) else None
            if isinstance(t, TensorRef) and tf is not None:
                n = min(t.numel, numels[name])
                p.fragments = [*(f for f in p.fragments if f.shard != shard),
                               located(tf, rf.name, 0, t).fragment(gi, 0, 0, n, shard=shard)]
    if tf is not None and states:
        inner = get(opt, "optimizer_state_dict") if masters is not None else opt
        attach_param_states(ctx, tf, rf.name, inner, groups, numels, shard)


def attach_param_states(ctx: LoadContext, tf, file: str, inner, groups: list[list[str]],
                        numels: dict[str, int], shard: int | None = None) -> None:
    """Record each param's own optimizer state tensors (a torch optimizer's `state[id]` of the
    id at its position in `param_groups[g]['params']`: Adam's exp_avg / exp_avg_sq, SGD's
    momentum_buffer, ...) for `Checkpoint.state_fragments`. `groups[g]`: the names at those
    positions (None: a position left alone, e.g. a pipeline stage's copy of a tied param). Only
    a tensor of exactly the param's element count under a plain name is taken (a scalar `step`
    or a factored state is not an element-wise state of the param)."""
    state, saved = get(inner, "state"), get(inner, "param_groups")
    if not isinstance(state, dict) or not isinstance(saved, list):
        return
    for gi, members in enumerate(groups):
        ids = get(saved[gi], "params", default=[]) if gi < len(saved) else []
        for name, idx in zip(members, ids if isinstance(ids, list) else [], strict=False):
            per = state.get(idx) if type(idx) is int and name is not None else None
            for key, t in per.items() if isinstance(per, dict) else ():
                if isinstance(t, TensorRef) and is_state_key(key) and t.numel == numels[name]:
                    ctx.ckpt.param_states[(name, key, shard)] = located(tf, file, 0, t)


_ORDER_PROBLEM = {
    "none": "the optimizer's groups fit no subsequence of the module's params by shape",
    "ambiguous": "the optimizer's groups fit the module's params in more than one way "
                 "(params of equal shapes in different groups)",
    "too-complex": "the optimizer's groups could not be matched to the module's params",
    "counts": "fp32_groups and the optimizer's param_groups list different numbers of params",
    "unreadable": "the optimizer state does not say its params' shapes",
}


def tie_shared_storages(ctx: LoadContext, module: dict) -> None:
    """ZeRO-0 saves no `shared_params`: tied params are module entries viewing one storage."""
    c, first = ctx.ckpt, {}
    for name, t in module.items():
        p = c.params.get(name)
        if p is None or not isinstance(t, TensorRef):
            continue
        key = (t.storage.key, t.offset, t.shape, t.stride)
        owner = first.setdefault(key, name)
        if owner != name:
            p.tied_to = owner


LAYOUT = Layout("zero0", recognise, describe)
