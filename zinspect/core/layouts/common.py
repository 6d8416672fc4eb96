"""The steps every layout shares, written once (after `headers.read_headers`): the names,
shapes and ties of the params from the model states (`describe_names`), frozen params saved
whole, buffers, dtypes and the Adam moments' tensors (`finish`, `attach_moments`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import chain, compress
from operator import attrgetter, not_

from zinspect.core.layouts import pickled
from zinspect.core.layouts.base import LoadContext
from zinspect.core.layouts.headers import inner_optimizer
from zinspect.core.layouts.moe_names import EXPERT_ID
from zinspect.core.layouts.pickled import (
    as_group_list,
    get,
    keys_of,
    located,
    param_group_map,
    shape,
    short,
    text,
    values_at,
    values_of,
)
from zinspect.core.model import MOMENTS, Buffer, Param, ParamGroup, RankFile, is_state_key
from zinspect.core.params import ParamTable, column, fill_dtype, made, places
from zinspect.core.torchzip import TensorRef

_ABSENT = object()
Shape = tuple[int, ...] | None  # None: not a valid shape
Members = list[tuple[str, Shape]]
REPLACE_MODEL_STATES = "the model-states file is damaged or forged; restore it from the run"


def undescribed_groups(find, held: int, described: int) -> None:
    """The optimizer files partition `held` flat groups, the model states' param_shapes
    describes `described`: the fp32 masters of the others belong to no param, and their params,
    named by the module alone, would pass for frozen ones saved in 16 bits (param_shapes dropped
    or cut short). One group-coverage error, located nowhere: --salvage cannot tell them apart.
    `find` is LoadContext.find or validate's add."""
    lost = held - described
    if lost > 0:
        find("group-coverage", f"the optimizer files partition {held} flat groups, the model "
             f"states' param_shapes describes {described}: the fp32 masters of "
             f"group{'s' if lost > 1 else ''} {described}{f'..{held - 1}' if lost > 1 else ''} "
             "belong to no param", "the model-states file's param_shapes do not match the "
             "optimizer files: restore the model states saved with them")


def join_group(ctx: LoadContext, name: str, shape: tuple[int, ...] | None,
               g: ParamGroup) -> Param | None:
    """Param `name`, a member of flat group `g`, gets its optimizer group and flat group, and
    its shape from param_shapes when the model states gave none (None: no such param)."""
    p = ctx.ckpt.params.get(name)
    if p is not None:
        p.group, p.sub_group = g.param_group, g.index
        if not p.shape and shape:
            p.shape = shape
    return p


def param_groups_of(ctx: LoadContext, files: dict[int, RankFile]) -> dict[int, int]:
    """flat group index -> optimizer param group, from the lowest readable of `files`."""
    for _, rf in sorted(files.items()):
        tf = ctx.torch_file(rf)
        if tf is not None:
            return param_group_map(get(tf.obj, "optimizer_state_dict"), ctx.ckpt.stage == 3)
    return {}


# ---------------------------------------------------------------------- names
class GroupMembers(Sequence):
    """A flat group's (name, shape) members, kept as its two columns (`names`, `shapes`): no
    tuple a param (300k), unless a layout asks for them."""

    __slots__ = ("names", "shapes")

    def __init__(self, names: list[str], shapes: list[Shape]) -> None:
        self.names, self.shapes = names, shapes

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(zip(self.names[i], self.shapes[i], strict=True))
        return self.names[i], self.shapes[i]

    def __iter__(self):
        return zip(self.names, self.shapes, strict=True)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


@dataclass
class Names:
    """What the model states say, beyond the params they name (kept for the later steps)."""

    module: dict  # name -> TensorRef of the 16-bit module state
    buffer_names: list[str]
    #: per flat group, its (name, shape) members in order (shape None: not a valid shape)
    flat_groups: list[Sequence[tuple[str, Shape]]]
    frozen_shapes: dict[str, Shape]

    @property
    def group_names(self) -> list[list[str]]:
        """Each flat group's names (the same lists each time for `GroupMembers`)."""
        return [m.names if type(m) is GroupMembers else [n for n, _ in m]
                for m in self.flat_groups]

    @property
    def group_shapes(self) -> list[list[Shape]]:
        return [m.shapes if type(m) is GroupMembers else [s for _, s in m]
                for m in self.flat_groups]


