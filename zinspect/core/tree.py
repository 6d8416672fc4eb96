"""A module trie over dotted parameter names, with per-node totals (stdlib only).

    build_tree(["enc.0.w", "enc.0.b"], [(12, 48), (3, 12)]) ->
        ModuleNode("")                numel 15, nbytes 60, count 2
          ModuleNode("enc")           ...
            ModuleNode("0")
              ModuleNode("w")         is_param

Children are kept in insertion (model) order; `ordered_children` sorts them on demand, with
numeric parts compared as numbers so that `layers.10` follows `layers.9`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from itertools import compress, groupby
from operator import itemgetter

SORT_KEYS = ("model", "name", "size", "numel")
_NUMEL, _NBYTES = itemgetter(0), itemgetter(1)
#: one split at a time: the UI thread waits for a worker's split of the same node, not redo it
_SPLITTING = threading.Lock()


class ModuleNode:
    """One dotted prefix: a module, or a parameter when `is_param`.

    Children are split off on first access (`children`): a node keeps the names at or below it
    and their sizes, so opening a module costs what lies below it, and a tree of 300k names
    costs one pass over them until the user opens something (building every node up front took
    0.6 s there). Its totals are summed when first asked for (a label drawn, a sort by size):
    the root's never are, and summing the top modules' up front by looking each name up took
    0.28 s of the 0.32 s before the tree was listed at 297k names."""

    __slots__ = ("name", "path", "_names", "_sizes", "_children", "_numel", "_nbytes", "count",
                 "is_param")

    def __init__(self, name: str, path: str, names: list[str], sizes: list[tuple[int, int]],
                 is_param: bool = False) -> None:
        self.name = name
        self.path = path
        self._names = names  # every name at or below this node, in model order
        self._sizes = sizes  # their (numel, nbytes), in the same order
        self._children: dict[str, ModuleNode] | None = None
        self._numel: int | None = None
        self._nbytes: int | None = None
        self.count = len(names)  # parameters at or below this node
        self.is_param = is_param

    @property
    def numel(self) -> int:
        if self._numel is None:
            self._numel = sum(map(_NUMEL, self._sizes))
        return self._numel

    @property
    def nbytes(self) -> int:
        if self._nbytes is None:
            self._nbytes = sum(map(_NBYTES, self._sizes))
        return self._nbytes

    def __repr__(self) -> str:
        return f"ModuleNode({self.path!r}, count={self.count}, numel={self.numel})"

    @property
    def has_children(self) -> bool:
        """Whether anything lies below (without splitting the children off)."""
        return self.count > self.is_param

    @property
    def children(self) -> dict[str, ModuleNode]:
        """The next dotted part of the names below, in order of first appearance."""
        if self._children is None:
            with _SPLITTING:  # a worker may be splitting this node ahead of the user
                if self._children is None:
                    self._children = self._split()
        return self._children

    def _split(self) -> dict[str, ModuleNode]:
        names, sizes = self._names, self._sizes
        start = len(self.path) + 1 if self.path else 0
        if self.is_param:  # not its own child
            keep = [len(n) >= start for n in names]
            names, sizes = list(compress(names, keep)), list(compress(sizes, keep))
        # Part by part in C (partition, groupby, slices): names of one module mostly come
        # one after another, so this loops in Python once per child, not once per name.
        parts = [n[start:].partition(".")[0] for n in names]
        groups: dict[str, tuple[list[str], list[tuple[int, int]]]] = {}
        at = 0
        for part, run in groupby(parts):
            end = at + len(list(run))
            if part in groups:
                groups[part][0].extend(names[at:end])
                groups[part][1].extend(sizes[at:end])
            else:
                groups[part] = (names[at:end], sizes[at:end])
            at = end
        prefix = self.path + "." if self.path else ""
        # a child is a param when its own name is among the names below it (each name once:
        # the checks together cost one look at each name)
        return {part: ModuleNode(part, prefix + part, below, of, (prefix + part) in below)
                for part, (below, of) in groups.items()}

    def params(self) -> Iterator[str]:
        """Full names of the parameters at or below this node, in model order."""
        return iter(self._names)

    def find(self, path: str) -> ModuleNode | None:
        """The node for a dotted path below this (root) node."""
        node = self
        for part in path.split("."):
            node = node.children.get(part)
            if node is None:
                return None
        return node


def build_tree(names: list[str], sizes: list[tuple[int, int]]) -> ModuleNode:
    """Trie of `names` with their (numel, nbytes) `sizes` (in the same order); nodes below
    the root are made when first asked for, totals summed up each path when asked for."""
    return ModuleNode("", "", names, sizes)


def _natural(part: str) -> tuple[int, int | str]:
    return (0, int(part)) if part.isdigit() else (1, part)


def ordered_children(node: ModuleNode, key: str = "model") -> list[ModuleNode]:
    """Children of `node` sorted by one of SORT_KEYS (sizes descending, names natural)."""
    children = list(node.children.values())
    if key == "name":
        children.sort(key=lambda c: _natural(c.name))
    elif key == "size":
        children.sort(key=lambda c: -c.nbytes)
    elif key == "numel":
        children.sort(key=lambda c: -c.numel)
    return children


def count_below(names: Iterable[str]) -> dict[str, int]:
    """For each dotted prefix of each name (and "" for the root), how many names lie below it.

    Used for subtree marks: how many excluded params (or params with findings) a module holds."""
    out: dict[str, int] = {}
    for name in names:
        out[""] = out.get("", 0) + 1
        end = name.find(".")
        while end != -1:
            prefix = name[:end]
            out[prefix] = out.get(prefix, 0) + 1
            end = name.find(".", end + 1)
        out[name] = out.get(name, 0) + 1
    return out
