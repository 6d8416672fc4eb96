"""ZeRO stage 1 and 2: per optimizer param group, the params of `param_shapes[i]` are flattened
in order, padded at the end to a multiple of 2*ws and cut into ws equal partitions of P
elements. Rank r saves its partition as `single_partition_of_fp32_groups[i]` with the padding
stripped (`group_paddings[i]` says how much); BF16_Optimizer keeps the padding. So flat element
e lives on rank e // P at index e % P.

`attach` is the geometry alone, reusable per slice: pipeline stages, tensor-parallel ranks and
MoE expert groups (with their own partition count) call it once per slice."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from zinspect.core import partition
from zinspect.core.layouts import common
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.pickled import get, located, numel
from zinspect.core.model import Coords, ParamGroup, RankFile, TensorAt
from zinspect.core.torchzip import TensorRef

Members = list[tuple[str, tuple[int, ...] | None]]


def recognise(ctx: LoadContext) -> bool:
    return isinstance(ctx.ref_osd, dict) and "zero_stage" in ctx.ref_osd and \
        ctx.ckpt.stage != 3


def describe(ctx: LoadContext) -> None:
    describe_flat(ctx, keep_padding=False)


def describe_flat(ctx: LoadContext, keep_padding: bool) -> None:
    """The whole checkpoint as one ZeRO-1/2 slice (also BF16_Optimizer's, `keep_padding`)."""
    names = common.describe_names(ctx)
    if names is None:
        return
    c = ctx.ckpt
    attach(ctx, ctx.optim, names.flat_groups, c.world_size or len(ctx.optim),
           keep_padding=keep_padding)
    common.attach_moments(ctx, ctx.optim)
    if any(p.frozen for p in c.params.values()):
        common.attach_whole_frozen(ctx, names)
    common.finish(ctx, names)


def attach(ctx: LoadContext, files: dict[int, RankFile],
           flat_groups: Sequence[Members] | dict[int, Members],
           partition_count: int | Sequence[int], *, keep_padding: bool = False,
           shard: int | None = None, coords: Coords | None = None) -> list[ParamGroup]:
    """Attach the fp32 fragments of `flat_groups` (index i = `single_partition_of_fp32_groups[i]`
    of each file; a dict {i: members} attaches only those groups) held by `files` ({dp rank:
    optimizer file}) to `ctx.ckpt.params`, and add
    one ParamGroup per flat group to `ctx.ckpt.groups` (returned).

    `partition_count`: the ranks each group is cut over (one int, or one per group: MoE expert
    groups have their own). `keep_padding`: the partitions keep their padding (BF16_Optimizer).
    `shard`: the tp rank whose shard the params' ranges index (Fragment.shard); `coords`: the
    slice the groups belong to (ParamGroup.coords)."""
    c = ctx.ckpt
    group_of = common.param_groups_of(ctx, files)
    out = []
    for gi, members in (flat_groups.items() if isinstance(flat_groups, dict)
                        else enumerate(flat_groups)):
        ws = partition_count if isinstance(partition_count, int) else \
            (partition_count[gi] if gi < len(partition_count) else 0)
        g = ParamGroup(gi, group_of.get(gi, gi), [n for n, _ in members],
                       sum(numel(s) for _, s in members), coords=coords)
        c.groups.append(g)
        out.append(g)
        parts = _partitions(ctx, files, g)
        P = _partition_size(parts, keep_padding)
        if P is None:
            continue
        real = {r: (t.numel - pad if keep_padding else t.numel) for r, (t, pad) in parts.items()}
        start = 0
        for name, shape in members:
            n = numel(shape)
            p = common.join_group(ctx, name, shape, g)
            for r in partition.ranks_of(start, start + n, P, ws):
                if r not in parts or p is None:
                    continue
                lo = max(start, r * P)
                hi = min(start + n, r * P + real[r])
                if hi > lo:
                    p.fragments.append(parts[r][0].fragment(gi, lo - r * P, lo - start, hi - lo,
                                                            shard=shard))
            start += n
        # a rank beyond the partition count is a stale file, reported as such: its mappings
        # would only add knock-on warnings
        check_slice_mappings(ctx, g, {r: files[r] for r in parts if r < ws}, shard)
    return out


def _partitions(ctx: LoadContext, files: dict[int, RankFile],
                g: ParamGroup) -> dict[int, tuple[TensorAt, int]]:
    """rank -> (its fp32 partition of flat group g, the padding it records)."""
    gi, parts = g.index, {}
    for r, rf in files.items():
        tf = ctx.torch_file(rf)
        osd = get(tf.obj, "optimizer_state_dict") if tf else None
        flat = get(osd, "single_partition_of_fp32_groups")
        pads = get(osd, "group_paddings")
        if not isinstance(flat, list) or gi >= len(flat) or not isinstance(flat[gi], TensorRef):
            if tf is not None:
                ctx.find("group-missing", f"{rf.name} has no fp32 partition for group {gi}",
                         "this rank file does not belong to this checkpoint",
                         file=rf.name, rank=r, group=gi)
            continue
        pad = pads[gi] if isinstance(pads, list) and gi < len(pads) and \
            isinstance(pads[gi], int) else 0
        t = flat[gi]
        g.dtype = g.dtype or t.dtype
        g.partition_numel[r], g.padding[r] = t.numel, pad
        parts[r] = (located(tf, rf.name, r, t), pad)
    return parts


def _partition_size(parts: dict[int, tuple[TensorAt, int]], keep_padding: bool) -> int | None:
    """P, the partition size most ranks agree on (stripped layout: saved + padding;
    BF16_Optimizer: saved). A rank that disagrees is validate's `partition-size`."""
    sizes = [t.numel if keep_padding else t.numel + pad for t, pad in parts.values()]
    return Counter(sizes).most_common(1)[0][0] if sizes else None


def check_slice_mappings(ctx: LoadContext, g: ParamGroup, files: dict[int, RankFile],
                         shard: int | None = None) -> None:
    """Cross-check the fragments against the optimizer's own `param_slice_mappings`
    (name -> where it lies in this rank's partition). With round_robin_gradients those
    follow the original param order and disagree by design, so they are skipped."""
    zo = get(ctx.ckpt.ds_config, "zero_optimization")
    if isinstance(zo, dict) and zo.get("round_robin_gradients"):
        return
    for r, rf in files.items():
        maps = get(ctx.torch_file(rf).obj, "optimizer_state_dict", "param_slice_mappings")
        if not isinstance(maps, list) or g.index >= len(maps) or \
                not isinstance(maps[g.index], dict):
            continue
        for name, addr in maps[g.index].items():
            p = ctx.ckpt.params.get(name)
            frag = next((f for f in p.fragments if f.rank == r and f.shard == shard),
                        None) if p else None
            look = getattr(addr, "get", lambda k: None)  # a dict or a pickled object
            want = (look("start"), look("numel"))
            if frag is None or want != (frag.group_offset, frag.numel):
                # elsewhere (not just shorter: a cut partition, which coverage locates): the
                # two files disagree on which elements are which param, and nothing says who
                # is right; --salvage then leaves the whole group out
                moved = frag is not None and want[0] != frag.group_offset
                ctx.find("param-order-mismatch" if moved else "slice-mapping-mismatch",
                         f"{name}: rank {r}'s optimizer places it at {want[0]} (+{want[1]}) in "
                         f"group {g.index}, its param_shapes order at "
                         f"{frag.group_offset if frag else '-'} (+{frag.numel if frag else 0})",
                         "the optimizer and model-states files disagree: check they come from "
                         "the same save" + (" (`--salvage` leaves this group out)" if moved else ""),
                         file=rf.name, rank=r, group=g.index, param=name)
                return


LAYOUT = Layout("zero", recognise, describe)
