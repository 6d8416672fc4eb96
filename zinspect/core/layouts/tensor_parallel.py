"""Tensor parallel (AutoTP, Megatron-DeepSpeed style): one slice of files per tp rank.

Tp rank T has its model states (`mp_rank_TT_model_states.pt`; at ZeRO-3 one per dp rank,
`zero_pp_rank_D_mp_rank_TT_model_states.pt`) naming its shards (`param_shapes` holds shard
shapes), and one optimizer file per dp rank (`[bf16_]zero_pp_rank_D_mp_rank_TT_optim_states.pt`,
global rank D*tp + T) that partitions those shards exactly as plain ZeRO partitions a model. So:

* the params' names, ties and buffers come from tp rank 0 (`common.describe_names`);
* each param's full shape and `Param.shards` (what each tp rank holds, as boxes) come from the
  `universal_checkpoint_info` every model-states file carries (`tp_rules`): the split patterns,
  cross-checked with AutoTP's `affine_map` when there is one (the map is used, as DeepSpeed's
  converter does);
* each tp rank's optimizer files get the ZeRO geometry of plain ZeRO (`zero12.attach` /
  `zero3.attach`), their fragments indexing that rank's shard (`Fragment.shard`).

A param whose split cannot be known is named (tp-split-unknown) and gets no shards: the merge
refuses it rather than guess.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache, partial

from zinspect.core.layouts import common, headers, tp_affine, tp_rules, zero3, zero12
from zinspect.core.layouts.base import Layout, LoadContext
from zinspect.core.layouts.gaps import outside, stale
from zinspect.core.layouts.pickled import as_group_list, get, group_members, located, numel, shape
from zinspect.core.layouts.tp_checks import REPLACE, check_sizes, report_missing
from zinspect.core.model import Box, Coords, Fragments, Param, RankFile, Shard, Topology
from zinspect.core.torchzip import TensorRef

#: a world size beyond any run (a forged partition count or tp degree stops here)
MAX_WORLD = 1 << 20


@dataclass
class Slice:
    """The files of one tp rank."""

    tp: int
    model: RankFile | None = None  # the model states its names/shapes are read from
    models: dict[int, RankFile] = field(default_factory=dict)  # ZeRO-3: dp rank -> model states
    optim: dict[int, RankFile] = field(default_factory=dict)  # dp rank -> optimizer file
    state: dict | None = None  # the model states' pickle
    flat_groups: list = field(default_factory=list)  # [(name, shard shape)] per flat group


def _model_state(ctx: LoadContext) -> dict:
    return ctx.model_state if isinstance(ctx.model_state, dict) else {}


def tp_degree(ctx: LoadContext) -> int | None:
    """The tp size the model states record (checkpoint_parallel_dimensions / mp_world_size)."""
    ms = _model_state(ctx)
    for value in (get(ms, "checkpoint_parallel_dimensions", "tp_degree"), ms.get("mp_world_size")):
        if type(value) is int and value > 0:
            return value
    return None


def recognise(ctx: LoadContext) -> bool:
    """The model states declare tp > 1 (else, when they declare nothing, several mp ranks are
    named); ZeRO-1/2/3 (ZeRO-0 TP keeps its masters in the model states, which this layout does
    not read); no pipeline layer or expert files. Files named mp_rank_01 beside model states that
    declare tp 1 are not a TP checkpoint (the placeholder names them)."""
    return not ctx.kinds & {"layer", "expert", "expert_optim"} and bool(ctx.optim_files) and \
        declares_tp(ctx)


def declares_tp(ctx: LoadContext) -> bool:
    """The model states declare tp > 1 (or, declaring nothing, several mp ranks are named)."""
    tp = tp_degree(ctx)
    return tp > 1 if tp is not None else len(ctx.mp_ranks) > 1


def beyond_any_run(ctx: LoadContext, **sizes: int) -> bool:
    """Sizes (pp=, tp=, dp=) no real run has: a forged or damaged file. One finding (not one
    per rank of a forged grid) and True: the layout describes nothing more."""
    if max(sizes.get("tp", 1), sizes.get("pp", 1)) <= tp_rules.MAX_RANKS and \
            math.prod(sizes.values()) <= MAX_WORLD:
        return False
    ctx.find("topology-mismatch", f"the files declare {' x '.join(f'{a} {n}' for a, n in sizes.items())}: "
             "beyond any real run", "a model-states or optimizer file is damaged or forged; restore "
             "it from the run", file=ctx.model_file.name if ctx.model_file else None)
    return True


def describe(ctx: LoadContext) -> None:
    c = ctx.ckpt
    names = common.describe_names(ctx)
    if names is None:
        return
    tp = tp_degree(ctx) or (max(ctx.mp_ranks) + 1 if ctx.mp_ranks else 1)
    dp = _dp_size(ctx)
    if beyond_any_run(ctx, tp=tp, dp=dp):
        common.finish(ctx, names)
        return
    c.topology = Topology(dp=dp, tp=tp, files=list(c.files))
    slices = _slices(ctx, tp, dp)
    infos = _split_info(ctx, slices)
    shards = _shard_shapes(ctx, slices)
    unread = {s.tp for s in slices if s.state is None}
    if infos is None and not unread:  # one cause, one finding (not one per param)
        ctx.find("tp-split-unknown", f"the model states carry no universal_checkpoint_info: how "
                 f"the tp shards of {len(c.owners())} params join cannot be known",
                 "zinspect does not guess splits; DeepSpeed's converter needs it too (Megatron-"
                 "DeepSpeed and AutoTP write it). Nothing can be merged", file=slices[0].model.name
                 if slices[0].model else None)
        unplaced = c.owners()
    else:
        unplaced = [p for p in c.owners()
                    if not place(ctx, p, infos, shards.get(p.name, {}), tp, unread)]
    for p in c.params.values():  # a tied alias has its owner's full shape
        owner = c.params.get(p.tied_to) if p.tied_to else None
        if owner is not None:
            p.shape = owner.shape
    for s in slices:
        if not s.optim:
            continue
        if c.stage == 3:
            _chained(c, partial(zero3.attach, ctx, s.optim, s.flat_groups, dp, shard=s.tp,
                                coords=Coords(tp=s.tp)))
        else:
            zero12.attach(ctx, s.optim, s.flat_groups, dp, shard=s.tp, coords=Coords(tp=s.tp))
        common.attach_moments(ctx, s.optim)
    _attach_frozen(ctx, slices, dp)
    for p in unplaced:  # their ranges index shards that cannot be placed: nothing to merge
        p.fragments = []
    common.finish(ctx, names)
    c.world_size = dp * tp


# -- files ------------------------------------------------------------------------------------


def _dp_size(ctx: LoadContext) -> int:
    ms = _model_state(ctx)
    counts = Counter(f.partition_count[0] for f in ctx.optim_files if f.partition_count)
    if counts:
        return counts.most_common(1)[0][0]
    dp = ms.get("dp_world_size")
    return dp if type(dp) is int and dp > 0 else max(1, len(ctx.optim))


def _slices(ctx: LoadContext, tp: int, dp: int) -> list[Slice]:
    """Each tp rank's files; missing ones and files of another topology reported."""
    c = ctx.ckpt
    slices = [Slice(t) for t in range(tp)]
    for rf in c.files:
        t = rf.coords.tp
        if rf.kind not in ("optim", "model") or rf.mp_rank is None:
            continue
        if t >= tp or (rf.rank is not None and rf.rank >= dp):
            stale(ctx.find, rf, outside([("tp", tp)], (t,)) if rf.rank is None else
                  outside([("tp", tp), ("dp", dp)], (t, rf.rank)))
            continue
        s = slices[t]
        if rf.kind == "optim":
            if rf.rank in s.optim:
                if t:  # tp rank 0's are reported by headers.read_headers
                    ctx.find("duplicate-rank", f"tp rank {t}, dp rank {rf.rank} has two optimizer "
                             f"files: {s.optim[rf.rank].name} and {rf.name}", "remove the one that "
                             "does not belong to this run", file=rf.name, rank=rf.rank)
                continue
            s.optim[rf.rank] = rf
            if t and ctx.torch_file(rf) is not None:
                headers.read_optim_header(ctx, rf)
        elif (rf.rank is None) == (c.stage != 3):  # ZeRO-3: one per dp rank, else one per tp rank
            s.models[rf.rank or 0] = rf
        else:
            stale(ctx.find, rf, f"it is a ZeRO-{'3' if rf.rank is not None else '1/2'} model-states "
                  f"file, and this checkpoint is ZeRO-{c.stage}")
    for s in slices:
        s.model = next((s.models[r] for r in sorted(s.models) if ctx.torch_file(s.models[r])), None)
        if s.model is None and s.models:  # ZeRO-3 without dp rank 0's: read the next one
            first = s.models[min(s.models)]
            if first.shallow:
                ctx.parsed.update(ctx.parse([first]))
                s.model = first if ctx.torch_file(first) else None
        tf = ctx.torch_file(s.model)
        s.state = tf.obj if tf is not None and isinstance(tf.obj, dict) else None
        s.flat_groups = [group_members(g) for g in as_group_list(get(s.state, "param_shapes"))]
    report_missing(ctx, slices, tp, dp)
    for s in slices:
        check_sizes(ctx, s, dp)
    return slices


