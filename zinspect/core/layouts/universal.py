"""Universal checkpoints (ds_to_universal.py's output, or `zinspect merge --format universal`):
`<tag>_universal/zero/<param>/{fp32,exp_avg,exp_avg_sq[,step]}.pt` beside copies of the
model-states files.

Each trainable param's fp32 master is one whole tensor (`{'param': t, 'cat_dim': 0}`, or a bare
flat tensor from a ZeRO-3 source) in its own file: one fragment on "rank 0". Its moments are
registered for `Checkpoint.state_fragments` at the same element offsets of their own files.
Names, shapes, ties, frozen params and buffers come from the model states, as for the layout
the checkpoint was converted from (frozen params: their saved 16-bit values; DeepSpeed's
universal load itself restores neither them nor the buffers).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from zinspect.core.layouts import common
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.pickled import as_group_list, located, shape
from zinspect.core.model import Buffer, Param, ParamGroup
from zinspect.core.torchzip import TensorRef, read_torch_file
from zinspect.errors import UnreadableFile

STATES = ("fp32", "exp_avg", "exp_avg_sq")
_EXPERT = re.compile(r"^(.*\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)\.(.+)$")


def recognise(ctx: LoadContext) -> bool:
    """A zero/ dir and no optimizer files (ds_to_universal copies only the model states)."""
    return "universal" in ctx.kinds and not ctx.optim_files


def describe(ctx: LoadContext) -> None:
    c = ctx.ckpt
    zero = c.path / "zero"
    c.stage = _stage(zero)  # before the names: ZeRO-3 modules hold empty placeholders
    names = common.describe_names(ctx)
    if names is None:
        return
    flat_groups = names.flat_groups + _other_stages(ctx)
    wanted = [(gi, name) for gi, members in enumerate(flat_groups) for name, _ in members]
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda item: _tensors(zero, item[1]), wanted))
    members: list[list[str]] = [[] for _ in flat_groups]
    local = _local_experts([name for _, name in wanted])
    for (gi, name), tensors in zip(wanted, found, strict=True):
        p = c.params.get(name)
        if p is None:
            continue
        members[gi].append(name)
        fp32 = tensors.get("fp32")
        if fp32 is None:
            ctx.find("universal-state-missing", f"{name}: no readable zero/{name}/fp32.pt",
                     "the universal checkpoint is incomplete; convert it again", param=name)
            continue
        tf, rel, t, meta = fp32
        stack = meta.get("ep_num_experts") if meta.get("is_expert_param") and name in local else None
        if t.numel != p.numel and stack is None and meta.get("param") and ctx.model_state and \
                (ctx.model_state.get("mp_world_size") or 1) > 1:
            p.shape = tuple(t.shape)  # a tensor-parallel param: the model states hold a shard's shape
        copies = [p] if stack is None else _unstacked(c, p, local[name], stack, members[gi])
        if t.numel != sum(q.numel for q in copies):
            ctx.find("universal-state-missing", f"{name}: zero/{name}/fp32.pt holds {t.numel:,} "
                     f"elements, the model states say {p.numel:,}",
                     "the universal checkpoint does not belong to these model states", param=name)
            continue
        at = located(tf, rel, 0, t)
        for i, q in enumerate(copies):
            q.group = q.sub_group = gi
            q.fragments.append(at.fragment(gi, i * q.numel, 0, q.numel))
        for state in STATES[1:]:
            if state in tensors and tensors[state][2].numel == t.numel:
                mtf, mrel, mt, _ = tensors[state]
                c.moments[(rel, gi, state)] = located(mtf, mrel, 0, mt)
    for gi, names_in in enumerate(members):
        dtypes = [c.params[n].fragments[0].dtype for n in names_in if c.params[n].fragments]
        c.groups.append(ParamGroup(gi, gi, names_in, sum(c.params[n].numel for n in names_in),
                                   dtype=dtypes[0] if dtypes else None))
    common.attach_frozen(ctx, names)
    common.finish(ctx, names)
    if ctx.model_state is not None and ctx.model_state.get("module") is None:
        _pipeline_leftovers(ctx, zero)


def _pipeline_leftovers(ctx: LoadContext, zero) -> None:
    """A pipeline keeps frozen params and buffers in its layer files, which a universal
    checkpoint does not copy: buffers (every stage's `buffer_names`) and frozen params are read
    from their `zero/<name>/fp32.pt` where the converter wrote one (zinspect does; DeepSpeed's
    ds_to_universal does not: such a buffer stays named and not in the files)."""
    c = ctx.ckpt
    for rf in c.files_of("model"):
        tf = ctx.torch_file(rf)
        for name in (tf.obj.get("buffer_names") or []) if tf and isinstance(tf.obj, dict) else []:
            if isinstance(name, str) and name not in c.buffers:
                c.buffers[name] = Buffer(name, (), "", intact=False)
    try:
        dirs = sorted(d for d in os.listdir(zero) if (zero / d).is_dir())
    except OSError:
        return
    for name in dirs:
        if name in c.params or (name in c.buffers and c.buffers[name].intact):
            continue
        fp32 = _tensors(zero, name, ("fp32",)).get("fp32")
        if fp32 is None or list(fp32[3]) != ["param"]:
            continue
        tf, rel, t, _ = fp32
        at = located(tf, rel, 0, t)
        if name in c.buffers:
            c.buffers[name] = Buffer(name, tuple(t.shape), t.dtype, rel,
                                     at.base, at.whole == t.numel)
        else:
            c.params[name] = Param(name, tuple(t.shape), t.dtype, frozen=True,
                                   fragments=[at.fragment(None, 0, 0, t.numel, source="frozen")])


def _other_stages(ctx: LoadContext) -> list[list[tuple[str, tuple | None]]]:
    """A pipeline's other stages' flat groups (their own model-states files name them), as new
    trainable params; names already known (a tied param, another tp rank's shard) are skipped."""
    c, extra = ctx.ckpt, []
    for rf in sorted(c.files_of("model"), key=lambda f: f.name):
        tf = ctx.torch_file(rf) if rf is not ctx.model_file else None
        obj = tf.obj if tf is not None and isinstance(tf.obj, dict) else {}
        for g in as_group_list(obj.get("param_shapes")):
            new = [(str(n), shape(v)) for n, v in g.items() if str(n) not in c.params]
            for n, shp in new:
                c.params[n] = Param(n, shp or (), "")
            if new:
                extra.append(new)
    return extra


def _local_experts(names: list[str]) -> dict[str, tuple[str, int, str, int]]:
    """Native MoE: local expert param name -> (prefix, local id, leaf, experts per ep rank)."""
    slots: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    for name in names:
        m = _EXPERT.match(name)
        if m:
            slots[(m.group(1), m.group(3))].append((name, int(m.group(2))))
    return {name: (prefix, j, leaf, len(ids)) for (prefix, leaf), ids in slots.items()
            for name, j in ids}


def _unstacked(c, p: Param, slot: tuple[str, int, str, int], stack: int, members: list[str]
               ) -> list[Param]:
    """The global experts a stacked MoE file holds (zinspect.core.universal_moe: local expert j
    of ep rank r is global expert r * num_local + j), as params under their global names (ep
    rank 0's is `p` itself: global j = local j)."""
    prefix, j, leaf, num_local = slot
    out = [p]
    for r in range(1, stack if isinstance(stack, int) else 1):
        name = f"{prefix}{r * num_local + j}.{leaf}"
        q = c.params.setdefault(name, Param(name, p.shape, p.dtype))
        members.append(name)
        out.append(q)
    return out


def _stage(zero) -> int | None:
    try:
        osd = read_torch_file(zero / "optimizer_state.pt").obj
    except UnreadableFile:
        return None
    stage = osd.get("zero_stage") if isinstance(osd, dict) else None
    return int(stage) if isinstance(stage, int) else 1 if isinstance(osd, dict) else None


def _tensors(zero, name: str, states: tuple[str, ...] = STATES) -> dict:
    """state -> (TorchFile, path relative to the tag dir, the tensor, its file's other keys
    with 'param': True when the tensor sits under that key) of a param's files."""
    out: dict = {}
    if "/" in name or name in (".", ".."):  # never a path outside zero/
        return out
    for state in states:
        rel = f"zero/{name}/{state}.pt"
        try:
            tf = read_torch_file(zero / name / f"{state}.pt")
        except (UnreadableFile, OSError):
            continue
        obj = tf.obj
        t = obj.get("param") if isinstance(obj, dict) else obj
        if isinstance(t, TensorRef) and t.is_contiguous():
            meta = {k: (v if k != "param" else True) for k, v in obj.items()} if isinstance(obj, dict) else {}
            out[state] = (tf, rel, t, meta)
    return out


LAYOUT = Layout("universal", recognise, describe)
