"""Native DeepSpeed MoE (`deepspeed.moe.layer.MoE`): experts split over ep ranks, ZeRO 1 or 2.

Files (parallel-layouts.md §4):
  * `mp_rank_00_model_states.pt`: the dense params (`module` leaves the experts out),
    `num_experts` per MoE layer, and `param_shapes` whose expert groups list only rank 0's LOCAL
    experts (`...deepspeed_experts.0.fc1.weight` for local expert 0).
  * `layer_L_expert_E_mp_rank_00_model_states.pt`: the 16-bit tensors of MoE layer L's expert
    E under full names with the GLOBAL expert id: global = ep_rank × num_local + local, where
    ep_rank = rank % ep_size.
  * one optimizer file per rank: the dense flat groups over all ranks, and the expert groups
    (`moe: True`, named `ep_size_N`) of the rank's own local experts, cut over its
    expert-data-parallel group (the ranks with the same ep_rank) — `partition_count` says so,
    e.g. [4, 4, 2, 2] at world 4, ep 2.
So an expert group is one ZeRO-1/2 slice per ep rank (members renamed to global ids) over that
ep rank's ranks. Every expert of every MoE layer must have its file and its partitions: a
missing one is located, never dropped. DeepSpeed refuses native MoE with ZeRO-3; ZeRO-0 MoE
(`expp_rank_*` optimizer files) is moe_zero0.py's.
"""

from __future__ import annotations

from collections import defaultdict

from zinspect.core.layouts import common, moe_zero0, one_save, zero12
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.gaps import SALVAGE, missing_files, outside, stale
from zinspect.core.layouts.moe_names import EXPERT_ID, EXPERTS, ep_size, global_name, with_expert
from zinspect.core.layouts.pickled import get, located
from zinspect.core.model import Coords, Param, RankFile, Topology
from zinspect.core.torchzip import TensorRef


def recognise(ctx: LoadContext) -> bool:
    """The engine records `num_experts` in an MoE run's model states (a stray expert file beside
    a plain ZeRO checkpoint does not make it one)."""
    return isinstance(get(ctx.model_state, "num_experts"), list)


