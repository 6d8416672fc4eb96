"""How tensor-parallel shards make a full tensor, as N-D boxes.

Two descriptions come with a DeepSpeed TP checkpoint, in every model-states file's
`universal_checkpoint_info`:

* the pattern lists that DeepSpeed's `ds_to_universal.py` (`merge_tp_slices`) applies, in its
  order: `tp_replicated_parameter_patterns` (equal on every tp rank), `parameter_to_average_
  patterns` (replicas DeepSpeed averages: read as replicas, so any drift is reported),
  `parameter_with_2_sub_params_cat_dim_0` (each shard is [half 0; half 1], joined half by half),
  `parameter_with_sub_params` + `sub_param_shard_widths` (fused params such as gate_up: each
  shard holds its width of every sub-param), `parameter_with_row_parallelism_patterns` (cat on
  dim 1), and anything else cat on dim 0; then `vocabulary_parameter_patterns` trims the rows
  past `original_vocab_size` (padding). Megatron-DeepSpeed GPT checkpoints use the same keys.
* AutoTP's `affine_map` (version 1): per param its `logical_shape` and, per tp rank, pieces
  `{shape, source: [offset, strides], dest: [offset, strides], locations}`: `source` places the
  piece in the full tensor, `dest` in the rank's shard.

Both become a `Geometry`: the full shape and, per tp rank, pieces (shard offsets, full offsets,
sizes): the patterns' here, the affine map's in tp_affine.py; where both exist they must agree
(`same_geometry`). A split that cannot be known (patterns that collide, sub-params without
widths, a scaled or strided piece) raises `SplitUnknown`, never a guess; shard shapes that
contradict their rule raise `ShardShapeError`. Pure functions over the unpickled dicts: no
files, no model, no torch.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

Shape = tuple[int, ...]
#: (offsets in the shard, offsets in the full tensor, sizes): one N-D box of a shard
Piece = tuple[Shape, Shape, Shape]

#: bounds on a forged affine-map entry (real ones: a few pieces per tp rank); the checks over
#: pieces are quadratic
MAX_DIMS, MAX_RANKS, MAX_PIECES = 64, 4096, 8192

REPLICATED, AVERAGE, TWO_SUB_PARAMS, SUB_PARAMS, ROW, COLUMN = (
    "replicated", "average", "two_sub_params", "sub_params", "row", "column")


class SplitUnknown(ValueError):
    """The checkpoint does not say (or says inconsistently) how a param is split."""


class ShardShapeError(ValueError):
    """A tp rank's shard has a shape its split rule does not allow."""


@dataclass(frozen=True)
class Rule:
    """What `universal_checkpoint_info`'s patterns say of one param."""

    kind: str  # REPLICATED, AVERAGE, TWO_SUB_PARAMS, SUB_PARAMS, ROW or COLUMN
    dim: int | None = None  # the dim the shards are joined on (None: replicas)
    pattern: str | None = None  # the pattern that decided it (None: the default column rule)
    sub_sizes: Shape = ()  # SUB_PARAMS: each sub-param's full size on `dim`
    widths: tuple[Shape, ...] = ()  # SUB_PARAMS: per sub-param, its width on each tp rank
    sub_count: int = 0  # SUB_PARAMS before universal_checkpoint_info 0.4: equal sub-params
    vocab_size: int | None = None  # rows kept on dim 0 (vocabulary params: padding trimmed)

    @property
    def label(self) -> str:
        """The name users know: "vocab" for a vocabulary-parallel param."""
        if self.vocab_size is not None and self.kind == COLUMN:
            return "vocab"
        return self.kind


@dataclass
class Geometry:
    """A param's full shape and what each tp rank's shard holds of it."""

    shape: Shape
    pieces: dict[int, list[Piece]] = field(default_factory=dict)  # tp rank -> its boxes
    replicated: bool = False  # every tp rank holds the whole tensor


#: a pattern that names one param exactly (AutoTP writes `^model\.layers\.0\.mlp\.up_proj\.weight$`)
_LITERAL = re.compile(r"\^((?:[^\\.*+?()\[\]{}|^$]|\\[^A-Za-z0-9])*)\$")


@functools.lru_cache(maxsize=1024)
def _matcher(patterns: tuple) -> tuple[dict[str, list[str]], list[tuple[str, re.Pattern]]]:
    """A pattern list compiled once: exact names in a dict, the other patterns compiled. AutoTP
    lists every param of a 70B model by name (~700 patterns per list): matched one by one with
    re.match they overflow re's cache and every param recompiles them all (a minute)."""
    literal: dict[str, list[str]] = {}
    other = []
    for p in patterns:
        m = _LITERAL.fullmatch(p)
        if m:
            literal.setdefault(re.sub(r"\\(.)", r"\1", m[1]), []).append(p)
        else:
            try:
                other.append((p, re.compile(p)))
            except re.error as e:
                raise SplitUnknown(f"a split pattern is not a regular expression ({p!r}: {e})") from None
    return literal, other