def describe_names(ctx: LoadContext) -> Names | None:
    """Params (names, shapes, frozen, ties) from the model states into `ctx.ckpt.params`;
    None (with a finding when none exists) when there are no model states to read."""
    c, ms = ctx.ckpt, ctx.model_state
    if ms is None:
        if c.files and not c.files_of("model"):
            ctx.find("no-model-states", "no *_model_states.pt file in the tag dir",
                     "the parameter names and shapes live there; copy it from the run")
        return None
    c.ds_version = c.ds_version or text(ms.get("ds_version"))
    c.ds_config = ms.get("ds_config") if c.ds_config is None else c.ds_config
    if c.world_size is None:  # no optimizer file says it
        _world_size_of(ctx, ms.get("dp_world_size"))
    module = ms.get("module") if isinstance(ms.get("module"), dict) else {}
    buffer_names = [b for b in ms.get("buffer_names") or [] if isinstance(b, str)]
    shapes = as_group_list(ms.get("param_shapes"))
    if not shapes and ctx.ref_osd is not None:  # DeepSpeed < 0.6 kept them in optim files
        first = ctx.optim.get(0) or next(iter(ctx.optim.values()))
        shapes = as_group_list(get(ctx.torch_file(first).obj, "param_shapes"))
    columns = [pickled.group_columns(g) for g in shapes]
    frozen = ms.get("frozen_param_shapes")
    frozen_shapes = {str(n): shape(s) for n, s in frozen.items()} \
        if isinstance(frozen, dict) else {}
    names = Names(module, buffer_names, [GroupMembers(*c) for c in columns], frozen_shapes)
    _build_params(ctx, names, ms.get("shared_params")
                  if isinstance(ms.get("shared_params"), dict) else {}, shapes=shapes)
    return names


def _world_size_of(ctx: LoadContext, dp) -> None:
    """The model states' dp_world_size as the world size, when it is one (a positive int:
    True, 0 or -2 is a forged field, named in a finding, not shown as the world size)."""
    if pickled.size(dp):
        ctx.ckpt.world_size = dp
    elif dp is not None:
        ctx.find("world-size-unknown", f"{ctx.model_file.name}: its dp_world_size is "
                 f"{pickled.said(dp)}, "
                 "not a world size, and no readable optimizer file says one",
                 REPLACE_MODEL_STATES, file=ctx.model_file.name, rank=ctx.model_file.rank)


def _build_params(ctx: LoadContext, names: Names, shared: dict,
                  shapes: list[dict] | None = None) -> None:
    """The params into `ctx.ckpt.params`: the usual ZeRO-3 ones in bulk (a ParamTable), any
    other name by name, after `_check_flat_groups` (`shapes`: param_shapes' groups)."""
    c, module, model_file = ctx.ckpt, names.module, ctx.model_file
    usual = _usual_zero3(names) if c.stage == 3 and not c.params else None
    if usual is not None:  # every param the usual one: nothing else to decide for any
        listed, shapes, dtypes, order = usual
        c.params = ParamTable(listed, shapes, dtypes, names.group_names, order)
        return  # (no group to check: each name once, with a shape, none a buffer)
    if shapes is not None:
        _check_flat_groups(ctx, names, shapes)
    trainable = {n: s for g in names.flat_groups for n, s in g}
    bufset = set(names.buffer_names)
    listed = [n for n in module if isinstance(n, str) and n not in bufset]
    for n in list(trainable) + list(names.frozen_shapes):
        if n not in module:
            listed.append(n)  # module missing or stripped: the shapes lists still name them
    untied: list[str] = []
    stage12, frozen_shapes, params = c.stage != 3, names.frozen_shapes, c.params
    tied = []
    for name in listed:  # one lookup per big dict and name: 300k names add up
        t = module.get(name)
        shp = trainable.get(name, _ABSENT)
        if shp and shp is not _ABSENT and not stage12:  # the usual ZeRO-3 param: the rest
            params[name] = Param(name, shp, (t.dtype if type(t) is TensorRef else None) or "")
            continue  # below decides nothing else for it
        ref = isinstance(t, TensorRef)
        in_groups = shp is not _ABSENT
        shp = (shp if in_groups else None) or frozen_shapes.get(name)
        if shp is None and ref and stage12:
            shp = t.shape
        p = Param(name, shp or (), (t.dtype if ref else None) or "")
        said = "param_shapes" if in_groups else "frozen_param_shapes" if name in frozen_shapes \
            else None
        if said and shp is not None and stage12 and module and (
                t.shape != shp if ref else in_groups and EXPERT_ID.search(name) is None):
            # stage 1/2 modules hold full weights, but MoE experts' (in their own files). A name
            # renamed in param_shapes: masters under a name the module lacks, its own name
            # taken for a frozen param (which: unknown, so located nowhere: --salvage refuses)
            ctx.find("shape-mismatch", f"{name}: {said} says {short(shp)}, its 16-bit "
                     f"weight in the module is {short(t.shape) if ref else 'missing'}",
                     REPLACE_MODEL_STATES, **({"param": name, "file": model_file.name} if ref else {}))
        src = shared.get(name) if shared else None
        if isinstance(src, str) and src != name and not in_groups:
            p.tied_to = src
            tied.append(p)
        elif in_groups:
            pass
        elif name in frozen_shapes or (ref and stage12):
            p.frozen = True  # ZeRO-1 keeps frozen params only in `module`
        elif model_file.rank not in (0, None) and not shared:
            untied.append(name)  # a tied alias: only rank 0 saves the links
            continue
        else:
            ctx.find("param-unaccounted", f"{name} is in the module state but in no param "
                     "group, frozen list or tied-params map", "the model-states file is "
                     "inconsistent", param=name, file=model_file.name)
        params[name] = p
    if untied:  # folded under the missing rank-0 file: one cause, one finding
        i, f = next((i, f) for i, f in enumerate(c.findings) if f.code == "rank0-model-missing")
        c.findings[i] = replace(f, message=f"{f.message}; {len(untied)} tied alias(es) cannot "
                                f"be linked and are left out ({', '.join(untied[:3])}"
                                f"{', ...' if len(untied) > 3 else ''})")
    if not c.params:
        ctx.find("no-params", f"{model_file.name} names no parameters: its module and "
                 "param_shapes are missing or malformed", "the model-states file is damaged or "
                 "was replaced; restore it from the run", file=model_file.name,
                 rank=model_file.rank)
    for p in tied:
        src = c.params.get(p.tied_to)
        if src is None:
            continue  # not tied, or tied to a name that is not here (validate reports it)
        if p.shape and src.shape and p.shape != src.shape:
            # zero-numel params share a data_ptr with their neighbour at stage 1/2
            p.tied_to = None
            p.frozen = True
            continue
        p.shape, p.frozen = src.shape, src.frozen
        p.dtype = p.dtype or src.dtype


