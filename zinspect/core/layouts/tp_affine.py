"""AutoTP's `affine_map` (version 1) as a `tp_rules.Geometry`: per param its `logical_shape` and,
per tp rank, pieces `{shape, source: [offset, strides], dest: [offset, strides], locations}`
(`source` places the piece in the full tensor, `dest` in the rank's shard). A piece that is not
a box of both (other strides), scaled, or beyond what a real map holds is `SplitUnknown`."""

from __future__ import annotations

from zinspect.core.layouts.tp_rules import (
    MAX_DIMS,
    MAX_PIECES,
    MAX_RANKS,
    Geometry,
    Piece,
    Shape,
    SplitUnknown,
    hits,
)


def affine_entry(name: str, affine: dict | None) -> dict | None:
    """The affine map's entry for `name` (its keys are patterns), or None."""
    params = (affine or {}).get("params") or {}
    found = hits(params, name)
    if len(found) > 1:
        raise SplitUnknown(f"it matches {len(found)} affine-map patterns ({', '.join(found)})")
    return params[found[0]] if found else None


def row_major(shape: Shape) -> Shape:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _box_at(offset, strides, sizes: Shape, within: Shape, where: str) -> Shape:
    """The N-D offsets of a strided view of `within` (row-major) that is a box, else SplitUnknown."""
    want = row_major(within)
    if len(strides) != len(within) or \
            any(s != w for s, w, n in zip(strides, want, sizes, strict=False) if n > 1):
        raise SplitUnknown(f"its {where} strides {list(strides)} are not the row-major strides "
                           f"{list(want)} of {list(within)}: not a box zinspect can copy")
    offs, left = [], int(offset)
    for w in want:
        offs.append(left // w)
        left %= w
    if any(o + n > m for o, n, m in zip(offs, sizes, within, strict=False)):
        raise SplitUnknown(f"its {where} piece of {list(sizes)} at offset {offset} runs past {list(within)}")
    return tuple(offs)


def geometry_from_affine(entry: dict, version) -> Geometry:
    """The geometry an affine-map entry describes (its shard shapes included, per rank)."""
    if version not in (None, 1):
        raise SplitUnknown(f"its affine map is version {version!r}; zinspect reads version 1")
    try:
        shape = tuple(int(n) for n in entry["logical_shape"])
        ranks = {int(t): r for t, r in entry["ranks"].items()}
        if len(shape) > MAX_DIMS or len(ranks) > MAX_RANKS or \
                sum(len(r["pieces"]) for r in ranks.values()) > MAX_PIECES:
            raise SplitUnknown(f"its affine-map entry has {len(shape)} dims, {len(ranks)} ranks and "
                               f"{sum(len(r['pieces']) for r in ranks.values())} pieces: beyond "
                               f"what a real one holds ({MAX_DIMS}, {MAX_RANKS}, {MAX_PIECES})")
        pieces: dict[int, list[Piece]] = {}
        holders: set[int] = set()
        for t, r in sorted(ranks.items()):
            shard = tuple(int(n) for n in r["shard_shape"])
            pieces[t] = []
            for p in r["pieces"]:
                if float(p.get("scale", 1.0)) != 1.0:
                    raise SplitUnknown(f"tp rank {t} holds it scaled by {p['scale']} (shard = full * scale)")
                sizes = tuple(int(n) for n in p["shape"])
                full_at = _box_at(p["source"][0], p["source"][1], sizes, shape, "source")
                shard_at = _box_at(p["dest"][0], p["dest"][1], sizes, shard, "dest")
                pieces[t].append((shard_at, full_at, sizes))
                holders.add(len(p.get("locations") or (t,)))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        if isinstance(e, SplitUnknown):
            raise
        raise SplitUnknown(f"its affine-map entry is malformed ({type(e).__name__}: {e})") from None
    replicated = holders == {len(ranks)} and len(ranks) > 1
    if not replicated and holders - {1}:
        raise SplitUnknown("its affine map replicates some pieces and splits others")
    return Geometry(shape, pieces, replicated)


def affine_shard_shapes(entry: dict) -> dict[int, Shape]:
    return {int(t): tuple(int(n) for n in r["shard_shape"]) for t, r in entry["ranks"].items()}