def hits(patterns, name: str) -> list[str]:
    """The patterns of a list (or a dict's keys) that match `name`."""
    if patterns is not None and not isinstance(patterns, (list, tuple, dict)):
        raise SplitUnknown(f"a split pattern list is a {type(patterns).__name__}, not a list")
    literal, other = _matcher(tuple(p for p in patterns or () if isinstance(p, str)))
    return literal.get(name, []) + [p for p, rx in other if rx.match(name)]


def _match(patterns, name: str, what: str) -> str | None:
    found = hits(patterns, name)
    if len(found) > 1:
        raise SplitUnknown(f"it matches {len(found)} of the {what} patterns ({', '.join(found)})")
    return found[0] if found else None


def rule_for(name: str, info: dict) -> Rule:
    """The split `info` (a `universal_checkpoint_info` dict) gives `name`, in DeepSpeed's order."""
    vocab_pattern = _match(info.get("vocabulary_parameter_patterns"), name, "vocabulary")
    vocab = None
    if vocab_pattern is not None:
        vocab = info.get("original_vocab_size")
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
            raise SplitUnknown(f"it is a vocabulary param ({vocab_pattern}) but original_vocab_size "
                               f"is {vocab!r}")
    for key, kind, dim in (("tp_replicated_parameter_patterns", REPLICATED, None),
                           ("parameter_to_average_patterns", AVERAGE, None),
                           ("parameter_with_2_sub_params_cat_dim_0", TWO_SUB_PARAMS, 0)):
        pattern = _match(info.get(key), name, key)
        if pattern is not None:
            return Rule(kind, dim, pattern, vocab_size=vocab)
    sub = _sub_params_rule(name, info, vocab)
    if sub is not None:
        return sub
    row = _match(info.get("parameter_with_row_parallelism_patterns"), name, "row-parallel")
    if row is not None:
        return Rule(ROW, 1, row, vocab_size=vocab)
    return Rule(COLUMN, 0, None, vocab_size=vocab)


def _sub_params_rule(name: str, info: dict, vocab: int | None) -> Rule | None:
    for spec in info.get("parameter_with_sub_params") or ():
        if not isinstance(spec, dict):
            raise SplitUnknown(f"parameter_with_sub_params holds {type(spec).__name__}, not a dict")
        pattern = _match(spec.get("patterns"), name, "sub-param")
        if pattern is None:
            continue
        dim, shape = spec.get("partition_dim"), spec.get("shape")
        if not isinstance(dim, int) or not isinstance(shape, (list, tuple)) or not 0 <= dim < len(shape):
            raise SplitUnknown(f"its sub-param spec ({pattern}) has shape {shape!r} and "
                               f"partition_dim {dim!r}")
        sizes = shape[dim]
        widths = (info.get("sub_param_shard_widths") or {}).get(pattern)
        if isinstance(sizes, (list, tuple)):
            if len(sizes) > MAX_PIECES:
                raise SplitUnknown(f"its sub-param spec ({pattern}) lists {len(sizes)} sub-params")
            if widths is None:
                raise SplitUnknown(f"its sub-params ({pattern}) have no sub_param_shard_widths")
            try:
                widths = tuple(tuple(int(w) for w in ws) for ws in widths)
            except (TypeError, ValueError):
                raise SplitUnknown(f"sub_param_shard_widths of {pattern} is {widths!r}") from None
            sizes = tuple(int(s) for s in sizes)
            if len(widths) != len(sizes) or any(sum(w) != s for w, s in zip(widths, sizes, strict=False)):
                raise SplitUnknown(f"sub_param_shard_widths {widths} of {pattern} do not add up to "
                                   f"the sub-param sizes {sizes}")
            return Rule(SUB_PARAMS, dim, pattern, sizes, widths, vocab)
        if isinstance(sizes, int) and 0 < sizes <= MAX_PIECES:  # before 0.4: equal sub-params
            return Rule(SUB_PARAMS, dim, pattern, sub_count=sizes, vocab_size=vocab)
        raise SplitUnknown(f"its sub-param spec ({pattern}) gives {sizes!r} sub-params")
    return None


# -- geometry from the patterns --------------------------------------------------------------


