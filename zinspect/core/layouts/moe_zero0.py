"""Native MoE with ZeRO-0: no ZeRO partitions at all. `mp_rank_00` holds the dense module and
rank 0's torch optimizer state; each expert's weights are in its `layer_L_expert_E` file (global
ids); `expp_rank_X_mp_rank_00_optim_states.pt` holds ep rank X's whole optimizer state.

Which param is which optimizer entry is found from rank 0's optimizer groups by shape order
(group_order.py): its dense groups against the dense params, its `moe` groups against ep rank 0's
local experts (whose global ids are their local ids). Every ep rank's groups have that order, its
`moe` groups holding its own local experts (global id = ep rank x num_local + local). So:
  * fp32 training: the module and expert-file weights are the fp32 masters;
  * bf16 / fp16 training (FP16_UnfusedOptimizer): the masters are fp32_groups entries, the dense
    ones and ep rank 0's experts' in mp_rank_00's optimizer, ep rank X's experts' in
    expp_rank_X's (its dense entries are dp replicas of rank 0's, not read);
and each param's torch optimizer state (exp_avg, ...) sits at the same position in the same file.
When the shapes fit more than one way, fp32 is written from the weights (which were frozen is
unknown, an info), 16-bit masters are not named (an error), never guessed.
"""

from __future__ import annotations

from zinspect.core.layouts import common, zero0
from zinspect.core.layouts.gaps import missing_coords, missing_files, outside, stale
from zinspect.core.layouts.group_order import match_group_order, saved_group_shapes
from zinspect.core.layouts.moe_names import ep_size, with_expert
from zinspect.core.layouts.pickled import get, located
from zinspect.core.model import Coords, Param, Topology
from zinspect.core.torchzip import TensorRef


def describe(moe, names: common.Names) -> None:
    """`moe`: a moe._MoE whose checkpoint has no ZeRO optimizer files."""
    ctx, c = moe.ctx, moe.c
    c.stage = 0
    moe.ws = zero0.dp_size(ctx)
    expp = {rf.rank: rf for rf in c.files if rf.kind == "expert_optim" and rf.rank is not None}
    ep = _ep_size(ctx, moe.ws) or max(len(expp), 1)
    for x, rf in expp.items():
        rf.coords = Coords(ep=x)
        if x >= ep or rf.mp_rank:
            stale(ctx.find, rf, outside([("ep", ep), ("tp", 1)], (x, rf.mp_rank or 0)))
    missing_files(ctx.find, [("ep", ep)], {(x,) for x in expp}, "missing-optimizer-file",
                  "expert optimizer files", lambda x: f"expp_rank_{x}_mp_rank_00_optim_states.pt",
                  "its expert optimizer state is lost (the fp32 weights are in the expert files)",
                  "copy it from the run")
    moe._sort_files({ep})
    c.topology = Topology(dp=moe.ws, ep=ep, files=c.files)
    for (layer, _), rf in sorted(moe.expert_files.items()):
        tf = ctx.torch_file(rf)
        held = tf.obj if tf is not None and isinstance(tf.obj, dict) else {}
        for name, t in held.items():
            if isinstance(t, TensorRef) and isinstance(name, str) and \
                    moe.layer_of(name) == layer and name not in c.params:
                c.params[name] = Param(name, t.shape, t.dtype)
    _name_missing_experts(moe)
    order = _frozen(moe, names, ep)
    if order is not None:
        _attach_ep_ranks(moe, names, ep, expp, *order)
    moe._expert_files()  # checks them; frozen expert params get their weights there
    for p in c.params.values():  # fp32: the weights are the masters
        if not p.frozen and not p.fragments and p.dtype == "float32":
            rf = moe.expert_files.get((moe.layer_of(p.name), moe.expert_of(p.name))) \
                if moe.layer_of(p.name) is not None else ctx.model_file
            tf = ctx.torch_file(rf)
            t = (tf.obj if rf is not ctx.model_file else names.module).get(p.name) if tf else None
            if isinstance(t, TensorRef):
                p.fragments = [located(tf, rf.name, 0, t).fragment(None, 0, 0, p.numel)]
    common.attach_whole_frozen(ctx, names)


def _name_missing_experts(moe) -> None:
    """A missing expert file's params, named after a present expert of the same layer: they have
    no values (a merge lists them as left out), rather than vanishing from the checkpoint."""
    c = moe.c
    for layer, n in enumerate(moe.num_experts):
        present = sorted(e for lay, e in moe.expert_files if lay == layer)
        if not present:
            continue
        template = [(name, p) for name, p in c.params.items() if moe.layer_of(name) == layer
                    and moe.expert_of(name) == present[0]]
        _, missing = missing_coords({(e,) for e in present}, (n,))
        for (e,) in missing:
            for name, p in template:
                other = with_expert(name, e)
                c.params.setdefault(other, Param(other, p.shape, p.dtype))