# -- split rules ------------------------------------------------------------------------------


def _split_info(ctx: LoadContext, slices: list[Slice]) -> dict | None:
    """tp rank 0's universal_checkpoint_info; another rank's that differs is reported."""
    infos = [(s, get(s.state, "universal_checkpoint_info")) for s in slices if s.state is not None]
    ref = next((i for _, i in infos if isinstance(i, dict)), None)
    for s, info in infos:
        if info != ref:
            keys = sorted(k for k in {*(info or {}), *(ref or {})} if isinstance(k, str) and
                          get(info, k) != get(ref, k))
            ctx.find("tp-info-mismatch", f"tp rank {s.tp}'s universal_checkpoint_info differs from "
                     f"the first rank's in {', '.join(keys[:4]) or 'its type'}: the ranks describe "
                     "their splits differently",
                     "the files come from different runs or versions; tp rank 0's is used",
                     file=s.model.name, rank=s.tp)
    return ref


def _shard_shapes(ctx: LoadContext, slices: list[Slice]) -> dict[str, dict[int, tuple]]:
    out: dict[str, dict[int, tuple]] = {}
    for s in slices:
        for group in s.flat_groups:
            for name, shp in group:
                if shp is not None:
                    out.setdefault(name, {})[s.tp] = shp
        frozen = get(s.state, "frozen_param_shapes")
        for name, value in (frozen.items() if isinstance(frozen, dict) else ()):
            if shape(value) is not None:
                out.setdefault(str(name), {})[s.tp] = shape(value)
    return out


