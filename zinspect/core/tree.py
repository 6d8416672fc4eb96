"""A module trie over dotted parameter names, with per-node totals (stdlib only).

    build_tree({"enc.0.w": (12, 48), "enc.0.b": (3, 12)}) ->
        ModuleNode("")                numel 15, nbytes 60, count 2
          ModuleNode("enc")           ...
            ModuleNode("0")
              ModuleNode("w")         is_param

Children are kept in insertion (model) order; `ordered_children` sorts them on demand, with
numeric parts compared as numbers so that `layers.10` follows `layers.9`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

SORT_KEYS = ("model", "name", "size", "numel")


class ModuleNode:
    """One dotted prefix: a module, or a parameter when `is_param`."""

    __slots__ = ("name", "path", "children", "numel", "nbytes", "count", "is_param")

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.children: dict[str, ModuleNode] = {}
        self.numel = 0
        self.nbytes = 0
        self.count = 0  # parameters at or below this node
        self.is_param = False

    def __repr__(self) -> str:
        return f"ModuleNode({self.path!r}, count={self.count}, numel={self.numel})"

    def params(self) -> Iterator[str]:
        """Full names of the parameters at or below this node, in model order."""
        stack = [self]
        while stack:
            node = stack.pop()
            if node.is_param:
                yield node.path
            stack.extend(reversed(node.children.values()))

    def find(self, path: str) -> ModuleNode | None:
        """The node for a dotted path below this (root) node."""
        node = self
        for part in path.split("."):
            node = node.children.get(part)
            if node is None:
                return None
        return node


def build_tree(sizes: Mapping[str, tuple[int, int]]) -> ModuleNode:
    """Trie of the names in `sizes` (name -> (numel, nbytes)), totals summed up each path."""
    root = ModuleNode("", "")
    for name, (numel, nbytes) in sizes.items():
        node = root
        node.numel += numel
        node.nbytes += nbytes
        node.count += 1
        start = 0
        for part in name.split("."):
            start += len(part)
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = ModuleNode(part, name[:start])
            start += 1
            child.numel += numel
            child.nbytes += nbytes
            child.count += 1
            node = child
        node.is_param = True
    return root


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