def geometry_from_rule(rule: Rule, shards: dict[int, Shape]) -> Geometry:
    """Where each tp rank's shard (shapes `shards`, ranks 0..T-1) goes in the full tensor."""
    tp = len(shards)
    if sorted(shards) != list(range(tp)) or not tp:
        raise ValueError(f"shard shapes of tp ranks {sorted(shards)}: need every rank from 0")
    shapes = [tuple(shards[t]) for t in range(tp)]
    if rule.kind in (REPLICATED, AVERAGE):
        if len(set(shapes)) > 1:
            raise ShardShapeError(f"a {rule.kind} param has different shapes on the tp ranks: "
                                  f"{_listed(shapes)}")
        geo = Geometry(shapes[0], {t: [_whole(shapes[0])] for t in range(tp)}, replicated=True)
    else:
        _same_but(shapes, rule.dim, rule.label)
        if rule.kind == SUB_PARAMS:
            geo = _sub_params(rule, shapes)
        elif rule.kind == TWO_SUB_PARAMS:
            geo = _two_halves(shapes)
        else:
            geo = _concatenated(shapes, rule.dim)
    if rule.vocab_size is not None:
        geo = _trim_rows(geo, rule.vocab_size)
    return geo


def _listed(shapes) -> str:
    return ", ".join(f"tp {t}: {list(s)}" for t, s in enumerate(shapes))


def _whole(shape: Shape) -> Piece:
    zero = (0,) * len(shape)
    return zero, zero, tuple(shape)


def _same_but(shapes: list[Shape], dim: int, label: str) -> None:
    """The shards of a split param have its rank count and sizes everywhere but on `dim`."""
    if any(len(s) <= dim for s in shapes):
        raise ShardShapeError(f"a {label} param split on dim {dim} has shards of shapes {_listed(shapes)}")
    rest = {s[:dim] + s[dim + 1:] for s in shapes}
    if len(rest) > 1 or len({len(s) for s in shapes}) > 1:
        raise ShardShapeError(f"the shards of a {label} param split on dim {dim} differ off that dim: "
                              f"{_listed(shapes)}")


def _at(shape: Shape, dim: int, value: int) -> Shape:
    return shape[:dim] + (value,) + shape[dim + 1:]


def _concatenated(shapes: list[Shape], dim: int) -> Geometry:
    zero = (0,) * len(shapes[0])
    pieces, pos = {}, 0
    for t, s in enumerate(shapes):
        pieces[t] = [(zero, _at(zero, dim, pos), s)] if s[dim] else []
        pos += s[dim]
    return Geometry(_at(shapes[0], dim, pos), pieces)