def place(ctx: LoadContext, p: Param, info: dict | None, shards: dict[int, tuple], tp: int,
           unread: set[int]) -> bool:
    """Set p's full shape and its shards (True) from `shards` ({tp rank: shard shape} as each tp
    rank's model states give it) and `info` (universal_checkpoint_info); a split that cannot be
    known is named, never guessed (False). `unread`: tp ranks whose model states are lost
    (reported elsewhere). Reusable by any layout with tp slices (a pipeline's stages with TP)."""
    held = sorted(shards)
    if held != list(range(tp)):
        lost = sorted(set(range(tp)) - set(held))
        if held and not set(lost) <= unread:  # a missing tp rank is reported as itself
            ctx.find("tp-param-missing", f"{p.name} is held by tp ranks {held} but not by {lost}",
                     "the tp ranks' model states name different params: they come from "
                     "different runs; " + REPLACE, param=p.name)
            return False
        return bool(held) and _readable_replicas(p, info, shards)
    try:
        geo, problem, maps = _geometry(ctx, p, info, shards)
    except tp_rules.SplitUnknown as e:
        ctx.find("tp-split-unknown", f"{p.name}: how its tp shards join cannot be known: {e}",
                 "zinspect does not guess a split: the param is left out of merges (--salvage "
                 "writes the others)", param=p.name)
        return False
    except tp_rules.ShardShapeError as e:
        ctx.find("tp-shard-shape", f"{p.name}: {e}", "a tp rank's model states hold another "
                 "model's shards; " + REPLACE, param=p.name)
        return False
    if problem:
        ctx.find("tp-coverage", f"{p.name}: its tp shards do not make the full tensor: {problem}",
                 REPLACE, param=p.name)
        return False
    p.shape = geo.shape
    p.shards = {t: Shard(t, shards[t], list(maps[t]), geo.replicated) for t in range(tp)}
    return True


