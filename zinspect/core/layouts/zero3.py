"""ZeRO stage 3: each param of sub-group k is cut into ceil(n/ws) elements per rank (the last
ranks padded), and rank r's pieces are concatenated, padding included, in `fp32_flat_groups[k]`.
Frozen params: each rank's model states hold its ceil(n/ws) 16-bit elements.

A param's fragments are built when first asked for (`MasterFragments`, `Fragments(make=...)`):
a 300k-name model over 64 ranks would be 19M of them. `attach` and `attach_frozen` are the geometry alone,
reusable per slice (tensor-parallel ranks, pipeline stages)."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from functools import partial

from zinspect.core import codes, partition
from zinspect.core.layouts import common
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.pickled import get, located, numel, short
from zinspect.core.model import Coords, Finding, Fragment, Fragments, Param, ParamGroup, RankFile, TensorAt
from zinspect.core.params import ParamTable, made
from zinspect.core.torchzip import TensorRef, TorchFile

Members = list[tuple[str, tuple[int, ...] | None]]


def recognise(ctx: LoadContext) -> bool:
    return isinstance(ctx.ref_osd, dict) and "zero_stage" in ctx.ref_osd and \
        ctx.ckpt.stage == 3


def describe(ctx: LoadContext) -> None:
    names = common.describe_names(ctx)
    if names is None:
        return
    c = ctx.ckpt
    ws = c.world_size or len(ctx.optim)
    attach_columns(ctx, ctx.optim, names.group_names, names.group_shapes, ws)
    common.attach_moments(ctx, ctx.optim)
    common.attach_frozen(ctx, names)
    common.finish(ctx, names)


def attach(ctx: LoadContext, files: dict[int, RankFile], flat_groups: Sequence[Members],
           partition_count: int, *, shard: int | None = None,
           coords: Coords | None = None) -> list[ParamGroup]:
    """Attach (lazily) the fp32 fragments of `flat_groups` (sub-group k =
    `fp32_flat_groups[k]` of each file) held by `files` ({dp rank: optimizer file}) to
    `ctx.ckpt.params`, cut over `partition_count` ranks; add one ParamGroup per sub-group to
    `ctx.ckpt.groups` (returned). `shard` / `coords`: as in zero12.attach."""
    return attach_columns(ctx, files, [[n for n, _ in m] for m in flat_groups],
                          [[s for _, s in m] for m in flat_groups], partition_count,
                          shard=shard, coords=coords)


def attach_columns(ctx: LoadContext, files: dict[int, RankFile], group_names: list[list[str]],
                   group_shapes: list[list[tuple[int, ...] | None]], partition_count: int, *,
                   shard: int | None = None, coords: Coords | None = None) -> list[ParamGroup]:
    """`attach`, of the flat groups' names and shapes as columns (`common.Names`). The params
    of a `ParamTable` join their group at once (`ParamTable.join`), others one by one."""
    c = ctx.ckpt
    ws = partition_count
    group_of = common.param_groups_of(ctx, files)
    flats: dict[int, list[TensorAt | None]] = {}
    for r, rf in files.items():
        tf = ctx.torch_file(rf)
        fl = get(tf.obj, "optimizer_state_dict", "fp32_flat_groups") if tf else None
        if isinstance(fl, list):
            flats[r] = [located(tf, rf.name, r, t) if isinstance(t, TensorRef) else None
                        for t in fl]
    out = []
    for gi, (names, shapes) in enumerate(zip(group_names, group_shapes, strict=True)):
        try:
            numels = list(map(math.prod, shapes))
        except TypeError:  # a shape that is not valid (None)
            numels = list(map(numel, shapes))
        g = ParamGroup(gi, group_of.get(gi, 0 if not group_of else gi), names, sum(numels),
                       coords=coords)
        c.groups.append(g)
        out.append(g)
        parts = {r: fl[gi] for r, fl in flats.items() if gi < len(fl) and fl[gi] is not None}
        for r, part in parts.items():
            g.partition_numel[r], g.padding[r] = part.numel, 0
            g.dtype = g.dtype or part.dtype
        shares = partition.zero3_shares(numels, ws)
        # only the last ranks of a param hold padding: ranks n // P and on, when < ws (none
        # when ws divides n: counted only for the sizes that pad, usually none)
        padded = {n for n in set(numels) if (P := partition.zero3_share(n, ws)) and n // P < ws}
        for n, k in Counter(filter(padded.__contains__, numels) if padded else ()).items():
            P = partition.zero3_share(n, ws)
            for r in range(n // P, ws):
                if r in parts:
                    g.padding[r] += k * (P - partition.zero3_held(n, ws, r))
        source = (parts, gi, shard)  # shared by the group's params
        params, pg = c.params, g.param_group
        if type(params) is ParamTable and shard is None and coords is None and \
                params.join(gi, pg, names, numels, shares, partial(MasterFragments, source), ws):
            continue
        o = 0
        for name, shape, n, P in zip(names, shapes, numels, shares, strict=True):
            p = params.get(name)  # common.join_group, inline
            if p is not None:
                p.group, p.sub_group = pg, gi
                if not p.shape and shape:
                    p.shape = shape
                if P:
                    p.fragments = MasterFragments(source, o, n, P)
            o += P
    return out


def attach_frozen(ctx: LoadContext, model_files: dict[int, RankFile], partition_count: int,
                  shard: int | None = None) -> None:
    """Frozen params (not tied aliases) of `ctx.ckpt`: lazily, from each rank's model states
    (`model_files`: {dp rank: file}) holding ceil(n / partition_count) elements of each. The
    ranks read now (rank 0) are checked now; the others when validate runs
    (`Checkpoint.later_checks`): their model states are read then, as the merge reads them."""
    frozen = [p for p in made(ctx.ckpt.params) if p.frozen and not p.tied_to]
    if not frozen:
        return
    source = FrozenFragments(ctx, model_files, partition_count, shard)
    for p in frozen:
        p.fragments = Fragments(make=partial(source.fragments, p.name, p.numel),
                                reads=source.unread)
    source.check(ctx.find, frozen, sorted(source.parsed))
    if source.unread():
        ctx.ckpt.later_checks.append(partial(source.check_unread, frozen))


class FrozenFragments:
    """ZeRO-3 frozen params: each rank's model states hold its ceil(n/ws) elements. The files
    of ranks > 0 are unpickled on first use, all at once, in threads."""

    def __init__(self, ctx: LoadContext, files: dict[int, RankFile], ws: int,
                 shard: int | None = None) -> None:
        self.ws, self.shard, self.files, self.parse = ws, shard, files, ctx.parse
        self.parsed: dict[int, TorchFile] = {r: ctx.torch_file(f) for r, f in files.items()
                                             if ctx.torch_file(f)}
        self._lock = threading.Lock()
        self._loaded = False
        self.flagged: set[str] = set()  # frozen params `check` found wrong

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            shallow = {id(f): r for r, f in self.files.items() if f.shallow}
            got = self.parse([f for f in self.files.values() if f.shallow])
            for key, tf in got.items():
                self.parsed[shallow[key]] = tf
            self._loaded = True

    def check(self, add, frozen: list[Param], ranks: list[int]) -> None:
        """What the merge refuses in `ranks`' model states, as findings (`add`: LoadContext.find
        or validate's): a frozen param whose fragment is of another size than its declared shape
        gives each rank, or that is not there. A param found wrong once is not named again
        for the ranks read later (a forged shape: every rank's fragment differs from it)."""
        ranks = [r for r in ranks if r < self.ws]  # a rank beyond: a stale file (its finding)
        # ranks of one pickle (shared by `load._FirstPickle`) hold the same fragments: each
        # distinct one is asked first, and only a param it has wrong is asked rank by rank
        tables = list({id(t): t for t in (get(self.parsed[r].obj, "frozen_param_fragments")
                                          for r in ranks)}.values())
        for p in frozen:
            if p.name in self.flagged or not (P := partition.zero3_share(p.numel, self.ws)):
                continue
            if all(type(t := get(table, p.name)) is TensorRef and t.numel == P
                   for table in tables):
                continue
            absent = []
            for r in ranks:
                t = get(self.parsed[r].obj, "frozen_param_fragments", p.name)
                if not isinstance(t, TensorRef):
                    absent.append(r)
                elif t.numel != P:
                    self.flagged.add(p.name)
                    add("shape-mismatch", f"{p.name}: frozen_param_shapes says {short(p.shape)}, "
                        f"{P:,} elements a rank; rank {r}'s frozen fragment holds {t.numel:,}",
                        common.REPLACE_MODEL_STATES, param=p.name, file=self.files[r].name, rank=r)
            if absent:
                self.flagged.add(p.name)
                add("param-coverage", f"{p.name}: the model states of rank "
                    f"{', '.join(map(str, absent))} hold no frozen fragment of it",
                    common.REPLACE_MODEL_STATES, param=p.name, file=self.files[absent[0]].name,
                    rank=absent[0] if len(absent) == 1 else None)

    def check_unread(self, frozen: list[Param]) -> list[Finding]:
        """`check` of the ranks not read at open, read now; a file that cannot be read is an
        unreadable-file finding (it was only checked whole at open)."""
        late = sorted(r for r, f in self.files.items() if f.shallow)
        self._load()
        out: list[Finding] = []

        def add(code: str, message: str, hint: str = "", **where) -> None:
            out.append(codes.finding(code, message, hint, **where))

        for r in late:
            if r not in self.parsed:
                add("unreadable-file", f"{self.files[r].name} cannot be read: its pickle, read "
                    "for the frozen params' fragments, is not a model-states pickle zinspect "
                    "reads (`zinspect validate --deep` says why)", "restore it from the run",
                    file=self.files[r].name, rank=r)
        self.check(add, frozen, [r for r in late if r in self.parsed])
        return out

    def unread(self) -> bool:
        """Some rank's model states are still to be parsed."""
        return not self._loaded and any(f.shallow for f in self.files.values())

    def fragments(self, name: str, n: int) -> list[Fragment]:
        self._load()
        P = partition.zero3_share(n, self.ws)
        parts = {}
        for r, tf in sorted(self.parsed.items()):
            t = get(tf.obj, "frozen_param_fragments", name)
            if isinstance(t, TensorRef) and t.numel == P:  # real saves: P, padded (else forged)
                parts[r] = located(tf, self.files[r].name, r, t)
        return fragments_of(parts, None, 0, n, P, "frozen", self.shard) if P else []


class MasterFragments(Fragments):
    """A ZeRO-3 param's fp32 master fragments, built from its sub-group's partitions when first
    used. A lean `Fragments(make=partial(fragments_of, ...))`: ~120 bytes a param instead of
    ~370 (its partial, the partial's arguments and an empty list), 80 MB at 297k params."""

    __slots__ = ("_source", "_offset", "_n", "_share")

    def __init__(self, source: tuple[dict[int, TensorAt], int, int | None], offset: int, n: int,
                 share: int) -> None:  # no Fragments.__init__: the list is made when built
        self._source, self._offset, self._n, self._share = source, offset, n, share
        self._items = self._make = self._reads = None

    def _all(self) -> list[Fragment]:
        if self._items is None:
            parts, group, shard = self._source
            built = fragments_of(parts, group, self._offset, self._n, self._share, "master",
                                 shard)
            with _BUILT:  # two threads may both build: the first to finish keeps its list
                if self._items is None:
                    self._items = built
        return self._items

    def __repr__(self) -> str:
        return "Fragments(<lazy>)" if self._items is None else f"Fragments({self._items!r})"


_BUILT = threading.Lock()


def fragments_of(parts: dict[int, TensorAt], group: int | None, offset: int, n: int, P: int,
                 source: str, shard: int | None = None) -> list[Fragment]:
    """A ZeRO-3 param of n elements at element `offset` of each rank's partition: rank r holds
    elements [r*P, r*P + held) followed by P - held padding elements."""
    out = []
    for r, part in parts.items():
        if offset + P > part.numel:
            continue  # partition too short: validate reports the group size
        held = max(0, min(n - r * P, P))
        out.append(part.fragment(group, offset, r * P, held, P - held, source, shard))
    return out


LAYOUT = Layout("zero", recognise, describe)