class _MoE:
    def __init__(self, ctx: LoadContext) -> None:
        self.ctx, self.c = ctx, ctx.ckpt
        self.ws = self.c.world_size or len(ctx.optim)
        self.ranks = {r: rf for r, rf in ctx.optim.items() if r < self.ws}  # beyond: stale
        num = get(ctx.model_state, "num_experts")
        self.num_experts = [n for n in num if type(n) is int and n > 0] \
            if isinstance(num, list) else []
        self.layers: list[str] = []  # MoE layer prefixes, in module order (= layer ids)
        self.expert_files: dict[tuple[int, int], RankFile] = {}

    def describe(self) -> None:
        ctx, c = self.ctx, self.c
        names = common.describe_names(ctx)
        if names is None:
            return
        self.layers = _moe_layers(list(names.module) + [n for g in names.flat_groups for n, _ in g])
        if not ctx.optim:
            moe_zero0.describe(self, names)
            self._reorder()
            common.finish(ctx, names)
            c.master_dtype = c.master_dtype or ("float32" if c.params and all(
                f.dtype == "float32" for p in c.params.values() for f in p.fragments) else None)
            return
        pcs = _partition_counts(ctx)
        if c.params:  # none: the model states are unreadable or name none (their own finding)
            common.undescribed_groups(ctx.find, len(pcs), len(names.flat_groups))
        expert_groups = self._expert_groups(pcs)
        dense = {gi: m for gi, m in enumerate(names.flat_groups) if gi not in expert_groups}
        # BF16_Optimizer (bf16 + fp32 grad accumulation) keeps its partitions' padding
        keep = isinstance(ctx.ref_osd, dict) and "zero_stage" not in ctx.ref_osd
        zero12.attach(ctx, self.ranks, dense, pcs or self.ws, keep_padding=keep)
        eps = {ep for ep, _ in expert_groups.values()}
        self._sort_files(eps)
        for gi, (ep, _) in sorted(expert_groups.items()):
            if gi >= len(names.flat_groups):  # param_shapes cut short: group-coverage above
                continue
            for e in range(ep):
                members = [(self.global_of(n, e, ep), s) for n, s in names.flat_groups[gi]]
                for (n, s), (ln, _) in zip(members, names.flat_groups[gi], strict=True):
                    base = c.params.get(ln)
                    if n not in c.params:
                        c.params[n] = Param(n, s or (), base.dtype if base else "")
                files = {r // ep: rf for r, rf in self.ranks.items() if r % ep == e}
                zero12.attach(ctx, files, {gi: members}, pcs, keep_padding=keep,
                              coords=Coords(ep=e))
        self._missing_ranks()
        one_save.outliers(ctx.find, [(rf, rf.step) for rf in self.ranks.values()],
                          "at optimizer step {}")
        common.attach_moments(ctx, self.ranks)
        self._expert_files()
        if any(p.frozen and not p.fragments for p in c.params.values()):
            common.attach_whole_frozen(ctx, names)
        c.topology = Topology(dp=self.ws, ep=max(eps, default=1), files=c.files)
        self._reorder()
        common.finish(ctx, names)

    # ------------------------------------------------------------------ groups and names
    def _expert_groups(self, pcs: list[int]) -> dict[int, tuple[int, int]]:
        """flat group -> (ep size, partition count) of the optimizer's `moe` param groups."""
        groups = get(self.ctx.ref_osd, "base_optimizer_state", "param_groups")
        out = {}
        for gi, g in enumerate(groups if isinstance(groups, list) else []):
            if not isinstance(g, dict) or g.get("moe") is not True:
                continue
            pc = pcs[gi] if gi < len(pcs) else 0
            ep = ep_size(g.get("name")) or (self.ws // pc if pc else 0)
            if ep < 1 or (pc and ep * pc != self.ws) or ep > max(len(self.ranks), 1):
                self.ctx.find("topology-mismatch", f"expert group {gi}: ep size {ep} × its "
                              f"partition count {pc} is not the world size {self.ws}",
                              "the optimizer files come from different runs; restore them",
                              group=gi)
                continue
            out[gi] = (ep, pc)
        return out

    def global_of(self, name: str, ep_rank: int, ep: int) -> str:
        layer = self.layer_of(name)
        if layer is None or layer >= len(self.num_experts):
            return name
        return global_name(name, ep_rank, self.num_experts[layer] // ep)

    def layer_of(self, name: str) -> int | None:
        head = name.split(EXPERTS, 1)[0] if EXPERTS in name else None
        return self.layers.index(head) if head in self.layers else None

    @staticmethod
    def expert_of(name: str) -> int:
        """The expert id in an expert param's name (global or local, as the name has it)."""
        return int(EXPERT_ID.search(name)[1])

    def num_local(self, name: str, ep: int) -> int:
        layer = self.layer_of(name)
        return self.num_experts[layer] // ep if layer is not None and \
            layer < len(self.num_experts) else 0

    def local_name(self, name: str, ep: int) -> str:
        """A global expert param name as its ep rank names it locally."""
        return with_expert(name, self.expert_of(name) % max(self.num_local(name, ep), 1))

    # ------------------------------------------------------------------ files
    def _sort_files(self, eps: set[int]) -> None:
        ep = max(eps, default=1)
        for rf in self.c.files:
            if rf.kind == "optim":
                rf.coords = Coords(dp=rf.rank, ep=rf.rank % ep)
                if rf.rank >= self.ws or (rf.mp_rank or 0) > 0:
                    stale(self.ctx.find, rf, outside([("dp", self.ws), ("tp", 1)],
                                                     (rf.rank, rf.mp_rank or 0)))
            elif rf.kind == "expert":
                layer, expert = rf.coords.layer or 0, rf.coords.expert
                n = self.num_experts[layer] if layer < len(self.num_experts) else 0
                rf.coords = Coords(ep=expert // max(n // ep, 1) if n else 0, layer=layer,
                                   expert=expert)
                if expert >= n or (rf.mp_rank or 0) > 0:
                    stale(self.ctx.find, rf, outside([("expert", n), ("tp", 1)],
                                                     (expert, rf.mp_rank or 0), f"MoE layer {layer}'s"))
                else:
                    self.expert_files[(layer, expert)] = rf

    def _missing_ranks(self) -> None:
        """Each rank's file holds a partition of the dense groups and of its ep rank's experts."""
        prefix = next((rf.prefix for rf in self.ctx.optim.values()), "")
        missing_files(self.ctx.find, [("dp", self.ws)], {(r,) for r in self.ctx.optim},
                      "missing-optimizer-file", "optimizer files",
                      lambda r: f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                      "its partitions of the dense params and of its ep rank's experts are lost",
                      SALVAGE)

    def _expert_files(self) -> None:
        """Every expert of every MoE layer has its file (its 16-bit weights: the params'
        dtype, and the only copy of a frozen expert param)."""
        c, ctx = self.c, self.ctx
        per_expert: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name in c.params:
            layer = self.layer_of(name)
            m = EXPERT_ID.search(name)
            if layer is not None and m:
                per_expert[(layer, int(m[1]))].append(name)
        for layer, n in enumerate(self.num_experts):
            where = f"MoE layer {layer} ({self.layers[layer] if layer < len(self.layers) else '?'})"
            missing_files(ctx.find, [("expert", n)],
                          {(e,) for lay, e in self.expert_files if lay == layer}, "missing-expert-file",
                          f"expert files of {where}",
                          lambda e, layer=layer: f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt",
                          f"its 16-bit weights of {where} are lost", "copy it from the run")
            for (lay, e), rf in sorted(self.expert_files.items()):
                if lay != layer:
                    continue
                tf = ctx.torch_file(rf)
                held = tf.obj if tf is not None and isinstance(tf.obj, dict) else {}
                mine = per_expert[(layer, e)]
                foreign = next((k for k, t in held.items() if not isinstance(t, TensorRef) or
                                k not in mine), None)
                if foreign is not None:
                    ctx.find("stale-rank-file", f"{rf.name} holds {foreign}, which is not a "
                             f"param of expert {e} of MoE layer {layer}", "a file from another "
                             "run or renamed; restore the one saved with the others",
                             file=rf.name)
                    continue
                for name, t in held.items():
                    p = c.params[name]
                    p.dtype = t.dtype
                    if p.frozen:
                        at = located(tf, rf.name, 0, t)
                        p.fragments.append(at.fragment(None, 0, 0, min(t.numel, p.numel),
                                                       source="module"))
                for name in per_expert.get((layer, e), []):
                    if name not in held:
                        ctx.find("missing-expert-file", f"{rf.name} lacks {name}",
                                 "restore the expert file saved with the others",
                                 file=rf.name, param=name)

    def _reorder(self) -> None:
        """Module order: each MoE layer's experts by global id where its first expert was."""
        c = self.c
        out, done = {}, set()
        for name, p in list(c.params.items()):
            layer = self.layer_of(name)
            if layer is None:
                out[name] = p
            elif layer not in done:
                done.add(layer)
                experts = [q for q in c.params.values() if self.layer_of(q.name) == layer]
                for q in sorted(experts, key=lambda q: int(EXPERT_ID.search(q.name)[1])):
                    out[q.name] = q
        c.params = out


def _moe_layers(names: list[str]) -> list[str]:
    """MoE layer prefixes (`layers.0.moe`) in module order: the gate of each is in `module`."""
    out: list[str] = []
    for n in names:
        for marker in (".deepspeed_moe.gate.", EXPERTS):
            if marker in n:
                head = n.split(marker, 1)[0]
                if head not in out:
                    out.append(head)
    return out


def _partition_counts(ctx: LoadContext) -> list[int]:
    pc = get(ctx.ref_osd, "partition_count")
    return [x if type(x) is int else 0 for x in pc] if isinstance(pc, list) else []


def describe(ctx: LoadContext) -> None:
    _MoE(ctx).describe()


LAYOUT = Layout("moe", recognise, describe)
