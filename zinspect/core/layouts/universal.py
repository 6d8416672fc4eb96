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

from concurrent.futures import ThreadPoolExecutor

from zinspect.core.layouts import common
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.pickled import located
from zinspect.core.model import ParamGroup
from zinspect.core.torchzip import TensorRef, read_torch_file
from zinspect.errors import UnreadableFile

STATES = ("fp32", "exp_avg", "exp_avg_sq")


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
    wanted = [(gi, name) for gi, members in enumerate(names.flat_groups) for name, _ in members]
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda item: _tensors(zero, item[1]), wanted))
    for gi, members in enumerate(names.flat_groups):
        g = ParamGroup(gi, gi, [n for n, _ in members], sum(c.params[n].numel for n, _ in members
                                                           if n in c.params))
        c.groups.append(g)
    for (gi, name), tensors in zip(wanted, found, strict=True):
        p = c.params.get(name)
        if p is None:
            continue
        p.group = p.sub_group = gi
        fp32 = tensors.get("fp32")
        if fp32 is None:
            ctx.find("universal-state-missing", f"{name}: no readable zero/{name}/fp32.pt",
                     "the universal checkpoint is incomplete; convert it again", param=name)
            continue
        tf, rel, t = fp32
        if t.numel != p.numel:
            ctx.find("universal-state-missing", f"{name}: zero/{name}/fp32.pt holds {t.numel:,} "
                     f"elements, the model states say {p.numel:,}",
                     "the universal checkpoint does not belong to these model states", param=name)
            continue
        p.fragments.append(located(tf, rel, 0, t).fragment(gi, 0, 0, t.numel))
        c.groups[gi].dtype = c.groups[gi].dtype or t.dtype
        for state in STATES[1:]:
            if state in tensors and tensors[state][2].numel == t.numel:
                mtf, mrel, mt = tensors[state]
                c.moments[(rel, gi, state)] = located(mtf, mrel, 0, mt)
    common.attach_frozen(ctx, names)
    common.finish(ctx, names)


def _stage(zero) -> int | None:
    try:
        osd = read_torch_file(zero / "optimizer_state.pt").obj
    except UnreadableFile:
        return None
    stage = osd.get("zero_stage") if isinstance(osd, dict) else None
    return int(stage) if isinstance(stage, int) else 1 if isinstance(osd, dict) else None


def _tensors(zero, name: str) -> dict:
    """state -> (TorchFile, path relative to the tag dir, the tensor) of a param's files."""
    out: dict = {}
    if "/" in name or name in (".", ".."):  # never a path outside zero/
        return out
    for state in STATES:
        rel = f"zero/{name}/{state}.pt"
        try:
            tf = read_torch_file(zero / name / f"{state}.pt")
        except (UnreadableFile, OSError):
            continue
        t = tf.obj.get("param") if isinstance(tf.obj, dict) else tf.obj
        if isinstance(t, TensorRef) and t.is_contiguous():
            out[state] = (tf, rel, t)
    return out


LAYOUT = Layout("universal", recognise, describe)