def _two_halves(shapes: list[Shape]) -> Geometry:
    """torch.chunk(shard, 2, dim=0) on each rank, then [every rank's half 0; every half 1]."""
    halves = [(-(-s[0] // 2), s[0] - -(-s[0] // 2)) for s in shapes]
    zero = (0,) * len(shapes[0])
    first = sum(h[0] for h in halves)
    pieces, pos = {}, [0, first]
    for t, (s, h) in enumerate(zip(shapes, halves, strict=False)):
        pieces[t] = []
        for k, n in enumerate(h):
            if n:
                pieces[t].append((_at(zero, 0, k * h[0]), _at(zero, 0, pos[k]), _at(s, 0, n)))
            pos[k] += n
    return Geometry(_at(shapes[0], 0, pos[1]), pieces)


def _sub_params(rule: Rule, shapes: list[Shape]) -> Geometry:
    dim, tp = rule.dim, len(shapes)
    sizes, widths = rule.sub_sizes, rule.widths
    if rule.sub_count:  # equal sub-params, evenly split (universal_checkpoint_info before 0.4)
        total, count = sum(s[dim] for s in shapes), rule.sub_count
        if total % count or (total // count) % tp:
            raise SplitUnknown(f"{count} equal sub-params of {total} rows over {tp} tp ranks: "
                               "the split is uneven and this checkpoint records no widths")
        sizes = (total // count,) * count
        widths = tuple((total // count // tp,) * tp for _ in range(count))
    if any(len(w) != tp for w in widths):
        raise SplitUnknown(f"sub_param_shard_widths name {[len(w) for w in widths]} tp ranks, "
                           f"the checkpoint has {tp}")
    for t, s in enumerate(shapes):
        if s[dim] != sum(w[t] for w in widths):
            raise ShardShapeError(f"tp rank {t}'s shard {list(s)} is {s[dim]} wide on dim {dim}; its "
                                  f"sub-param widths say {sum(w[t] for w in widths)}")
    zero = (0,) * len(shapes[0])
    pieces = {t: [] for t in range(tp)}
    at_shard = [0] * tp
    base = 0
    for size, ws in zip(sizes, widths, strict=False):
        pos = base
        for t, w in enumerate(ws):
            if w:
                pieces[t].append((_at(zero, dim, at_shard[t]), _at(zero, dim, pos), _at(shapes[t], dim, w)))
            at_shard[t] += w
            pos += w
        base += size
    return Geometry(_at(shapes[0], dim, base), pieces)


def _trim_rows(geo: Geometry, keep: int) -> Geometry:
    """Drop the rows at and past `keep` on dim 0 (vocabulary padding)."""
    if not geo.shape or geo.shape[0] < keep:
        raise ShardShapeError(f"original_vocab_size is {keep} but the shards hold "
                              f"{geo.shape[0] if geo.shape else 0} rows")
    pieces = {}
    for t, ps in geo.pieces.items():
        pieces[t] = []
        for shard_at, full_at, sizes in ps:
            rows = min(sizes[0], keep - full_at[0])
            if rows > 0:
                pieces[t].append((shard_at, full_at, _at(sizes, 0, rows)))
    return Geometry(_at(geo.shape, 0, keep), pieces, geo.replicated)


# -- checks ------------------------------------------------------------------------------------


def _coalesced(pieces: list[Piece]) -> list[Piece]:
    """Boxes adjacent along one dim in both the shard and the full tensor joined, sorted."""
    out = sorted(pieces)
    joined = True
    while joined:
        joined = False
        for i, (sa, fa, na) in enumerate(out):
            for j, (sb, fb, nb) in enumerate(out):
                if i == j:
                    continue
                for d in range(len(na)):
                    rest = [k for k in range(len(na)) if k != d]
                    if all(sa[k] == sb[k] and fa[k] == fb[k] and na[k] == nb[k] for k in rest) and \
                            sa[d] + na[d] == sb[d] and fa[d] + na[d] == fb[d]:
                        out[i] = (sa, fa, _at(na, d, na[d] + nb[d]))
                        del out[j]
                        joined = True
                        break
                if joined:
                    break
            if joined:
                break
    return sorted(out)


def same_geometry(a: Geometry, b: Geometry) -> bool:
    return a.shape == b.shape and a.replicated == b.replicated and sorted(a.pieces) == sorted(b.pieces) \
        and all(_coalesced(a.pieces[t]) == _coalesced(b.pieces[t]) for t in a.pieces)


def _overlap(a: Piece, b: Piece) -> bool:
    return all(fa < fb + nb and fb < fa + na for fa, na, fb, nb in zip(a[1], a[2], b[1], b[2], strict=False))


def _intervals_apart(ps: list[Piece], shape: Shape) -> bool:
    """True when no two pieces overlap, proven in n log n for pieces whole on every dim but one
    (every split the patterns make: intervals on that dim, sorted, each starting at or past
    the ends before it); False when that does not apply or two overlap (the pairs then say
    which: 963 params x 120 pairs at tp 8 made this most of a 70B pipeline's placing)."""
    split = {d for _, at, n in ps for d, (o, k, m) in enumerate(zip(at, n, shape, strict=False))
             if o or k != m}
    if not shape or len(split) > 1 or not all(shape) or any(len(n) != len(shape) for _, _, n in ps):
        return False
    d = split.pop() if split else 0
    end = 0
    for _, at, n in sorted(ps, key=lambda p: (p[1][d], p[2][d])):
        if at[d] < end:
            return False
        end = max(end, at[d] + n[d])
    return True


def tiling_problem(geo: Geometry, shards: dict[int, Shape]) -> str | None:
    """Why the pieces do not place every element of the full tensor exactly once (replicas:
    once per rank), or None. `shards` are the shapes the files hold."""
    numel = math.prod(geo.shape)
    for t, ps in geo.pieces.items():
        shard = shards.get(t)
        for shard_at, full_at, sizes in ps:
            if shard is None or len(sizes) != len(shard) or len(sizes) != len(geo.shape) or \
                    any(o + n > m for o, n, m in zip(shard_at, sizes, shard, strict=False)) or \
                    any(o + n > m for o, n, m in zip(full_at, sizes, geo.shape, strict=False)):
                return (f"tp rank {t}'s piece {list(sizes)} at {list(shard_at)} -> {list(full_at)} does "
                        f"not fit its shard {list(shard) if shard else None} or the full {list(geo.shape)}")
    groups = [ps for _, ps in sorted(geo.pieces.items())] if geo.replicated else \
        [[p for _, ps in sorted(geo.pieces.items()) for p in ps]]
    for ps in groups:
        held = sum(math.prod(p[2]) for p in ps)
        clash = None if _intervals_apart(ps, geo.shape) else \
            next(((a, b) for i, a in enumerate(ps) for b in ps[i + 1:] if _overlap(a, b)), None)
        if clash:
            return f"two pieces overlap at full offsets {list(clash[0][1])} and {list(clash[1][1])}"
        if held != numel:
            return f"the shards place {held} of its {numel} elements"
    return None
