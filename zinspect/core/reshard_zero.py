"""Plan the files of one data-parallel slice (`zinspect.core.reshard_slices.Slice`: a plain ZeRO
checkpoint, one tp rank's or one pipeline stage's files, an MoE run's) at another data-parallel
size N, as DeepSpeed 0.19.8 lays them out (stage_1_and_2.py, bf16_optimizer.py, stage3.py):

* ZeRO-1/2 and BF16_Optimizer: per param group, the params flattened in order (with
  `round_robin_gradients`, DeepSpeed's round-robin order over the group's ranks), padded to a
  multiple of 2 * its ranks, cut into one partition per rank. A group is partitioned over all N
  ranks, an MoE expert group over its expert-data-parallel group (N / ep ranks, rank r at
  position r // ep). Rank r saves its fp32 partition without the padding (BF16_Optimizer: with
  it) and Adam's moments with it; `param_slice_mappings` place each param's fragment.
* ZeRO-3: each param puts ceil(n/N) elements in every rank (the last ones padded); a param group
  is cut into sub-groups once their per-rank elements reach `sub_group_size`; each rank saves
  one fp32 partition and one optimizer state per sub-group, and its own model-states file with
  its part of each frozen param.

The pickles around the new tensors are the source's, with the world-size dependent entries
recomputed. A tensor-parallel slice's params are its tp rank's shards (their shapes and
element ranges).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable

from zinspect.core.fmt import shown
from zinspect.core.model import MOMENTS, Checkpoint
from zinspect.core.partition import zero3_held, zero3_share, zero12_partition, zero12_real
from zinspect.core.reshard_order import address, round_robin, undo_round_robin
from zinspect.core.reshard_slices import Reshape, Slice
from zinspect.core.reshard_sources import STEP, Sources, refuse, zero_config
from zinspect.core.torchsave import OutFile, Size, add_zeros
from zinspect.core.torchzip import DTYPE_SIZES

__all__ = ["MOMENTS", "STEP", "Sources", "Unit", "plan_units"]

#: DeepSpeed's default zero_optimization.sub_group_size
DEFAULT_SUB_GROUP = 1_000_000_000


#: plans the files of one data-parallel rank of one slice (or the files copied whole)
Unit = Callable[[], list[OutFile]]


def plan_units(ckpt: Checkpoint, rs: Reshape) -> tuple[list[Unit], list[str]]:
    """The files of `ckpt` reshaped by `rs`, as units planned one at a time (the pieces of one
    rank's files are what planning holds, whatever the world size), and notes on what was
    kept as it was (filled as the units are planned)."""
    src = Sources(ckpt)
    units: list[Unit] = [functools.partial(lambda name: [src.whole(name)], n) for n in rs.whole]
    for sl in rs.slices:
        planner = _Zero3 if ckpt.stage == 3 else _Zero12
        units += planner(src, sl, rs).units()
    return units, src.notes


class _SlicePlan:
    """What both stages need of a slice: its params' shapes and element counts (a tp rank's
    shards), their located fragments, the optimizer file names."""

    def __init__(self, src: Sources, sl: Slice, rs: Reshape) -> None:
        self.src, self.sl, self.n, self.ckpt = src, sl, rs.dp, src.ckpt
        self.rs = rs
        self.held_in = sl.files if rs.slices[1:] else None  # one slice: every file
        self._frags: dict[str, tuple[list, list[int]]] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        p = self.ckpt.params[name]
        return tuple(p.shards[self.sl.shard].shape) if self.sl.shard is not None and p.shards \
            else tuple(p.shape)

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def located(self, name: str) -> tuple[list, list[int]]:
        """The param's master fragments and their starts, built once for every rank and state
        (69B params, 512 -> 256 ranks: 370k fragments, not 300M; the moments are located from
        them, `Sources.add_range`)."""
        got = self._frags.get(name)
        if got is None:
            frags = self.src.fragments(name, "fp32", self.held_in)
            got = self._frags[name] = (frags, [f.start for f in frags])
        return got

    def dtype_of(self, name: str, state: str) -> str:
        frags = self.located(name)[0]
        return self.src.moment(frags[0], state, name).dtype if state in MOMENTS else \
            frags[0].dtype

    def optim_name(self, r: int, prefix: str) -> str:
        return f"{prefix}zero_pp_rank_{r}_mp_rank_{self.sl.mp:02d}_optim_states.pt"

    def shapes(self, names) -> OrderedDict:
        """param_shapes: under the names the rank's module has (an MoE expert's local name)."""
        return OrderedDict((self.sl.local.get(x, x), Size(self.shape(x))) for x in names)


class _Zero12(_SlicePlan):
    def __init__(self, src: Sources, sl: Slice, rs: Reshape) -> None:
        super().__init__(src, sl, rs)
        self.bf16_optimizer = self.ckpt.layout == "bf16_optimizer" or \
            "zero_stage" not in src.tf(sl.optim[0].name).obj["optimizer_state_dict"]
        rr = bool(zero_config(self.ckpt).get("round_robin_gradients"))
        self.orders = {}  # id(group) -> (original order, flat order at its new ranks) of (name, numel)
        for e in range(rs.ep):
            rf = sl.optim[e]
            osd = src.tf(rf.name).obj["optimizer_state_dict"]
            base = osd.get("base_optimizer_state")
            if not isinstance(base, dict):
                raise refuse(self.ckpt, "an elastic checkpoint (zero_optimization.elastic_checkpoint)")
            if any(any(p) for p in osd.get("param_alignment_paddings") or []):
                raise refuse(self.ckpt, "per-param alignment padding "
                             "(zero_optimization.parameter_alignment) is not supported yet")
            src.check_states(base.get("state") or {})
            counts = osd.get("partition_count") or []
            mine = sl.groups_of(e, rs.ep)
            for i, (g, ep) in enumerate(mine):
                old, new = self._count(rs.old_dp, ep), self._count(rs.dp, ep)
                if i >= len(counts) or counts[i] != old:
                    raise refuse(self.ckpt, f"{shown(rf.name)}: group {i} is partitioned over "
                                 f"{counts[i] if i < len(counts) else 'no'} ranks, not {old}",
                                 "run `zinspect validate` for details")
                members = [(name, self.numel(name)) for name in g.params]
                orig = undo_round_robin(members, old) if rr else members
                self.orders[id(g)] = (orig, round_robin(orig, new) if rr else orig)

    def _count(self, dp: int, ep: int | None) -> int:
        return dp if ep is None else dp // self.rs.ep

    def units(self) -> list[Unit]:
        return [lambda: [self._model()]] + [functools.partial(lambda r: [self._optim(r)], r)
                                            for r in range(self.n)]

    def _model(self) -> OutFile:
        src, sl = self.src, self.sl
        model = sl.models[0]
        out = OutFile(model.name)
        obj = dict(src.tf(model.name).obj)
        obj["dp_world_size"] = self.n
        obj["param_shapes"] = [self.shapes(name for name, _ in self.orders[id(g)][1])
                               for g, _ in sl.groups_of(0, self.rs.ep)]
        if isinstance(obj.get("frozen_param_shapes"), dict):
            obj["frozen_param_shapes"] = src.sizes(obj["frozen_param_shapes"])
        out.obj = src.copy(out, model.name, obj)
        return out

    def _optim(self, r: int) -> OutFile:
        src, ep = self.src, self.rs.ep
        rf0 = self.sl.optim[r % ep]  # an old rank of the same expert-parallel rank
        out = OutFile(self.optim_name(r, rf0.prefix))
        osd0 = src.tf(rf0.name).obj["optimizer_state_dict"]
        base0 = osd0["base_optimizer_state"]
        fp32, states, paddings, mappings, counts = [], {}, [], [], []
        for g, (group, gep) in enumerate(self.sl.groups_of(r, ep)):
            orig, flat = self.orders[id(group)]
            count = self._count(self.n, gep)
            at_rank = r if gep is None else r // ep
            total = sum(k for _, k in flat)
            part, real = zero12_partition(total, count), zero12_real(total, count, at_rank)
            lo = at_rank * part
            ops = {s: [] for s in ("fp32", *MOMENTS)}
            at = 0
            for name, k in flat:
                a, b = max(at, lo), min(at + k, lo + real)
                if a < b:
                    frags, starts = self.located(name)
                    for s in ops:
                        src.add_range(ops[s], frags, a - at, b - at, name, starts, s)
                at += k
            dtype = group.dtype or "float32"
            if self.bf16_optimizer:
                add_zeros(ops["fp32"], (part - real) * DTYPE_SIZES[dtype])
            fp32.append(out.tensor(dtype, (part if self.bf16_optimizer else real,), ops["fp32"]))
            state0 = (base0.get("state") or {}).get(g)
            if isinstance(state0, dict):
                new = {}
                for key, value in state0.items():
                    if key in MOMENTS:
                        add_zeros(ops[key], (part - real) * DTYPE_SIZES[value.dtype])
                        new[key] = out.tensor(value.dtype, (part,), ops[key])
                    else:
                        new[key] = src.step(out, state0, rf0.name)
                states[g] = new
            paddings.append(part - real)
            counts.append(count)
            mappings.append(self._mappings(orig, lo, part, self.sl.local))
        return _written(src, out, rf0.name, {
            **osd0, "base_optimizer_state": {**base0, "state": states},
            "single_partition_of_fp32_groups": fp32, "group_paddings": paddings,
            "partition_count": counts, "param_slice_mappings": mappings})

    @staticmethod
    def _mappings(orig: list, lo: int, part: int, local: dict[str, str]) -> OrderedDict:
        """DeepSpeed's `_create_param_mapping`: each param overlapping [lo, lo+part), walked in
        the group's original order (also under round robin, as DeepSpeed does), under the
        name the rank's module has (an MoE expert's local name)."""
        out, at = OrderedDict(), 0
        for name, k in orig:
            if (lo <= at < lo + part or at < lo < at + k) and k:
                a, b = max(at, lo), min(at + k, lo + part)
                out[local.get(name, name)] = address(b - a, a - lo)
            at += k
        return out


class _Zero3(_SlicePlan):
    def __init__(self, src: Sources, sl: Slice, rs: Reshape) -> None:
        super().__init__(src, sl, rs)
        osd = src.tf(sl.optim[0].name).obj["optimizer_state_dict"]
        if "ds_zero_partition_groups" in osd:
            raise refuse(self.ckpt, "AutoEP ZeRO-3 partition groups are not supported")
        inner = osd.get("optimizer_state_dict")
        if not isinstance(inner, dict):
            raise refuse(self.ckpt, f"{shown(sl.optim[0].name)} has no optimizer_state_dict")
        src.check_states(inner.get("state") or {})
        self.inner0 = inner
        size = zero_config(self.ckpt).get("sub_group_size", DEFAULT_SUB_GROUP)
        by_group: dict[int, list[str]] = {}
        for g, _ in sl.groups:
            by_group.setdefault(g.param_group, []).extend(g.params)
        self.param_groups = [by_group[k] for k in sorted(by_group)]
        before = [names for pg in self.param_groups for names in self._split(pg, rs.old_dp, size)]
        if before != [g.params for g, _ in sl.groups]:
            raise refuse(self.ckpt, "its sub-groups are not what sub_group_size "
                         f"{size!r} gives at world size {rs.old_dp}",
                         "the ds_config saved with the checkpoint does not say how "
                         "DeepSpeed grouped the params")
        self.subs = [(pgi, names) for pgi, pg in enumerate(self.param_groups)
                     for names in self._split(pg, self.n, size)]
        self.dtype = sl.groups[0][0].dtype or "float32"

    def _split(self, names: list[str], n: int, size) -> list[list[str]]:
        """`_create_fp16_sub_groups`: cut once the per-rank elements reach sub_group_size."""
        shares = [zero3_share(self.numel(x), n) for x in names]
        if not isinstance(size, (int, float)) or size >= sum(shares):
            return [list(names)]
        out, cur, acc = [], [], 0
        for name, share in zip(names, shares, strict=True):
            cur.append(name)
            acc += share
            if acc >= size or name == names[-1]:
                out.append(cur)
                cur, acc = [], 0
        return out

    def units(self) -> list[Unit]:
        return [functools.partial(lambda r: [self._model(r), self._optim(r, self._rank_ops(r))], r)
                for r in range(self.n)]

    def _rank_ops(self, r: int) -> list[dict]:
        """ops[sub-group][state] of rank r."""
        src, n = self.src, self.n
        ops = [{s: [] for s in ("fp32", *MOMENTS)} for _ in self.subs]
        for k, (_, names) in enumerate(self.subs):
            for name in names:
                m = self.numel(name)
                share, held = zero3_share(m, n), zero3_held(m, n, r)
                frags, starts = self.located(name)
                for s in ("fp32", *MOMENTS):
                    size = DTYPE_SIZES[self.dtype if s == "fp32" else self.dtype_of(name, s)]
                    src.add_range(ops[k][s], frags, r * share, r * share + held, name, starts, s)
                    add_zeros(ops[k][s], (share - held) * size)
        return ops

    def _model(self, r: int) -> OutFile:
        src, sl, n = self.src, self.sl, self.n
        # each rank saves its own buffers (BatchNorm statistics differ per rank): rank r keeps
        # the old rank r's, a new rank takes rank 0's (what zero_to_fp32 merges)
        rf = sl.models[r] if r in sl.models else sl.models[0]
        if r not in sl.models and r == self.rs.old_dp and self.ckpt.buffers and sl.mp == 0:
            src.notes.append(f"ranks {self.rs.old_dp}..{n - 1} start from rank 0's buffers (each "
                             "ZeRO-3 rank saves its own, e.g. BatchNorm statistics)")
        out = OutFile(f"zero_pp_rank_{r}_mp_rank_{sl.mp:02d}_model_states.pt")
        obj = dict(src.tf(rf.name).obj)
        obj["dp_world_size"] = n
        obj["param_shapes"] = [self.shapes(names) for _, names in self.subs]
        if r and isinstance(obj.get("shared_params"), dict):
            obj["shared_params"] = {}  # only global rank 0 records the ties
        if isinstance(obj.get("frozen_param_shapes"), dict):
            obj["frozen_param_shapes"] = src.sizes(obj["frozen_param_shapes"])
        frozen = obj.get("frozen_param_fragments")
        if isinstance(frozen, dict):
            new = OrderedDict()
            for name, ref in frozen.items():
                k = self.numel(name)
                share, held = zero3_share(k, n), zero3_held(k, n, r)
                ops: list = []
                src.add_range(ops, src.fragments(name, "frozen", self.held_in), r * share,
                              r * share + held, name)
                add_zeros(ops, (share - held) * ref.itemsize)
                new[name] = out.tensor(ref.dtype, (share,), ops)
            obj["frozen_param_fragments"] = new
        out.obj = src.copy(out, rf.name, obj)
        return out

    def _optim(self, r: int, rank_ops: list[dict]) -> OutFile:
        src, sl, n = self.src, self.sl, self.n
        rf0 = sl.optim[0]
        out = OutFile(self.optim_name(r, rf0.prefix))
        states0 = self.inner0.get("state") or {}
        template = next((s for s in states0.values() if isinstance(s, dict)), None)
        flats, states = [], {}
        for k, (_, names) in enumerate(self.subs):
            ops = rank_ops[k]
            numel = sum(zero3_share(self.numel(x), n) for x in names)
            flats.append(out.tensor(self.dtype, (numel,), ops["fp32"]))
            if template is not None:
                states[k] = {key: out.tensor(v.dtype, (numel,), ops[key]) if key in MOMENTS
                             else src.step(out, template, rf0.name) for key, v in template.items()}
        groups = []
        for pgi, pg in enumerate(self.inner0.get("param_groups") or []):
            groups.append({**pg, "params": [k for k, (g, _) in enumerate(self.subs) if g == pgi]})
        return _written(src, out, rf0.name, {
            **src.tf(rf0.name).obj["optimizer_state_dict"],
            "optimizer_state_dict": {**self.inner0, "state": states, "param_groups": groups},
            "fp32_flat_groups": flats, "partition_count": n})


def _written(src, out: OutFile, name: str, osd: dict) -> OutFile:
    """`out` as the source file `name`'s pickle with `osd` for its optimizer_state_dict (every
    other key, and every tensor `osd` takes from the source, copied by `src.copy`)."""
    outer = dict(src.tf(name).obj)
    outer["optimizer_state_dict"] = osd
    out.obj = src.copy(out, name, outer)
    return out