def _usual_zero3(names: Names) -> tuple[list[str], list[Shape], list[str], list[int]] | None:
    """(names, shapes, dtypes, order) of the usual ZeRO-3 model states, checked in bulk (300k
    names): the module's names less its buffers are the flat groups' names, each once with a
    shape, none frozen (`order`: each name's place in the groups' names, one after another;
    empty when that is the module's order). None otherwise: `_build_params` decides name by name."""
    module, bufset = names.module, set(names.buffer_names)
    listed = keys_of(module)
    params = list(map(not_, map(bufset.__contains__, listed))) if bufset else None
    listed = list(compress(listed, params)) if bufset else listed
    if names.frozen_shapes or not listed:
        return None
    order = places(listed, names.group_names)
    if order is None:
        return None
    flat_shapes = list(chain.from_iterable(names.group_shapes))
    shapes = list(map(flat_shapes.__getitem__, order)) if order else flat_shapes
    if not all(shapes):
        return None
    refs = values_of(module)  # (the module's values in its order: no look-up by name)
    return listed, shapes, _dtypes(list(compress(refs, params)) if bufset else refs), order


def _dtypes(refs: list) -> list[str]:
    """The dtypes of the module's values `refs`, "" for one that is not a tensor."""
    if set(map(type, refs)) == {TensorRef}:
        dtypes = list(map(attrgetter("dtype"), refs))
        if None not in set(dtypes):
            return dtypes
    return [(t.dtype if type(t) is TensorRef else None) or "" for t in refs]


def _check_flat_groups(ctx: LoadContext, names: Names, shapes: list[dict]) -> None:
    """Every trainable param once, with a valid shape, and no buffer: otherwise its group cannot
    add up, or the module's tensor of its name is taken for a buffer and written for it."""
    flat = list(chain.from_iterable(names.group_names))
    distinct = set(flat)
    if len(distinct) == len(flat) and distinct.isdisjoint(names.buffer_names) and \
            None not in chain.from_iterable(names.group_shapes):
        return  # the usual case, checked in bulk (300k names)
    seen: dict[str, int] = {}
    file, buffers = ctx.model_file.name, set(names.buffer_names)
    for gi, (members, raw) in enumerate(zip(names.flat_groups, shapes, strict=True)):
        for (name, shp), value in zip(members, raw.values(), strict=True):
            if name in buffers:  # located nowhere: --salvage would write the buffer for it
                ctx.find("duplicate-param", f"{name} is a param of group {gi} and a buffer "
                         "(buffer_names): its module copy would be written in place of its "
                         "masters", REPLACE_MODEL_STATES)
            if shp is None:
                ctx.find("param-shape", f"{name}: param_shapes gives it no valid shape "
                         f"({type(value).__name__} {short(value)})", REPLACE_MODEL_STATES,
                         param=name, group=gi, file=file)
            if name in seen:
                ctx.find("duplicate-param", f"{name} is in param group {seen[name]} and in "
                         f"group {gi}", REPLACE_MODEL_STATES, param=name, group=gi, file=file)
            seen.setdefault(name, gi)


