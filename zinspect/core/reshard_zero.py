"""Plan the files of a ZeRO checkpoint at another data-parallel world size N, as DeepSpeed 0.19.8
lays them out (stage_1_and_2.py, bf16_optimizer.py, stage3.py):

* ZeRO-1/2 and BF16_Optimizer: per param group, the params flattened in order (with
  `round_robin_gradients`, DeepSpeed's round-robin order over N), padded to a multiple of 2*N,
  cut into N partitions of P. Rank r saves its fp32 partition without the padding (BF16_Optimizer:
  with it) and Adam's moments with it; `param_slice_mappings` place each param's fragment.
* ZeRO-3: each param puts ceil(n/N) elements in every rank (the last ones padded); a param group
  is cut into sub-groups once their per-rank elements reach `sub_group_size`; each rank saves
  one fp32 partition and one optimizer state per sub-group, and its own model-states file with
  its part of each frozen param.

Each new tensor is a list of source byte ranges (the fragments zinspect located) and zero
padding; the pickles around them are the source's, with the world-size dependent entries
recomputed.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict

from zinspect.core.fmt import shown
from zinspect.core.model import MOMENTS, Checkpoint, Fragment
from zinspect.core.partition import zero3_held, zero3_share, zero12_partition, zero12_real
from zinspect.core.plan import Piece
from zinspect.core.torchsave import NewTensor, OutFile, Size, add_piece, add_zeros
from zinspect.core.torchzip import DTYPE_SIZES, Opaque, TensorRef, TorchFile, read_torch_file
from zinspect.errors import NotMergeable

STEP = "step"
#: DeepSpeed's default zero_optimization.sub_group_size
DEFAULT_SUB_GROUP = 1_000_000_000
FRAGMENT_ADDRESS = "deepspeed.utils.tensor_fragment.fragment_address"


def plan_files(ckpt: Checkpoint, world_size: int) -> tuple[list[OutFile], list[str]]:
    """The files of `ckpt` at `world_size`, and notes on what was kept as it was."""
    src = Sources(ckpt)
    if ckpt.stage == 3:
        return _Zero3(src, world_size).files(), src.notes
    return _Zero12(src, world_size).files(), src.notes


def _refuse(ckpt: Checkpoint, what: str, hint: str = "") -> NotMergeable:
    return NotMergeable(f"{shown(str(ckpt.path))}: cannot reshard: {what}",
                        hint or "reshard a plain ZeRO checkpoint saved by DeepSpeed")


class Sources:
    """The source files' pickles (read once each) and where each param's states lie."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.notes: list[str] = []
        self._tfs: dict[str, TorchFile] = {}
        self._paths: dict[str, str] = {}  # file name -> its path (asked once per piece)
        tp = ckpt.topology.tp  # a tensor-parallel run's files keyed by global rank, dp * tp + tp rank
        self.optim = {f.rank * tp + (f.coords.tp or 0 if tp > 1 else 0): f for f in ckpt.files_of("optim")}
        self.model = {f.rank: f for f in ckpt.files_of("model")}
        self.old = ckpt.world_size or len(self.optim)
        if sorted(self.optim) != list(range(self.old)):
            raise _refuse(ckpt, f"the optimizer files are not ranks 0..{self.old - 1}")

    def tf(self, name: str) -> TorchFile:
        if name not in self._tfs:
            self._tfs[name] = read_torch_file(self.ckpt.path / name)
        return self._tfs[name]

    def path(self, name: str) -> str:
        path = self._paths.get(name)
        if path is None:
            path = self._paths[name] = str(self.ckpt.path / name)
        return path

    def osd(self, rank: int) -> dict:
        return self.tf(self.optim[rank].name).obj["optimizer_state_dict"]

    def fragments(self, name: str, state: str) -> list[Fragment]:
        """The param's fragments of `state` ("frozen": its 16-bit values), sorted, each with
        its bytes located (Checkpoint.state_fragments)."""
        ckpt = self.ckpt
        if state == "frozen":
            frags = [f for f in ckpt.params[name].fragments if f.source in ("frozen", "module")]
        else:
            frags = ckpt.state_fragments(name, state)
        frags = sorted((f for f in frags if f.numel), key=lambda f: f.start)
        if not frags and ckpt.params[name].numel:
            raise _refuse(ckpt, f"{shown(name, 80)}: the files hold no {state} for it",
                          "only Adam/AdamW optimizer states (exp_avg, exp_avg_sq) are resharded")
        if any(f.offset is None or not f.intact for f in frags):
            raise _refuse(ckpt, f"{shown(name, 80)}: its {state} bytes are not all in the files")
        return frags

    def add_range(self, ops: list, frags: list[Fragment], lo: int, hi: int, name: str,
                  starts: list[int] | None = None) -> None:
        """Append the bytes of elements [lo, hi) of a param, from its `frags` (sorted; with
        their `starts`, found by bisection: a ZeRO-3 param has one fragment per old rank)."""
        got = 0
        first = max(0, bisect.bisect_right(starts, lo) - 1) if starts else 0
        for f in itertools.islice(frags, first, None):
            if f.start >= hi:
                break
            a, b = max(lo, f.start), min(hi, f.start + f.numel)
            if a < b:
                size = DTYPE_SIZES[f.dtype]
                add_piece(ops, Piece(self.path(f.file), f.offset + (a - f.start) * size,
                                     (b - a) * size))
                got += b - a
        if got != hi - lo:
            raise _refuse(self.ckpt, f"{shown(name, 80)}: elements {lo}..{hi} are not all held "
                          "by the rank files", "run `zinspect validate` for details")

    def copy(self, out: OutFile, file: str, obj):
        """`obj` of source `file` with every tensor copied into `out` (whole storages, shared
        ones once: a tie stays a tie)."""
        tf = self.tf(file)
        stores: dict = {}

        def walk(x):
            if isinstance(x, TensorRef):
                st = stores.get(x.storage.key)
                if st is None:
                    rec = tf.records.get(x.storage.key)
                    off = tf.data_offset(x.storage.key)
                    if rec is None or off is None or rec.present < x.storage.nbytes:
                        raise _refuse(self.ckpt, f"{shown(file)}: record {x.storage.key} is "
                                      "missing or truncated")
                    ops: list = []
                    add_piece(ops, Piece(self.path(file), off, x.storage.nbytes))
                    st = stores[x.storage.key] = out.storage(x.dtype, x.storage.numel, ops)
                return NewTensor(st, Size(x.shape), x.offset, tuple(x.stride))
            if isinstance(x, dict):  # the unpickler's dicts may be its own subclasses
                items = [(k, walk(v)) for k, v in x.items()]
                return OrderedDict(items) if isinstance(x, OrderedDict) else dict(items)
            if isinstance(x, list):
                return [walk(v) for v in x]
            if isinstance(x, tuple) and type(x) is tuple:
                return tuple(walk(v) for v in x)
            return x

        return walk(obj)

    def step(self, out: OutFile, state: dict):
        """A copy of the `step` of a param state (a 0-d tensor in torch >= 1.12, else a number)."""
        step = state.get(STEP)
        return self.copy(out, self.optim[0].name, step) if isinstance(step, TensorRef) else step

    def check_states(self, states: dict) -> None:
        for g, st in states.items():
            extra = sorted(str(k) for k in (st or {}) if k not in (STEP, *MOMENTS))
            if extra:
                raise _refuse(self.ckpt, f"group {g}'s optimizer state holds {', '.join(extra)}",
                              "only Adam/AdamW states (exp_avg, exp_avg_sq, step) are resharded")

    def sizes(self, shapes: dict) -> OrderedDict:
        return OrderedDict((k, Size(v)) for k, v in shapes.items())


