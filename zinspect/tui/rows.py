"""The flat parameter table's rows: the names in a sort order, kept by a filter, each with its
place among the view's names, where the table reads its cells from the columns (not from a
Param looked up by name: the look-up's index of 297k names is made after the findings, and the
first filter key's rows waited for it)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import compress, repeat
from operator import contains as holds
from operator import itemgetter
from typing import NamedTuple

from zinspect.core.tree import _natural

#: names searched between two looks at whether the filter is still wanted
FILTER_CHUNK = 32768


class Rows(NamedTuple):
    """Names, and where each stands in the view's names (`Inspection.names`)."""

    names: list[str]
    at: list[int]


def narrows(before: str, after: str) -> bool:
    """Whether every name the filter `after` keeps is kept by `before` too: each word of
    `before` lies inside a word of `after` (typing on at the end, or adding a word)."""
    words = after.lower().split()
    return all(any(w in v for v in words) for w in before.lower().split())


class _PartKeys(dict):
    """A dotted name's part -> its natural sort key, made when first asked for."""

    def __missing__(self, part: str) -> tuple[int, int | str]:
        key = self[part] = _natural(part)
        return key


class Orders:
    """The rows of `names` (with their (numel, output bytes) `sizes`) in each sort order, made
    when first asked for, and the filter over them."""

    def __init__(self, names: list[str], sizes: list[tuple[int, int]]) -> None:
        self._names, self._sizes = names, sizes
        #: (the places as int objects made once here, 7 ms at 297k names: a filter's pass
        #: over a range made them anew, at the first key)
        self._sorted: dict[str, Rows] = {"model": Rows(names, list(range(len(names))))}

    def has(self, sort: str) -> bool:
        """Whether the names are sorted by `sort` already (else that takes a pass over them)."""
        return sort in self._sorted

    def rows(self, sort: str = "model", contains: str = "", among: Rows | None = None,
             should_stop: Callable[[], bool] = lambda: False) -> Rows | None:
        """The rows in `sort` order ("model", "name", "size", "numel") whose names contain
        every space-separated word of `contains` (case-insensitive).

        `among`: an earlier answer in the same order that holds every match (the filter before
        a key narrowed it), searched instead of all names. None when `should_stop()` said so
        (polled between chunks: a worker whose filter text is stale stops early)."""
        rows = self._sorted.get(sort)
        if rows is None:
            rows = self._sorted[sort] = self._sort(sort)
        words = contains.lower().split()
        if not words:
            return rows
        source = rows if among is None else among
        names: list[str] = []
        at: list[int] = []
        for start in range(0, len(source.names), FILTER_CHUNK):
            if should_stop():
                return None
            chunk = source.names[start:start + FILTER_CHUNK]
            places = source.at[start:start + FILTER_CHUNK]
            for word in words:  # each word narrows the chunk, in C: no Python line per name
                keep = list(map(holds, map(str.lower, chunk), repeat(word)))
                if not all(keep):  # (the first key's letter is often in every name)
                    chunk, places = list(compress(chunk, keep)), list(compress(places, keep))
            names += chunk
            at += places
        return Rows(names, at)

    def _sort(self, key: str) -> Rows:
        names = self._names
        if key == "name":
            # natural, like the tree: blocks.2 before blocks.10; each distinct part's key made
            # once (a few thousand parts at 300k names: 0.3 s instead of 1.4 s)
            part_key = _PartKeys().__getitem__
            keys = [tuple(map(part_key, n.split("."))) for n in names]
            order = sorted(range(len(names)), key=keys.__getitem__)
        else:  # largest first; a stable sort (reverse keeps equal keys in model order), in C
            keys = list(map(itemgetter(0 if key == "numel" else 1), self._sizes))
            order = sorted(range(len(names)), key=keys.__getitem__, reverse=True)
        return Rows(list(map(names.__getitem__, order)), order)