# ---------------------------------------------------------------------- after the geometry
def attach_whole_frozen(ctx: LoadContext, names: Names) -> None:
    """Frozen params saved whole in the one model-states file (ZeRO-0/1/2): as
    `frozen_param_fragments` (stage 2), else only as the 16-bit module weights (stage 1)."""
    c = ctx.ckpt
    frozen = [p for p in c.params.values() if p.frozen and not p.tied_to]
    tf = ctx.torch_file(ctx.model_file)
    fragments = ctx.model_state.get("frozen_param_fragments")
    for p in frozen:
        t = fragments.get(p.name) if isinstance(fragments, dict) else None
        source = "frozen"
        if not isinstance(t, TensorRef):
            t, source = names.module.get(p.name), "module"
        if isinstance(t, TensorRef) and tf is not None:
            at = located(tf, ctx.model_file.name, 0, t)
            p.fragments.append(at.fragment(None, 0, 0, min(t.numel, p.numel), source=source))


def attach_frozen(ctx: LoadContext, names: Names) -> None:
    """Frozen params' fragments wherever the stage keeps them: ZeRO-3 (lazily) in every rank's
    model states, else whole in the one model-states file."""
    c = ctx.ckpt
    if c.stage == 3:
        from zinspect.core.layouts import zero3  # it builds on this module

        zero3.attach_frozen(ctx, {f.rank: f for f in ctx.model_files if f.rank is not None},
                            c.world_size or 1)
    elif any(p.frozen for p in made(c.params)):
        attach_whole_frozen(ctx, names)


def finish(ctx: LoadContext, names: Names) -> None:
    """Buffers, the dtypes, and a tied alias's group (its owner's)."""
    _buffers(ctx, names)
    _settle_dtypes(ctx)
    c = ctx.ckpt
    for p in made(c.params):  # a tied alias lives where its owner lives
        owner = c.params.get(p.tied_to) if p.tied_to else None
        if owner is not None:
            p.group, p.sub_group = owner.group, owner.sub_group


def _buffers(ctx: LoadContext, names: Names) -> None:
    tf = ctx.torch_file(ctx.model_file)
    for name, t in zip(names.buffer_names, values_at(names.module, names.buffer_names),
                       strict=True):
        if isinstance(t, TensorRef):
            offset = tf.tensor_offset(t) if tf else None
            rec = tf.records.get(t.storage.key) if tf else None
            intact = offset is not None and t.is_contiguous() and rec is not None and \
                rec.present >= (t.offset * t.itemsize + t.nbytes)
            ctx.ckpt.buffers[name] = Buffer(name, t.shape, t.dtype, ctx.model_file.name,
                                            offset, intact)
        else:
            ctx.ckpt.buffers[name] = Buffer(name, (), "", intact=False)


def _settle_dtypes(ctx: LoadContext) -> None:
    c = ctx.ckpt
    masters = Counter(g.dtype for g in c.groups if g.dtype)
    c.master_dtype = masters.most_common(1)[0][0] if masters else None
    cfg = c.ds_config if isinstance(c.ds_config, dict) else {}
    if get(cfg, "bf16", "enabled") is True:
        c.dtype = "bfloat16"
    elif get(cfg, "fp16", "enabled") is True:
        c.dtype = "float16"
    else:
        dts = Counter(column(c.params, "dtype"))
        dts.pop("", None)
        c.dtype = dts.most_common(1)[0][0] if dts else c.master_dtype
    fill_dtype(c.params, c.dtype or "")


def attach_moments(ctx: LoadContext, files: dict[int, RankFile]) -> None:
    """Record where each optimizer file keeps Adam's exp_avg / exp_avg_sq of each flat group
    (`state[group][moment]`, shaped like the group's fp32 partition), and any other per-param
    state of the partition's size (with or without its padding) under a plain name (SGD's
    momentum_buffer, ...), for `Checkpoint.state_fragments`. Only metadata already parsed is
    read."""
    for rank, rf in files.items():
        tf = ctx.torch_file(rf)
        osd = get(tf.obj, "optimizer_state_dict") if tf else None
        state = get(inner_optimizer(osd), "state")
        if not isinstance(state, dict):
            continue
        flats = get(osd, "single_partition_of_fp32_groups") or get(osd, "fp32_flat_groups")
        pads = get(osd, "group_paddings")
        for group, per in state.items():
            if type(group) is not int or not isinstance(per, dict):
                continue
            flat = flats[group] if isinstance(flats, list) and 0 <= group < len(flats) else None
            pad = pads[group] if isinstance(pads, list) and 0 <= group < len(pads) else 0
            sizes = (flat.numel, flat.numel + pad) if isinstance(flat, TensorRef) else ()
            for moment, t in per.items():
                if isinstance(t, TensorRef) and (moment in MOMENTS or (
                        is_state_key(moment) and t.numel in sizes)):
                    ctx.ckpt.moments[(rf.name, group, moment)] = located(tf, rf.name, rank, t)

