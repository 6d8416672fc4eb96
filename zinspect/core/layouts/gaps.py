"""The files of a grid (dp ranks, stages × tp ranks × dp ranks, MoE experts, ...) against the
files that are there: the one rule, and the one wording, for every layout and for validate.

* `missing_files`: each coordinate without its file. The sizes come from a pickle, and a forged
  size of 10**9 must cost no more than the files that are really there: the first SHOWN are
  named (file, coordinates, what is lost), then one finding counts the rest. A finding's rank is
  the coordinate's dp rank (None on a grid without one); the other coordinates are in its
  message.
* `stale`: a file that does not belong to this checkpoint (outside the grid, `outside`, or of
  another layout), always `stale-rank-file` with one hint and the file's own (dp) rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

#: located findings per kind of missing file; beyond, one finding counts the rest
SHOWN = 16
#: a coordinate's axis as a message says it
WORDS = {"pp": "stage", "tp": "tp rank", "dp": "dp rank", "ep": "ep rank", "expert": "expert"}
MOST_GONE = "check the copy: most of the checkpoint is gone, or a file's recorded sizes are wrong"
STALE_HINT = "move it out of the tag dir: it is a leftover of another run"
SALVAGE = "copy it from the run; `zinspect merge --salvage` writes the other params"

Grid = Sequence[tuple[str, int]]  # ((axis, size), ...): (("pp", 2), ("dp", 4))
Find = Callable[..., object]  # LoadContext.find, or validate's add: (code, message, hint, **where)


def missing_files(find: Find, grid: Grid, present: set[tuple[int, ...]], code: str, what: str,
                  name_of: Callable[..., str], lost: str | Callable[..., str], hint: str) -> None:
    """`code` for each coordinate of `grid` not in `present`: `name_of(*at)` is the file's name,
    `lost` (or `lost(*at)`) what is lost without it; the first SHOWN named, then one finding
    "N more `what` are missing" (`what`: "optimizer files", ...)."""
    axes = [a for a, _ in grid]
    said = [i for i, (_, n) in enumerate(grid) if n > 1] or range(len(grid))  # not "tp rank 0" of 1
    total, first = missing_coords(present, tuple(n for _, n in grid))
    for at in first:
        name = name_of(*at)
        find(code, f"{name} is missing ({where([axes[i] for i in said], [at[i] for i in said])}): "
             f"{lost(*at) if callable(lost) else lost}", hint, file=name,
             rank=at[axes.index("dp")] if "dp" in axes else None)
    if total > len(first):
        find(code, f"{total - len(first)} more {what} are missing "
             f"(of {extent([grid[i] for i in said])})", MOST_GONE)


def stale(find: Find, rf, why: str) -> None:
    """`rf` (a RankFile) does not belong to this checkpoint: `why` (e.g. `outside(...)`)."""
    find("stale-rank-file", f"{rf.name} does not belong to this checkpoint: {why}", STALE_HINT,
         file=rf.name, rank=rf.rank)


def outside(grid: Grid, at: Sequence[int], of: str = "this checkpoint's") -> str:
    """Why a file at coordinates `at` (one per axis of `grid`) is stale: "it is at stage 2, dp
    rank 0, outside this checkpoint's 2 stages × 2 dp ranks" (an axis of size 1 the file is
    inside of is not said; one of a forged size 0 is)."""
    said = [i for i, ((_, n), v) in enumerate(zip(grid, at, strict=True))
            if n > 1 or v > 0 or not 0 <= v < n]  # the axis it is outside of, even of size 0
    return (f"it is at {where([grid[i][0] for i in said], [at[i] for i in said])}, outside {of} "
            f"{extent([grid[i] for i in said])}")


def where(axes: Sequence[str], at: Sequence[int]) -> str:
    """"stage 1, dp rank 0"."""
    return ", ".join(f"{WORDS[a]} {v}" for a, v in zip(axes, at, strict=True))


def extent(grid: Grid) -> str:
    """"2 stages × 4 dp ranks"."""
    return " × ".join(f"{n} {WORDS[a]}{'s' if n != 1 else ''}" for a, n in grid)


def missing_coords(present: set[tuple[int, ...]], sizes: tuple[int, ...],
                   limit: int = SHOWN) -> tuple[int, list[tuple[int, ...]]]:
    """(how many coordinates of the grid `sizes` are not in `present`, the first `limit` of
    them in order). At most len(present) + limit coordinates are visited."""
    inside = {p for p in present if len(p) == len(sizes) and
              all(0 <= v < n for v, n in zip(p, sizes, strict=True))}
    total = math.prod(sizes) - len(inside)
    first: list[tuple[int, ...]] = []
    if total <= 0:
        return 0, first
    for at in _in_order(sizes):
        if at not in inside:
            first.append(at)
            if len(first) >= min(limit, total):
                break
    return total, first


def _in_order(sizes: tuple[int, ...]):
    """The grid's coordinates in order, lazily (itertools.product would first make a tuple of
    every range: 10**9 ints for a forged size)."""
    at = [0] * len(sizes)
    if any(n <= 0 for n in sizes):
        return
    while True:
        yield tuple(at)
        for axis in reversed(range(len(sizes))):
            at[axis] += 1
            if at[axis] < sizes[axis]:
                break
            at[axis] = 0
        else:
            return
