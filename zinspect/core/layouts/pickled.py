"""Reading values out of a parsed pickle defensively: nothing from a checkpoint is trusted to
have the type, size or shape DeepSpeed would give it."""

from __future__ import annotations

import math
from itertools import chain, compress

from zinspect.core.model import TensorAt
from zinspect.core.torchzip import MAX_NUMEL, TensorRef, TorchFile
from zinspect.core.unpickle import DeferredPairs, PickledOrderedDict


def get(obj, *keys, default=None):
    """obj[k1][k2]..., or `default` as soon as a level is not a dict holding the key."""
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return default
        obj = obj[k]
    return obj


def size(value) -> int | None:
    """`value` when it is a size (a positive int; a bool is no size), else None."""
    return value if type(value) is int and value > 0 else None


def said(value) -> str:
    """A pickled field's value as a finding quotes it: an int or bool as it is, else its type."""
    return repr(value) if type(value) in (int, bool) else f"a {type(value).__name__}"


def numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape or ())  # shapes come through `shape`: tuples of ints


def shape(value) -> tuple[int, ...] | None:
    """A shape from the pickle, or None unless it has at most 64 non-negative int dims and
    at most MAX_NUMEL elements (a dim of 10**18 balanced by a negative one sums to little)."""
    if type(value) is tuple and len(value) <= 2:  # most params: the same rule, 3x faster
        if len(value) == 1 and type(value[0]) is int and 0 <= value[0] <= MAX_NUMEL:
            return value
        if len(value) == 2 and type(value[0]) is int and type(value[1]) is int and \
                0 <= value[0] <= MAX_NUMEL and 0 <= value[1] <= MAX_NUMEL and \
                value[0] * value[1] <= MAX_NUMEL:
            return value
    if isinstance(value, (tuple, list)) and len(value) <= 64 and \
            all(type(s) is int and 0 <= s <= MAX_NUMEL for s in value) and \
            math.prod(value) <= MAX_NUMEL:
        return tuple(value)
    return None


def keys_of(d: dict) -> list:
    """`list(d)`, at dict speed for the parse's OrderedDicts (10x faster at 300k names): one is
    only ever filled by insertion (the unpickler can neither delete nor move a key), so its
    dict order is its order; a DeferredPairs' pairs are not inserted for it."""
    if type(d) is DeferredPairs:
        return DeferredPairs.keys_list(d)
    return list(dict.keys(d)) if type(d) is PickledOrderedDict else list(d)


def values_of(d: dict) -> list:
    """`list(d.values())`, as `keys_of`."""
    if type(d) is DeferredPairs:
        return DeferredPairs.values_list(d)
    return list(dict.values(d)) if type(d) is PickledOrderedDict else list(d.values())


def values_at(d: dict, names: list[str]) -> list:
    """`[d.get(n) for n in names]`; of a DeferredPairs, in one pass over its lists without
    inserting its pairs (a few buffers' tensors among 300k names)."""
    if not names or type(d) is not DeferredPairs:
        return list(map(d.get, names))
    wanted = set(names)
    keys = DeferredPairs.keys_list(d)  # (distinct, or the pairs are inserted now: a dict's)
    hits = list(map(wanted.__contains__, keys))
    found = dict(zip(compress(keys, hits), compress(DeferredPairs.values_list(d), hits),
                     strict=True))
    return list(map(found.get, names))


def group_members(group: dict) -> list[tuple[str, tuple[int, ...] | None]]:
    """(name, shape) of each param of a param_shapes group (shape None: not a valid shape)."""
    return list(zip(*group_columns(group), strict=True))


def group_columns(group: dict) -> tuple[list[str], list[tuple[int, ...] | None]]:
    """The names and the shapes (None: not a valid shape) of a param_shapes group's params.
    The usual group, str names and tuples of valid ints (300k at 300k names), is checked in
    bulk, at C speed, against the rules of `shape`; any other goes one by one."""
    names, values = keys_of(group), values_of(group)
    if values and set(map(type, names)) == {str} and set(map(type, values)) == {tuple} and \
            set(map(type, chain.from_iterable(values))) <= {int}:
        distinct = set(values)  # tuples of exact ints: equal ones are the same shape
        dims = list(chain.from_iterable(distinct))
        if (not dims or min(dims) >= 0 and max(dims) <= MAX_NUMEL) and \
                max(map(len, distinct)) <= 64 and max(map(math.prod, distinct)) <= MAX_NUMEL:
            return names, values
    return list(map(str, names)), list(map(shape, values))


def short(value) -> str:
    """A bounded, printable glimpse of a value from a pickle (its ints only: never a repr)."""
    if isinstance(value, (tuple, list)):
        dims = ", ".join(str(x) if type(x) is int and abs(x) < 10**30 else "?"
                         for x in value[:8])
        return f"({dims}{', ...' if len(value) > 8 else ''})"
    return ""


def text(value) -> str | None:
    return value if isinstance(value, str) else None


def as_group_list(shapes) -> list[dict]:
    """`param_shapes`: a list of per-group OrderedDicts (a single dict before DeepSpeed 0.5.4)."""
    if isinstance(shapes, dict):
        return [shapes]
    if isinstance(shapes, list):
        return [g for g in shapes if isinstance(g, dict)]
    return []


def param_group_map(osd: dict | None, stage3: bool) -> dict[int, int]:
    """flat group (ZeRO-3 sub-group) index -> optimizer param group index, from the torch
    optimizer's saved param_groups (each lists the flat tensors it owns)."""
    base = get(osd, "optimizer_state_dict" if stage3 else "base_optimizer_state")
    groups = get(base, "param_groups")
    out: dict[int, int] = {}
    if isinstance(groups, list):
        for gi, g in enumerate(groups):
            for idx in get(g, "params", default=[]) or []:
                if isinstance(idx, int):
                    out[idx] = gi
    return out


def located(tf: TorchFile, file: str, rank: int, t: TensorRef) -> TensorAt:
    """A rank's tensor, resolved once: where its element 0 is and how many of its elements are
    really in the file."""
    base = tf.tensor_offset(t)
    rec = tf.records.get(t.storage.key)
    whole = 0 if base is None or rec is None or not t.is_contiguous() else \
        max(0, min(rec.present, rec.size) // t.itemsize - t.offset)
    return TensorAt(rank, file, base, t.itemsize, t.dtype, t.numel, min(whole, t.numel))