def _readable_replicas(p: Param, info: dict | None, shards: dict[int, tuple]) -> bool:
    """A replicated param whose other tp ranks' model states are lost is still whole on the
    readable ones (what --salvage can write); a split one is not placed."""
    try:
        rule = tp_rules.rule_for(p.name, info) if isinstance(info, dict) else None
    except tp_rules.SplitUnknown:
        return False
    if rule is None or rule.kind not in (tp_rules.REPLICATED, tp_rules.AVERAGE) or \
            rule.vocab_size is not None or len(set(shards.values())) != 1:
        return False
    whole = next(iter(shards.values()))
    box = Box((0,) * len(whole), whole)
    p.shape = whole
    p.shards = {t: Shard(t, whole, [(box, box)], replicated=True) for t in shards}
    return True


def _geometry(ctx: LoadContext, p: Param, info: dict | None,
              shards: dict[int, tuple]) -> tuple[tp_rules.Geometry, str | None, dict]:
    """The affine map's geometry when it has one for p (DeepSpeed's converter prefers it),
    cross-checked with the split patterns'; else the patterns'; with its tiling problem and
    each tp rank's boxes."""
    if not isinstance(info, dict):
        raise tp_rules.SplitUnknown("the model states carry no universal_checkpoint_info")
    try:
        rule, rule_error = _by_rule(tp_rules.rule_for(p.name, info), tuple(sorted(shards.items()))), None
    except (tp_rules.SplitUnknown, tp_rules.ShardShapeError) as e:
        rule, rule_error = None, e
    affine = info.get("affine_map") if isinstance(info.get("affine_map"), dict) else None
    entry = tp_affine.affine_entry(p.name, affine)
    if entry is None:
        if rule_error:
            raise rule_error
        return rule
    try:
        mapped = tp_affine.geometry_from_affine(entry, affine.get("version"))
        recorded = tp_affine.affine_shard_shapes(entry)
    except tp_rules.SplitUnknown as e:
        if rule_error:
            raise rule_error from None
        _mismatch(ctx, p, f"its affine map cannot be read ({e}); the split patterns are used")
        return rule
    if recorded != shards:
        raise tp_rules.ShardShapeError(
            f"the affine map gives its shards {_shapes(recorded)}, the model states {_shapes(shards)}")
    if rule_error:
        _mismatch(ctx, p, f"the split patterns fail ({rule_error}); the affine map is used")
    elif not tp_rules.same_geometry(rule[0], mapped):
        geo = rule[0]
        t = next((t for t in sorted(mapped.pieces) if mapped.pieces[t] != geo.pieces.get(t)), 0)
        _mismatch(ctx, p, f"the affine map and the split patterns place its shards differently "
                  f"(full {list(mapped.shape)} vs {list(geo.shape)}; tp rank {t} at "
                  f"{_places(mapped, t)} vs {_places(geo, t)}); the affine map is used, as "
                  "DeepSpeed's converter does")
    return mapped, tp_rules.tiling_problem(mapped, shards), _maps(mapped)


