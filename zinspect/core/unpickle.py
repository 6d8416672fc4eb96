"""A pickle reader whose time and memory are bounded by the size of the pickle.

The pure-Python `pickle._Unpickler` keeps its memo in a dict (the C one sizes an array by the
largest PUT index: a forged `LONG_BINPUT 2**32-1` allocates gigabytes) and builds objects with
an explicit stack, so reading is linear in the pickle's bytes. What stays unbounded is what the
objects can make others do: a dict key that is a tuple nested 100,000 deep crashes the
interpreter when it is hashed (SIGSEGV) or raises RecursionError; a "memo bomb" (each level a
tuple of two references to the level below) is 2**60 nodes when walked or formatted, from a few
KB; a 24 MiB string hangs a terminal. `BoundedUnpickler` therefore checks, as it reads:

* every string and bytes object against `MAX_STRING`;
* every object about to be hashed (dict keys, set members) against `MAX_KEY_NODES` nodes, so
  hashing cannot recurse deeply or blow up;

and, once loaded, the result as a tree (shared references counted each time they are
reached, as any later walk would reach them) against `MAX_DEPTH` and a node budget
proportional to the pickle's size. Past any budget it raises `PickleBudgetExceeded`, an
`UnpicklingError` saying which budget. The memo needs no budget of its own: each entry costs
a PUT opcode of at least two bytes.
"""

from __future__ import annotations

import itertools
import pickle
from collections import OrderedDict

#: longest str or bytes object accepted (real checkpoints: names and configs of a few KB)
MAX_STRING = 1 << 20
#: most nodes of an object that gets hashed (a dict key or set member)
MAX_KEY_NODES = 1000
#: deepest container nesting accepted in the result (real checkpoints: under 10)
MAX_DEPTH = 100
#: result nodes allowed per byte of pickle, plus a floor (a node costs >= 1 opcode byte unless
#: it is a shared reference; real checkpoints stay far below 1 per byte)
NODES_PER_BYTE, NODES_FLOOR = 4, 1 << 16
_ATOMS = frozenset({str, int, float, bytes, bool, type(None), complex})
_SIZED = (tuple, list, set, frozenset, dict)


class PickleBudgetExceeded(pickle.UnpicklingError):
    """A pickle asks for more than its size can honestly need (see the module docstring)."""


def children(obj):
    """The objects a walk over `obj` reaches next (None for a leaf). Inert records of the
    restricted unpickler expose their `args` and `state`."""
    if isinstance(obj, (tuple, list, set, frozenset)):
        return obj
    if isinstance(obj, dict):
        return itertools.chain(obj.keys(), obj.values()) if obj else None
    args = getattr(obj, "args", None) if hasattr(obj, "state") else None
    if isinstance(args, tuple):
        return (*args, obj.state)
    return None


def check_tree(obj, max_nodes: int, max_depth: int = MAX_DEPTH, what: str = "the pickle",
               leaves: frozenset = _ATOMS) -> None:
    """Raise PickleBudgetExceeded when walking `obj` would visit more than `max_nodes` nodes or
    go deeper than `max_depth`. Iterative; leaves (objects of the types `leaves`) are counted
    without being stacked, and the walk stops at the first budget passed."""
    stack, nodes = [(obj, 0)], 1
    while stack:
        item, depth = stack.pop()
        kids = children(item)
        if not kids:
            continue
        if depth >= max_depth:
            raise PickleBudgetExceeded(f"{what} nests deeper than {max_depth} levels")
        inner = [kid for kid in kids if type(kid) not in leaves]
        nodes += len(item) * (2 if isinstance(item, dict) else 1) if isinstance(item, _SIZED) \
            else len(inner) + 2
        stack.extend([(kid, depth + 1) for kid in inner])
        if nodes > max_nodes:
            raise PickleBudgetExceeded(f"{what} holds more than {max_nodes:,} objects" +
                                       (" (shared references repeated: a memo bomb)"
                                        if what == "the pickle" else ""))


def _hashable(key) -> None:
    if type(key) not in _ATOMS:
        check_tree(key, MAX_KEY_NODES, MAX_KEY_NODES, "a dict key or set member")


def _strings_bounded(fn):
    def load(self):
        fn(self)
        top = self.stack[-1]
        if len(top) > MAX_STRING:
            raise PickleBudgetExceeded(f"a string of {len(top):,} characters (at most "
                                       f"{MAX_STRING:,} are accepted)")
    return load


def _keys_checked(fn, items):
    def load(self):
        for key in items(self):
            _hashable(key)
        fn(self)
    return load


class BoundedUnpickler(pickle._Unpickler):
    """`pickle._Unpickler` with the budgets of this module. Call `load()` as usual; the result
    is checked as a tree against `budget_bytes` (the pickle's size)."""

    dispatch = dict(pickle._Unpickler.dispatch)
    #: types of the objects a subclass builds that hold nothing from the pickle to walk
    leaf_types: frozenset = frozenset()

    def __init__(self, file, *, budget_bytes: int, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self.max_nodes = NODES_PER_BYTE * budget_bytes + NODES_FLOOR

    def load(self):
        obj = super().load()
        check_tree(obj, self.max_nodes, leaves=_ATOMS | self.leaf_types)
        return obj


_d = BoundedUnpickler.dispatch
for _op in (pickle.BINUNICODE, pickle.BINUNICODE8, pickle.UNICODE, pickle.BINBYTES,
            pickle.BINBYTES8, pickle.BYTEARRAY8, pickle.BINSTRING, pickle.STRING):
    _d[_op[0]] = _strings_bounded(_d[_op[0]])
# after a MARK, `stack` holds only what the next container opcode consumes: DICT and SETITEMS
# hash every other item, ADDITEMS and FROZENSET all of them; SETITEM hashes stack[-2]
for _op in (pickle.DICT, pickle.SETITEMS):
    _d[_op[0]] = _keys_checked(_d[_op[0]], lambda self: self.stack[0::2])
for _op in (pickle.ADDITEMS, pickle.FROZENSET):
    _d[_op[0]] = _keys_checked(_d[_op[0]], lambda self: self.stack)
_d[pickle.SETITEM[0]] = _keys_checked(_d[pickle.SETITEM[0]], lambda self: self.stack[-2:-1])
del _d, _op


def checked_set(kind):
    """`set`/`frozenset`/`OrderedDict` for a restricted unpickler's allowlist: the members
    (or keys) are checked before they are hashed."""
    def build(*args):
        if len(args) > 1:
            raise pickle.UnpicklingError(f"{kind.__name__} with {len(args)} arguments")
        source = args[0] if args else ()
        items = list(source)  # a dict gives its keys
        for item in items:
            pair = kind is OrderedDict and not isinstance(source, dict)
            _hashable(item[0] if pair and isinstance(item, (tuple, list)) and item else item)
        return kind(source if isinstance(source, dict) else items)
    return build
