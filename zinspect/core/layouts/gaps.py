"""The coordinates of a grid (stages × dp ranks, MoE layers × experts, ...) that have no file,
counted and listed without walking the whole grid: the sizes come from a pickle, and a forged
size of 10**9 must cost no more than the files that are really there."""

from __future__ import annotations

import math

#: located findings per kind of missing file; beyond, one finding counts the rest
SHOWN = 16


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
