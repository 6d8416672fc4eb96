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

from zinspect.core.layouts import common
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.group_order import match_group_order
from zinspect.core.layouts.pickled import get, located
from zinspect.core.model import ParamGroup, Topology
from zinspect.core.torchzip import TensorRef


def recognise(ctx: LoadContext) -> bool:
    return not ctx.optim_files and ctx.model_state is not None and \
        isinstance(ctx.model_state.get("optimizer"), dict)


def describe(ctx: LoadContext) -> None:
    c = ctx.ckpt
    c.stage = 0
    names = common.describe_names(ctx)
    if names is None:
        return
    ws = get(ctx.model_state, "dp_world_size")
    c.world_size = ws if type(ws) is int and ws > 0 else 1
    c.topology = Topology(dp=c.world_size, files=c.files)
    _tie_shared_storages(ctx, names.module)
    opt = ctx.model_state.get("optimizer")
    masters = opt.get("fp32_groups")
    groups = masters if isinstance(masters, list) else _torch_groups(opt)
    owners = [(p.name, p.shape) for p in c.params.values() if not p.tied_to]
    shapes = [[t.shape if isinstance(t, TensorRef) else t for t in g]
              for g in groups if isinstance(g, list)]
    listed = [len(get(g, "params", default=[]) or []) for g in
              get(opt, "optimizer_state_dict", "param_groups", default=[]) or []]
    problem = "" if not isinstance(masters, list) or listed == [len(g) for g in shapes] \
        else "counts"
    order = match_group_order(owners, shapes)
    if problem or order.problem:
        ctx.find("zero0-order-unknown", _ORDER_PROBLEM[problem or order.problem] + f" ({len(owners)} "
                 f"params, optimizer groups of {', '.join(str(len(g)) for g in groups)})",
                 "ZeRO-0 saves the optimizer state by position only; without a unique match "
                 "the masters cannot be named. Load the checkpoint with DeepSpeed and the "
                 "model instead", file=ctx.model_file.name)
        common.finish(ctx, names)
        return
    tf = ctx.torch_file(ctx.model_file)
    file = ctx.model_file.name
    for gi, members in enumerate(order.groups):
        g = ParamGroup(gi, gi, members, sum(c.params[n].numel for n in members),
                       {0: sum(c.params[n].numel for n in members)}, {0: 0}, "float32")
        c.groups.append(g)
        for i, name in enumerate(members):
            p = c.params[name]
            p.frozen, p.group, p.sub_group = False, gi, gi
            t = groups[gi][i] if isinstance(masters, list) else names.module.get(name)
            if isinstance(t, TensorRef):
                at = located(tf, file, 0, t)
                p.fragments = [at.fragment(gi, 0, 0, min(t.numel, p.numel))]
    for name in order.skipped:  # frozen: the module weights
        c.params[name].frozen = True
    for p in c.params.values():
        if p.tied_to in c.params:
            p.frozen = c.params[p.tied_to].frozen
    common.attach_whole_frozen(ctx, names)
    common.finish(ctx, names)


_ORDER_PROBLEM = {
    "none": "the optimizer's groups fit no subsequence of the module's params by shape",
    "ambiguous": "the optimizer's groups fit the module's params in more than one way "
                 "(params of equal shapes in different groups)",
    "too-complex": "the optimizer's groups could not be matched to the module's params",
    "counts": "fp32_groups and the optimizer's param_groups list different numbers of params",
}


def _torch_groups(opt: dict) -> list[list]:
    """A torch optimizer state dict's groups as the shapes of their params (from exp_avg, or
    any tensor of the param's state)."""
    state = opt.get("state") if isinstance(opt.get("state"), dict) else {}
    out = []
    for g in opt.get("param_groups") or []:
        shapes = []
        for idx in get(g, "params", default=[]) or []:
            per = state.get(idx) if isinstance(state.get(idx), dict) else {}
            t = per.get("exp_avg") or next((v for v in per.values() if isinstance(v, TensorRef)
                                            and v.shape), None)
            shapes.append(t.shape if isinstance(t, TensorRef) else None)
        out.append(shapes)
    return out


def _tie_shared_storages(ctx: LoadContext, module: dict) -> None:
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