def _param_groups(opt) -> list:
    """A ZeRO-0 optimizer's torch param_groups (16-bit: FP16_UnfusedOptimizer's inner ones)."""
    groups = get(opt, "param_groups")
    if groups is None:
        groups = get(opt, "optimizer_state_dict", "param_groups")
    return groups if isinstance(groups, list) else []


def _ep_size(ctx, ws: int) -> int | None:
    for g in _param_groups(get(ctx.model_state, "optimizer")):
        ep = ep_size(get(g, "name"))
        if get(g, "moe") is True and ep and 0 < ep <= ws:
            return ep
    return None


def _frozen(moe, names: common.Names, ep: int) -> tuple[list[bool], list[list[str]]] | None:
    """Frozen flags from rank 0's optimizer groups; returns (each group's `moe` flag, the names
    at each group's positions: ep rank 0's) when the shapes fit in a single way. Else all
    trainable: with an info at fp32 (the weights are the masters), an error at 16 bits."""
    c, ctx = moe.c, moe.ctx
    opt = get(ctx.model_state, "optimizer")
    shapes = saved_group_shapes(opt)
    flags = [get(g, "moe") is True for g in _param_groups(opt)]
    dense = [(n, p.shape) for n, p in c.params.items() if moe.layer_of(n) is None and not p.tied_to]
    local = [(n, p.shape) for n, p in c.params.items() if moe.layer_of(n) is not None and
             moe.expert_of(n) < moe.num_local(n, ep)]
    fits = None if shapes is None or len(flags) != len(shapes) else (
        match_group_order(dense, [s for s, f in zip(shapes, flags, strict=True) if not f]),
        match_group_order(local, [s for s, f in zip(shapes, flags, strict=True) if f]))
    for p in c.params.values():
        p.frozen = False
    if fits is None or any(f.problem for f in fits):
        if any(p.dtype not in ("float32", "") for p in c.params.values()):
            ctx.find("zero0-order-unknown", "rank 0's optimizer groups do not fit the params by "
                     "shape in a single way: the 16-bit run's fp32 masters (fp32_groups) cannot "
                     "be named", "ZeRO-0 saves the optimizer state by position only; load the "
                     "checkpoint with DeepSpeed and the model instead", file=ctx.model_file.name)
        else:
            ctx.find("zero0-frozen-unknown", "which params were frozen is unknown: rank 0's "
                     "optimizer groups do not fit the params by shape in a single way (all are "
                     "written from the fp32 weights, the masters)", file=ctx.model_file.name)
        return None
    skipped = set(fits[0].skipped) | set(fits[1].skipped)
    for n, p in c.params.items():
        local_name = n if moe.layer_of(n) is None else moe.local_name(n, ep)
        p.frozen = local_name in skipped
    dense_groups, local_groups = iter(fits[0].groups), iter(fits[1].groups)
    return flags, [next(local_groups) if f else next(dense_groups) for f in flags]


def _attach_ep_rank_files(moe, ep: int, expp: dict) -> dict[int, tuple]:
    """ep rank -> (its file, its optimizer dict): rank 0's model states for ep rank 0 (they
    hold the dense masters too), expp_rank_X's for the others."""
    out = {}
    for x in range(ep):
        rf = moe.ctx.model_file if x == 0 else expp.get(x)
        tf = moe.ctx.torch_file(rf)
        opt = get(tf.obj, "optimizer") if tf is not None else None
        if isinstance(opt, dict):
            out[x] = (rf, opt)
    return out


def _attach_ep_ranks(moe, names: common.Names, ep: int, expp: dict, flags: list[bool],
                     order: list[list[str]]) -> None:
    """Masters (16-bit: fp32_groups; fp32: the dense module weights, the experts' come from
    their files) and per-param optimizer states: the dense groups from rank 0's file, each ep
    rank's expert groups (renamed to global ids) from its own file."""
    numels = {n: p.numel for n, p in moe.c.params.items()}
    for x, (rf, opt) in _attach_ep_rank_files(moe, ep, expp).items():
        if x == 0:
            dense = [[] if f else g for g, f in zip(order, flags, strict=True)]
            zero0.attach_matched(moe.ctx, rf, opt, dense, numels, names.module)
        experts = [[moe.global_of(n, x, ep) for n in g] if f else []
                   for g, f in zip(order, flags, strict=True)]
        if all(n in numels for g in experts for n in g):
            zero0.attach_matched(moe.ctx, rf, opt, experts, numels, {}, coords=Coords(ep=x))