@lru_cache(maxsize=512)
def _by_rule(rule: tp_rules.Rule, shards: tuple[tuple[int, tuple], ...]) -> tuple:
    """(geometry, tiling problem, each tp rank's boxes) of a split rule for these shard shapes
    ((tp rank, shape), ...): once per rule and shapes, as a 70B model's 80 layers share a handful
    (shapes are tuples of exact ints: equal keys are equal inputs). Shared: never changed."""
    geo = tp_rules.geometry_from_rule(rule, dict(shards))
    return geo, tp_rules.tiling_problem(geo, dict(shards)), _maps(geo)


def _maps(geo: tp_rules.Geometry) -> dict[int, tuple[tuple[Box, Box], ...]]:
    return {t: tuple((Box(a, n), Box(b, n)) for a, b, n in ps) for t, ps in geo.pieces.items()}


def _places(geo: tp_rules.Geometry, t: int) -> str:
    return ", ".join(f"{list(full)}+{list(n)}" for _, full, n in geo.pieces.get(t, [])[:3])


def _mismatch(ctx: LoadContext, p: Param, message: str) -> None:
    ctx.find("tp-split-mismatch", f"{p.name}: {message}", "the run's universal_checkpoint_info "
             "is inconsistent: check the merged tensor against the model", param=p.name)


def _shapes(shards: dict[int, tuple]) -> str:
    return ", ".join(f"tp {t}: {list(s)}" for t, s in sorted(shards.items()))


# -- fragments --------------------------------------------------------------------------------


def _chained(c, attach) -> None:
    """Run a ZeRO-3 attach (which sets each param's lazy fragments) without losing the
    fragments earlier tp ranks attached."""
    before = {n: p.fragments for n, p in c.params.items()}
    attach()
    for n, p in c.params.items():
        old = before.get(n)
        if old is not None and old is not p.fragments and (isinstance(old, Fragments) or old):
            p.fragments = Fragments(make=partial(_joined, old, p.fragments))


def _joined(a, b) -> list:
    return [*a, *b]


def _attach_frozen(ctx: LoadContext, slices: list[Slice], dp: int) -> None:
    """Frozen params: each tp rank's shard, whole in its model states (ZeRO-0/1/2: as
    frozen_param_fragments, else the 16-bit module weight), partitioned at ZeRO-3."""
    c = ctx.ckpt
    if not any(p.frozen and not p.tied_to for p in c.params.values()):
        return
    for s in slices:
        if c.stage == 3:  # each dp rank's model states hold ceil(n/dp) of the shard's n
            source = zero3.FrozenFragments(ctx, s.models, dp, s.tp)
            for p in c.params.values():
                if p.frozen and not p.tied_to and s.tp in p.shards:
                    shard = Fragments(make=partial(source.fragments, p.name,
                                                   numel(p.shards[s.tp].shape)))
                    p.fragments = Fragments(make=partial(_joined, p.fragments, shard))
            continue
        tf = ctx.torch_file(s.model)
        if tf is None:
            continue
        for p in c.params.values():
            if not p.frozen or p.tied_to or s.tp not in p.shards:
                continue
            t = get(s.state, "frozen_param_fragments", p.name)
            source = "frozen"
            if not isinstance(t, TensorRef):
                t, source = get(s.state, "module", p.name), "module"
            if isinstance(t, TensorRef):
                n = min(t.numel, numel(p.shards[s.tp].shape))
                p.fragments.append(located(tf, s.model.name, 0, t).fragment(
                    None, 0, 0, n, source=source, shard=s.tp))


LAYOUT = Layout("tensor_parallel", recognise, describe)
__all__ = ["LAYOUT", "describe", "recognise"]