def _get(obj, *keys):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


def _zero_config(ckpt: Checkpoint) -> dict:
    zo = _get(ckpt.ds_config, "zero_optimization")
    return zo if isinstance(zo, dict) else {}


def round_robin(items: list, n: int) -> list:
    """DeepSpeed's `_round_robin_reorder`: items i % n == 0 first, then 1, ..."""
    return [items[i] for j in range(n) for i in range(j, len(items), n)]


def undo_round_robin(items: list, n: int) -> list:
    order = round_robin(list(range(len(items))), n)
    out = [None] * len(items)
    for pos, i in enumerate(order):
        out[i] = items[pos]
    return out


def _address(numel: int, start: int) -> Opaque:
    cls = type("fragment_address", (Opaque,), {"qualname": FRAGMENT_ADDRESS})
    rec = cls()
    rec.state = {"numel": numel, "start": start}
    return rec


class _Zero12:
    def __init__(self, src: Sources, n: int) -> None:
        self.src, self.n, self.ckpt = src, n, src.ckpt
        self.bf16_optimizer = self.ckpt.layout == "bf16_optimizer"
        osd = src.osd(0)
        base = osd.get("base_optimizer_state")
        if not isinstance(base, dict):
            raise _refuse(self.ckpt, "an elastic checkpoint (zero_optimization.elastic_checkpoint)")
        if any(any(p) for p in osd.get("param_alignment_paddings") or []):
            raise _refuse(self.ckpt, "per-param alignment padding "
                          "(zero_optimization.parameter_alignment) is not supported yet")
        if any(c != src.old for c in osd.get("partition_count") or []):
            raise _refuse(self.ckpt, "a group is partitioned over fewer ranks than the world "
                          "(expert parallel)")
        src.check_states(base.get("state") or {})
        rr = bool(_zero_config(self.ckpt).get("round_robin_gradients"))
        self.orders = []  # per group: (original order, flat order at n) of (name, numel)
        for g in self.ckpt.groups:
            members = [(name, self.ckpt.params[name].numel) for name in g.params]
            orig = undo_round_robin(members, src.old) if rr else members
            self.orders.append((orig, round_robin(orig, n) if rr else orig))

    def files(self) -> list[OutFile]:
        src, ckpt = self.src, self.ckpt
        model = src.model.get(0) or src.model.get(None)
        out = OutFile(model.name)
        obj = dict(src.tf(model.name).obj)
        obj["dp_world_size"] = self.n
        obj["param_shapes"] = [OrderedDict((name, Size(ckpt.params[name].shape))
                                           for name, _ in flat) for _, flat in self.orders]
        if isinstance(obj.get("frozen_param_shapes"), dict):
            obj["frozen_param_shapes"] = src.sizes(obj["frozen_param_shapes"])
        out.obj = src.copy(out, model.name, obj)
        return [out] + [self._optim(r) for r in range(self.n)]

    def _optim(self, r: int) -> OutFile:
        src, n = self.src, self.n
        rf0 = src.optim[0]
        out = OutFile(f"{rf0.prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        osd0 = src.osd(0)
        base0 = osd0["base_optimizer_state"]
        fp32, states, paddings, mappings = [], {}, [], []
        for g, (orig, flat) in enumerate(self.orders):
            total = sum(k for _, k in flat)
            part, real = zero12_partition(total, n), zero12_real(total, n, r)
            lo = r * part
            ops = {s: [] for s in ("fp32", *MOMENTS)}
            at = 0
            for name, k in flat:
                a, b = max(at, lo), min(at + k, lo + real)
                if a < b:
                    for s in ops:
                        src.add_range(ops[s], src.fragments(name, s), a - at, b - at, name)
                at += k
            dtype = self.ckpt.groups[g].dtype or "float32"
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
                        new[key] = src.step(out, state0)
                states[g] = new
            paddings.append(part - real)
            mappings.append(self._mappings(orig, lo, part))
        osd = dict(osd0)
        osd["base_optimizer_state"] = {**base0, "state": states}
        osd["single_partition_of_fp32_groups"] = fp32
        osd["group_paddings"] = paddings
        osd["partition_count"] = [n] * len(self.orders)
        osd["param_slice_mappings"] = mappings
        outer = dict(src.tf(rf0.name).obj)
        outer["optimizer_state_dict"] = osd
        out.obj = src.copy(out, rf0.name, outer)
        return out

    @staticmethod
    def _mappings(orig: list, lo: int, part: int) -> OrderedDict:
        """DeepSpeed's `_create_param_mapping`: each param overlapping [lo, lo+part), walked in
        the group's original order (also under round robin, as DeepSpeed does)."""
        out, at = OrderedDict(), 0
        for name, k in orig:
            if (lo <= at < lo + part or at < lo < at + k) and k:
                a, b = max(at, lo), min(at + k, lo + part)
                out[name] = _address(b - a, a - lo)
            at += k
        return out


class _Zero3:
    def __init__(self, src: Sources, n: int) -> None:
        self.src, self.n, self.ckpt = src, n, src.ckpt
        osd = src.osd(0)
        if "ds_zero_partition_groups" in osd:
            raise _refuse(self.ckpt, "AutoEP ZeRO-3 partition groups are not supported")
        inner = osd.get("optimizer_state_dict")
        if not isinstance(inner, dict):
            raise _refuse(self.ckpt, f"{shown(src.optim[0].name)} has no optimizer_state_dict")
        src.check_states(inner.get("state") or {})
        self.inner0 = inner
        size = _zero_config(self.ckpt).get("sub_group_size", DEFAULT_SUB_GROUP)
        by_group: dict[int, list[str]] = {}
        for g in self.ckpt.groups:
            by_group.setdefault(g.param_group, []).extend(g.params)
        self.param_groups = [by_group[k] for k in sorted(by_group)]
        before = [names for pg in self.param_groups for names in self._split(pg, src.old, size)]
        if before != [g.params for g in self.ckpt.groups]:
            raise _refuse(self.ckpt, "its sub-groups are not what sub_group_size "
                          f"{size!r} gives at world size {src.old}",
                          "the ds_config saved with the checkpoint does not say how "
                          "DeepSpeed grouped the params")
        self.subs = [(pgi, names) for pgi, pg in enumerate(self.param_groups)
                     for names in self._split(pg, n, size)]

    def _split(self, names: list[str], n: int, size) -> list[list[str]]:
        """`_create_fp16_sub_groups`: cut once the per-rank elements reach sub_group_size."""
        shares = [zero3_share(self.ckpt.params[x].numel, n) for x in names]
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

    def files(self) -> list[OutFile]:
        ops = self._optim_ops()
        return [f for r in range(self.n) for f in (self._model(r), self._optim(r, ops[r]))]

    def _optim_ops(self) -> list[list[dict]]:
        """ops[rank][sub-group][state]: each param's fragments are built once, for every rank
        (69B params, 512 -> 256 ranks: 1.1M fragments, not 300M)."""
        src, ckpt, n = self.src, self.ckpt, self.n
        dtype = ckpt.groups[0].dtype or "float32"
        ops = [[{s: [] for s in ("fp32", *MOMENTS)} for _ in self.subs] for _ in range(n)]
        for k, (_, names) in enumerate(self.subs):
            for name in names:
                m = ckpt.params[name].numel
                share = zero3_share(m, n)
                for s in ("fp32", *MOMENTS):
                    frags = src.fragments(name, s)
                    starts = [f.start for f in frags]
                    size = DTYPE_SIZES[dtype] if s == "fp32" else DTYPE_SIZES[frags[0].dtype]
                    for r in range(n):
                        held = zero3_held(m, n, r)
                        src.add_range(ops[r][k][s], frags, r * share, r * share + held, name,
                                      starts)
                        add_zeros(ops[r][k][s], (share - held) * size)
        return ops

    def _model(self, r: int) -> OutFile:
        src, ckpt, n = self.src, self.ckpt, self.n
        # each rank saves its own buffers (BatchNorm statistics differ per rank): rank r keeps
        # the old rank r's, a new rank takes rank 0's (what zero_to_fp32 merges)
        rf = src.model[r] if r in src.model else src.model[0]
        if r not in src.model and r == src.old and ckpt.buffers:
            src.notes.append(f"ranks {src.old}..{n - 1} start from rank 0's buffers (each "
                             "ZeRO-3 rank saves its own, e.g. BatchNorm statistics)")
        out = OutFile(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        obj = dict(src.tf(rf.name).obj)
        obj["dp_world_size"] = n
        obj["param_shapes"] = [OrderedDict((x, Size(ckpt.params[x].shape)) for x in names)
                               for _, names in self.subs]
        if r and isinstance(obj.get("shared_params"), dict):
            obj["shared_params"] = {}  # only global rank 0 records the ties
        if isinstance(obj.get("frozen_param_shapes"), dict):
            obj["frozen_param_shapes"] = src.sizes(obj["frozen_param_shapes"])
        frozen = obj.get("frozen_param_fragments")
        if isinstance(frozen, dict):
            new = OrderedDict()
            for name, ref in frozen.items():
                k = ckpt.params[name].numel
                share, held = zero3_share(k, n), zero3_held(k, n, r)
                ops: list = []
                src.add_range(ops, src.fragments(name, "frozen"), r * share, r * share + held, name)
                add_zeros(ops, (share - held) * ref.itemsize)
                new[name] = out.tensor(ref.dtype, (share,), ops)
            obj["frozen_param_fragments"] = new
        out.obj = src.copy(out, rf.name, obj)
        return out

    def _optim(self, r: int, rank_ops: list[dict]) -> OutFile:
        src, ckpt, n = self.src, self.ckpt, self.n
        rf0 = src.optim[0]
        out = OutFile(f"{rf0.prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        dtype = ckpt.groups[0].dtype or "float32"
        states0 = self.inner0.get("state") or {}
        template = next((s for s in states0.values() if isinstance(s, dict)), None)
        flats, states = [], {}
        for k, (_, names) in enumerate(self.subs):
            ops = rank_ops[k]
            numel = sum(zero3_share(ckpt.params[x].numel, n) for x in names)
            flats.append(out.tensor(dtype, (numel,), ops["fp32"]))
            if template is not None:
                states[k] = {key: out.tensor(v.dtype, (numel,), ops[key]) if key in MOMENTS
                             else src.step(out, template) for key, v in template.items()}
        groups = []
        for pgi, pg in enumerate(self.inner0.get("param_groups") or []):
            groups.append({**pg, "params": [k for k, (g, _) in enumerate(self.subs) if g == pgi]})
        osd = dict(src.osd(0))
        osd["optimizer_state_dict"] = {**self.inner0, "state": states, "param_groups": groups}
        osd["fp32_flat_groups"] = flats
        osd["partition_count"] = n
        outer = dict(src.tf(rf0.name).obj)
        outer["optimizer_state_dict"] = osd
        out.obj = src.copy(out, rf0.name, outer)
        return out

