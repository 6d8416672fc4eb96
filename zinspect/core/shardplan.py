"""Plan a tensor-parallel param: its tp shards' bytes, in the full tensor's row-major order.

A sharded param (`Param.shards`) is held as one shard tensor per tp rank, whose flat elements
its fragments index (`Fragment.shard`), and whose boxes map onto the full tensor. The output is
streamed in the full tensor's order without ever holding it:

* a split on dim 0 (column-parallel weights and biases, vocab-parallel embeddings with their
  padding rows left out, sub-params such as fused QKV: several maps per shard) makes each box a
  run of whole rows: contiguous in the shard and in the output, so plain pieces;
* a split on a later dim (row-parallel weights, dim 1) makes every output row the side-by-side
  runs of several shards. The rows are planned in blocks of at most WEAVE_BYTES: per block and
  shard, one contiguous source range (that shard's matching rows), and a `Weave` that the
  stream's reader threads use to interleave the block into output rows in a bounded buffer;
* a replicated param is written from the lowest tp rank's copy; the others are its `mirrors`,
  read after it and compared (drift is reported with the largest difference).

`problem` says why a param cannot be planned (a shard not fully held, boxes that do not tile the
tensor, a split zinspect cannot stream); the layout's validation names most of these first.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable

from zinspect.core.coverage import first_problem
from zinspect.core.model import Fragment, Param
from zinspect.core.plan import Piece, Weave
from zinspect.core.torchzip import DTYPE_SIZES

#: read bytes of one weave block (a few rows of every shard), the stream's CHUNK: the plan holds
#: one piece per shard per block (a 70B tp8 model's row-parallel weights: ~350k pieces)
WEAVE_BYTES = 2 << 20
#: (box, band of rows) pairs checked for a param's tiling: bounds the work a forged map costs
MAX_BAND_ENTRIES = 1 << 20


def shard_fragments(p: Param, fragments: Iterable[Fragment] | None = None
                    ) -> dict[int, list[Fragment]]:
    """tp rank -> its shard's fragments (of `fragments`, default the param's), by start."""
    out: dict[int, list[Fragment]] = {t: [] for t in p.shards}
    for f in p.fragments if fragments is None else fragments:
        if f.numel:
            out.setdefault(f.shard, []).append(f)
    for frags in out.values():
        frags.sort(key=lambda f: f.start)
    return out


def problem(p: Param, fragments: Iterable[Fragment] | None = None) -> str | None:
    """Why the sharded param `p` (or its `fragments` of another optimizer state) cannot be
    streamed (None: it can)."""
    held = shard_fragments(p, fragments)
    if set(held) - set(p.shards):
        return "some of its fragments belong to no tp shard"
    if len({f.dtype for frags in held.values() for f in frags}) > 1:
        return "its tp shards are saved in different dtypes"
    for t, shard in sorted(p.shards.items()):
        why = first_problem(math.prod(shard.shape), held[t])
        if why:
            return f"tp rank {t}'s shard: {why}"
    kinds = {s.replicated for s in p.shards.values()}
    if kinds == {True}:
        bad = [t for t, s in p.shards.items() if tuple(s.shape) != tuple(p.shape)]
        return f"tp ranks {bad} hold a replica of another shape" if bad else None
    if len(kinds) > 1:
        return "some tp ranks hold replicas and others shards"
    return _tiling_problem(p)


def _maps(p: Param) -> list[tuple[int, tuple[int, ...], tuple, tuple]]:
    """(tp, shard shape, shard box, full box) of every map, boxes as ((offsets), (sizes))."""
    return [(t, tuple(s.shape), (tuple(a.offsets), tuple(a.sizes)), (tuple(b.offsets), tuple(b.sizes)))
            for t, s in sorted(p.shards.items()) for a, b in s.maps]


def _tiling_problem(p: Param) -> str | None:
    """Why the boxes do not place every element of the full tensor exactly once (or cannot be
    streamed). In O(boxes x bands): each band of rows must be covered by its boxes' column
    runs side by side, from the first column to the last."""
    shape, maps = tuple(p.shape), _maps(p)
    for t, sshape, (so, ss), (fo, fs) in maps:
        if not len(so) == len(ss) == len(fo) == len(fs) == len(shape) == len(sshape) or ss != fs:
            return f"tp rank {t}: a shard box and its full box differ in rank or sizes"
        if any(o < 0 or o + n > m for o, n, m in zip(so, ss, sshape, strict=True)) or \
                any(o < 0 or o + n > m for o, n, m in zip(fo, fs, shape, strict=True)):
            return f"tp rank {t}: a box reaches outside its tensor"
    if sum(math.prod(fs) for *_, (_, fs) in maps) != math.prod(shape):
        return "its boxes do not add up to the full tensor"
    dim, why = _split(p)
    if why:
        return why
    if dim == 0:  # one "row": the flat tensor, each box a run of it
        inner = math.prod(shape[1:])
        runs = [(0, 1, fo[0] * inner, (fo[0] + fs[0]) * inner) for *_, (fo, fs) in maps]
        rows, width = 1, math.prod(shape)
    else:
        per_row, inner = math.prod(shape[1:dim]), math.prod(shape[dim + 1:])
        runs = [(fo[0] * per_row, (fo[0] + fs[0]) * per_row, fo[dim] * inner,
                 (fo[dim] + fs[dim]) * inner) for *_, (fo, fs) in maps]
        rows, width = math.prod(shape[:dim]), math.prod(shape[dim:])
    runs = [r for r in runs if r[0] < r[1] and r[2] < r[3]]
    cuts = sorted({0, rows} | {r[0] for r in runs} | {r[1] for r in runs})
    at = {c: i for i, c in enumerate(cuts)}
    bands: list[list[tuple[int, int]]] = [[] for _ in cuts[1:]]
    budget = MAX_BAND_ENTRIES
    for r0, r1, c0, c1 in runs:
        budget -= at[r1] - at[r0]
        if budget < 0:
            return f"its {len(runs):,} boxes are too many to plan"
        for i in range(at[r0], at[r1]):
            bands[i].append((c0, c1))
    for row, band in zip(cuts[:-1], bands, strict=True):
        pos = 0
        for c0, c1 in sorted(band):
            if c0 != pos:
                what = "overlap" if c0 < pos else "leave a gap"
                return f"its boxes {what} at row {row:,}, column {min(c0, pos):,} (rows as split)"
            pos = c1
        if pos != width:
            return f"its boxes leave a gap at row {row:,}, column {pos:,} (rows as split)"
    return None


def _split(p: Param) -> tuple[int, str | None]:
    """The dim the output rows are interleaved on (0: every box is whole rows), or why the
    split cannot be streamed: every box must be whole on every dim but dim 0 and that one,
    in the shard as in the full tensor."""
    shape, maps = tuple(p.shape), _maps(p)
    partial = [d for d in range(len(shape)) if any(fs[d] != shape[d] for *_, (_, fs) in maps)]
    dim = max(partial, default=0)
    for t, sshape, (_, ss), (_, fs) in maps:
        for d in range(1, len(shape)):
            if d != dim and (fs[d] != shape[d] or ss[d] != sshape[d]):
                return dim, (f"tp rank {t}'s boxes split it on dims {partial + [d]}: zinspect "
                             "streams splits on one dim (after dim 0) only")
    return dim, None


def plan_pieces(p: Param, path_of: Callable[[str], str], fragments: Iterable[Fragment] | None = None
                ) -> tuple[list[Piece], tuple[tuple[int, Weave], ...], dict[int, list[Piece]]]:
    """(pieces in output order, weaves, {tp rank: mirror pieces}) of a param `problem` passed
    (its `fragments` of another optimizer state, when given)."""
    held = shard_fragments(p, fragments)
    isz = DTYPE_SIZES[next(f.dtype for frags in held.values() for f in frags)] if \
        any(held.values()) else 4
    reader = _Reader(held, path_of, isz)
    if all(s.replicated for s in p.shards.values()):
        first, *rest = sorted(p.shards)
        n = math.prod(p.shape)
        return reader.range(first, 0, n), (), {t: reader.range(t, 0, n) for t in rest}
    dim = _split(p)[0]
    shape = tuple(p.shape)
    if dim == 0:  # whole rows: each box one run, in the shard and in the output
        inner = math.prod(shape[1:])
        runs = sorted((fo[0] * inner, t, so[0] * math.prod(sshape[1:]), fs[0] * inner)
                      for t, sshape, (so, _), (fo, fs) in _maps(p))
        return [pc for _, t, start, n in runs for pc in reader.range(t, start, n)], (), {}
    return _woven(p, dim, reader)


def _woven(p: Param, dim: int, reader: _Reader):
    """Rows over dims [0, dim), each `width` elements: per band of rows covered by the same
    boxes, blocks of rows read one range per box and woven, or plain pieces when one box
    covers whole contiguous rows (or one row is too wide for a block)."""
    shape, isz = tuple(p.shape), reader.isz
    per_row = math.prod(shape[1:dim])  # rows of dims 1..dim-1 inside one dim-0 index
    inner = math.prod(shape[dim + 1:])
    width = math.prod(shape[dim:])
    boxes = []  # (first row, rows, column, take, tp, first shard row, shard row width, skip)
    for t, sshape, (so, _), (fo, fs) in _maps(p):
        if math.prod(fs):
            boxes.append((fo[0] * per_row, fs[0] * per_row, fo[dim] * inner, fs[dim] * inner,
                          t, so[0] * per_row, math.prod(sshape[dim:]), so[dim] * inner))
    cuts = sorted({b[0] for b in boxes} | {b[0] + b[1] for b in boxes})
    pieces: list[Piece] = []
    weaves: list[tuple[int, Weave]] = []
    for lo, hi in itertools.pairwise(cuts):
        band = sorted((b for b in boxes if b[0] <= lo < b[0] + b[1]), key=lambda b: b[2])
        if not band:
            continue
        b = band[0]
        if len(band) == 1 and b[3] == width == b[6]:
            pieces += reader.range(b[4], _at(b, lo), (hi - lo) * width)
            continue
        row_read = sum(b[6] for b in band) * isz
        block = WEAVE_BYTES // row_read
        if not block:  # rows wider than a block: each run is a plain piece
            for row in range(lo, hi):
                for b in band:
                    pieces += reader.range(b[4], _at(b, row), b[3])
            continue
        for row in range(lo, hi, block):
            rows = min(block, hi - row)
            first = len(pieces)
            for b in band:
                pieces += reader.range(b[4], _at(b, row), (rows - 1) * b[6] + b[3])
            weaves.append((first, Weave(len(pieces) - first, rows,
                                        tuple((b[6] * isz, b[3] * isz) for b in band))))
    return pieces, tuple(weaves), {}


def _at(box: tuple, row: int) -> int:
    """The shard element where `box`'s run of output row `row` starts."""
    first, _, _, _, _, shard_row, shard_width, skip = box
    return (shard_row + row - first) * shard_width + skip


class _Reader:
    """Pieces of a shard's flat element range, across the fragments holding it."""

    def __init__(self, held: dict[int, list[Fragment]], path_of: Callable[[str], str],
                 isz: int) -> None:
        self.held, self.path_of, self.isz = held, path_of, isz
        self.starts = {t: [f.start for f in frags] for t, frags in held.items()}

    def range(self, tp: int, start: int, count: int) -> list[Piece]:
        frags, isz = self.held[tp], self.isz
        i = bisect.bisect_right(self.starts[tp], start) - 1
        out: list[Piece] = []
        pos, end = start, start + count
        while pos < end:
            f = frags[i]
            n = min(end, f.start + f.numel) - pos
            path, offset = self.path_of(f.file), f.offset + (pos - f.start) * isz
            if out and out[-1].path == path and out[-1].offset + out[-1].nbytes == offset:
                out[-1] = Piece(path, out[-1].offset, out[-1].nbytes + n * isz)
            else:
                out.append(Piece(path, offset, n * isz))
            pos += n
            i += 1
        return out
