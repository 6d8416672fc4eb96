"""A pickle reader whose time and memory are bounded by the size of the pickle.

The pure-Python `pickle._Unpickler` keeps its memo in a dict (the C one sizes an array by the
largest PUT index: a forged `LONG_BINPUT 2**32-1` allocates gigabytes) and builds objects with
an explicit stack, so reading is linear in the pickle's bytes. What stays unbounded is what the
objects can make others do: a dict key that is a tuple nested 100,000 deep crashes the
interpreter when it is hashed (SIGSEGV) or raises RecursionError; a "memo bomb" (each level a
tuple of two references to the level below) is 2**60 nodes when walked or formatted, from a few
KB; a 24 MiB string hangs a terminal. `BoundedUnpickler` (bounded_unpickler.py) therefore
checks, as it reads:

* every string and bytes object against `MAX_STRING`, every int against `MAX_INT_BYTES`;
* every object about to be hashed (dict keys, set members) against `MAX_KEY_NODES` nodes, so
  hashing cannot recurse deeply or blow up;

and, once loaded, the result as a tree (shared references counted each time they are
reached, as any later walk would reach them) against `MAX_DEPTH` and a node budget
proportional to the pickle's size. Past any budget it raises `PickleBudgetExceeded`, an
`UnpicklingError` saying which budget. The memo needs no budget of its own: each entry costs
a PUT opcode of at least two bytes.

The readers' results are the same on both paths: `zinspect.core.fastpickle` offers large
pickles to the C unpickler when its scan proves that safe. Both build dicts through
`PickledDict` / `PickledOrderedDict` (below), whose `__setitem__` checks each key before it is
hashed, and `plain` (bounded_unpickler.py) swaps each PickledDict back for a dict after the
tree check.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import threading
from collections import OrderedDict
from itertools import repeat

#: longest str or bytes object accepted (real checkpoints: names and configs of a few KB)
MAX_STRING = 1 << 20
#: widest int accepted, in bytes (LONG1/LONG4, or the text of INT/LONG): real checkpoints hold
#: none beyond 64 bits (steps, sizes, seeds); a 10**5000 cannot even be printed (Python's 4300-digit
#: int-to-str limit) and made every `info` / `validate` an internal error
MAX_INT_BYTES = 16
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
    """The objects a walk over `obj` reaches next (None for a leaf): a container's members,
    a dict's keys then values (and the attributes a BUILD gave an OrderedDict); inert records
    of the restricted unpickler expose their `args` and `state`."""
    if isinstance(obj, (tuple, list, set, frozenset)):
        return obj
    if isinstance(obj, dict):
        attrs = attributes_of(obj)
        return itertools.chain(*keys_and_values(obj), attrs) if obj or attrs else None
    args = getattr(obj, "args", None) if hasattr(obj, "state") else None
    if isinstance(args, tuple):
        return (*args, obj.state)
    return None


def attributes_of(obj) -> list:
    """[the instance dict] of an OrderedDict that a BUILD gave attributes (a state_dict's
    `_metadata`: its dicts are swapped by `plain`, a memo bomb in it is counted), else []."""
    attrs = vars(obj) if type(obj) in (PickledOrderedDict, DeferredPairs) else None
    return [attrs] if attrs else []


def _non_leaves(obj, leaves: frozenset) -> list:
    """The members of `obj` (as `children` lists them) that are not leaves."""
    if isinstance(obj, dict):
        # the dict's own views: an OrderedDict's are 5-10x slower to walk
        keys, values = keys_and_values(obj)
        return drop_leaves(keys, leaves) + drop_leaves(values, leaves) + attributes_of(obj)
    kids = children(obj)
    return drop_leaves(kids, leaves) if kids else []


def drop_leaves(items, leaves: frozenset) -> list:
    """`items` (a collection or dict view) without its leaves. The common cases, all leaves (a
    dict of 300k names and tensors) or none (300k shapes), are decided at C speed."""
    kinds = set(map(type, items))
    if kinds <= leaves:
        return []
    if kinds.isdisjoint(leaves):
        return list(items)
    return [x for x in items if type(x) not in leaves]


def check_tree(obj, max_nodes: int, max_depth: int = MAX_DEPTH, what: str = "the pickle",
               leaves: frozenset = _ATOMS, settled: set | None = None) -> None:
    """Raise PickleBudgetExceeded when walking `obj` would visit more than `max_nodes` nodes or
    go deeper than `max_depth`. Leaves (objects of the types `leaves`) are counted without
    being visited, and so are tuples of leaves (a param's shape), in bulk. Each container is
    measured once, bottom up (its nodes and depth as a walk would count them, a shared one
    counted each time it is reached), so a memo bomb of 60 levels costs 60 measurements, not a
    walk of its 2**60 nodes (that took a minute per file); a cycle nests without end. `settled`,
    when given, receives the id of each container whose members are all leaves or tuples of
    leaves (`plain` need not walk them again)."""
    if not children(obj):
        return
    measured: dict[int, tuple[int, int]] = {}  # id -> (nodes it adds, depth below it)
    started: dict[int, tuple[list, int, int]] = {}  # id -> (kids, its own nodes, depth)
    stack = [obj]
    while stack:
        item = stack[-1]
        key = id(item)
        if key in measured:
            stack.pop()
        elif key not in started:  # first reached: its own count, its kids to measure first
            inner = _non_leaves(item, leaves)
            nodes = len(item) * (2 if isinstance(item, dict) else 1) \
                if isinstance(item, _SIZED) else len(inner) + 2
            flat = flat_tuples(inner, leaves)
            if settled is not None and (flat is not None or not inner):
                settled.add(key)
            kids = [k for k in inner if children(k)] if flat is None else []
            started[key] = kids, nodes + (flat or 0), 1 if flat else 0
            for kid in kids:
                if id(kid) in started:  # being measured: on the path to it, a cycle
                    _too_deep(what, max_depth)
                stack.append(kid)
        else:  # its kids are measured
            stack.pop()
            kids, nodes, depth = started.pop(key)
            for kid in kids:
                n, d = measured[id(kid)]
                nodes, depth = nodes + n, max(depth, d + 1)
            if depth >= max_depth:
                _too_deep(what, max_depth)
            if nodes + 1 > max_nodes:
                raise PickleBudgetExceeded(f"{what} holds more than {max_nodes:,} objects" +
                                           (" (shared references repeated: a memo bomb)"
                                            if what == "the pickle" else ""))
            measured[key] = nodes, depth


def _too_deep(what: str, max_depth: int):
    raise PickleBudgetExceeded(f"{what} nests deeper than {max_depth} levels")


def flat_tuples(items: list, leaves: frozenset) -> int | None:
    """When every one of `items` is a tuple of leaves: how many leaves they hold; else None."""
    if not items or type(items[0]) is not tuple or set(map(type, items)) != {tuple} or \
            not set(map(type, itertools.chain.from_iterable(items))) <= leaves:
        return None
    return sum(map(len, items))


_work = threading.local()


@contextlib.contextmanager
def work_budget(units: int):
    """While a pickle is read (in this thread): the copying work its calls may ask for."""
    _work.left = units
    try:
        yield
    finally:
        _work.left = None


def charge(units: int) -> None:
    """Count `units` of work a call of the allowlist does on the pickle's behalf (copying a
    sequence it was given). The opcodes cost time linear in the pickle, but a call can be
    handed the same large object again and again through the memo: `set(L)` 100k times on a
    250k-item list is 2.5e10 item copies from 1 MB. Past the budget: PickleBudgetExceeded."""
    left = getattr(_work, "left", None)
    if left is not None:
        left -= units
        _work.left = left
        if left < 0:
            raise PickleBudgetExceeded("the pickle's calls copy more objects than its size can "
                                       "need (one object passed to a call again and again)")


def check_key(key) -> None:
    if type(key) not in _ATOMS:
        check_tree(key, MAX_KEY_NODES, MAX_KEY_NODES, "a dict key or set member")


# ------------------------------------------------------------- the checked dicts of both paths


class PairsRun:
    """The (name, value) pairs of a run of dict entries the fast path read in bulk
    (zinspect.core.pickle_runs): set as a value into a PickledDict or PickledOrderedDict, it
    inserts its pairs instead, in order and once (their keys are str: nothing to check), or
    has a PickledOrderedDict keep them as lists until it is used (DeferredPairs)."""

    __slots__ = ("names", "values", "inserted")

    def __init__(self, names: list, values: list) -> None:
        self.names, self.values, self.inserted = names, values, False

    def insert_into(self, target: dict, setter) -> None:
        names, values = self.take()
        if type(target) is PickledOrderedDict and len(names) >= DEFER_AT_LEAST:
            PickledOrderedDict._deferred.__set__(target, [names, values, False])
            target.__class__ = DeferredPairs  # (its pairs kept as lists)
        else:
            any(map(setter, repeat(target), names, values))  # (each returns None)

    def take(self) -> tuple[list, list]:
        """The pairs' names and values, once."""
        if self.inserted:
            raise pickle.UnpicklingError("a run of entries set twice")
        self.inserted = True
        names, values = self.names, self.values
        self.names = self.values = None
        return names, values


class PickledDict(dict):
    """A dict built by the C unpickler on the fast path: each key is checked before it is
    hashed (SETITEM and SETITEMS call `__setitem__` on a dict subclass)."""

    __slots__ = ()

    def __setitem__(self, key, value, _atoms=_ATOMS, _set=dict.__setitem__,
                    _run=PairsRun) -> None:
        if type(key) not in _atoms:  # (the defaults: no global lookups, 600k calls at 300k names)
            check_key(key)
        if type(value) is _run:
            return value.insert_into(self, _set)
        _set(self, key, value)


def refuse_build(*_args) -> None:
    """`__setstate__` of every object of an allowlist but the inert records and OrderedDicts:
    BUILD (the one opcode that changes an object it did not make) would otherwise set the
    attributes of a shared allowlist object for every pickle read after it in the process
    (`torch.FloatStorage`'s dtype, a checked function's defaults, a class's methods) or of a
    tensor already checked against its storage. Both unpicklers look `__setstate__` up first."""
    raise pickle.UnpicklingError("the pickle changes an object it may not change (BUILD of an "
                                 "allowlisted object or a tensor)")


class NoBuild(type):
    """Metaclass of an allowlisted class whose instances may take a BUILD: the class itself may
    not (its methods are the rules, shared by every later pickle). A property: found before the
    class's own `__setstate__`, which its instances' BUILD calls."""

    @property
    def __setstate__(cls):
        return refuse_build


class PickledOrderedDict(OrderedDict, metaclass=NoBuild):
    """`collections.OrderedDict` for a restricted unpickler's allowlist (see PickledDict); its
    constructor fills it through `__setitem__` too. It stays in the results (copying 300k
    items costs 0.2 s) and pickles as an OrderedDict. A BUILD sets an instance's attributes
    (a state_dict's `_metadata`), never the class's (`NoBuild`)."""

    __slots__ = ("_deferred",)  # (DeferredPairs': not an attribute `vars` lists)

    def __init__(self, *args, **kwargs) -> None:
        if args or kwargs:  # (OrderedDict(): nothing to do, 300k times at 300k names)
            if args:  # OrderedDict(items): a copy, charged (see `charge`)
                charge(len(args[0]))
            OrderedDict.__init__(self, *args, **kwargs)

    def __reduce__(self):
        return OrderedDict, (), vars(self) or None, None, iter(self.items())

    def __setstate__(self, state) -> None:
        """BUILD of an instance (a state_dict's `_metadata`): a dict or (dict, slot dict) set as
        attributes, none named as the class's methods or slots (`items`, `__class__`,
        `_deferred`, `insert_deferred`: they would answer for the dict as the pickle chose)."""
        parts = state if type(state) is tuple and len(state) == 2 else (state,)
        for part in parts:
            if part is None:
                continue
            if not isinstance(part, dict):
                raise pickle.UnpicklingError("an OrderedDict's state is not a dict")
            if type(part) is DeferredPairs:
                DeferredPairs.insert_deferred(part)
            if any(type(k) is not str or hasattr(DeferredPairs, k) for k in dict.keys(part)):
                raise pickle.UnpicklingError("the pickle gives an OrderedDict an attribute named "
                                             "as one of its methods or slots")
            vars(self).update(part)

    def __setitem__(self, key, value, _atoms=_ATOMS, _set=OrderedDict.__setitem__,
                    _run=PairsRun) -> None:
        if type(key) not in _atoms:
            check_key(key)
        if type(value) is _run:
            return value.insert_into(self, _set)
        _set(self, key, value)


#: a run of fewer pairs is inserted at once (DeferredPairs)
DEFER_AT_LEAST = 1024
_DEFERRED = threading.RLock()


class DeferredPairs(PickledOrderedDict):
    """A PickledOrderedDict whose last pairs, from a bulk-read run (PairsRun) on, are kept as
    two lists, not inserted: 297k OrderedDict insertions (0.17 s at 297k names, the module's
    and param_shapes') are paid only by a reader that uses the dict as a dict.
    Until it is first read, each pair set is appended to the lists (the unpickler's: entries
    after the run, a later run). The first read checks that their keys are distinct and none is
    in the dict; then `keys_list` / `values_list` (the layouts, the tree check) and `len` read
    the lists. Any other use, or a key twice, inserts the pairs first, in the order they were
    set, once, and sets the class back: the very object the other paths build. A lock makes
    each step whole; its methods are called through the class (never a name a pickle sets)."""

    __slots__ = ()

    def __setitem__(self, key, value, _atoms=_ATOMS, _run=PairsRun) -> None:
        if type(key) not in _atoms:
            check_key(key)
        with _DEFERRED:
            if type(self) is DeferredPairs and not self._deferred[2]:  # nothing read it yet
                names, values, _ = self._deferred
                if type(value) is _run:
                    more, their = value.take()
                    names += more
                    values += their
                else:
                    names.append(key)
                    values.append(value)
                return
            DeferredPairs.insert_deferred(self)
        PickledOrderedDict.__setitem__(self, key, value)

    def _lists(self) -> list | None:
        """(lock held) [keys, values, True] of the pairs not inserted, checked once; None when
        they are inserted (now, if a key is twice or already in the dict)."""
        if type(self) is not DeferredPairs:
            return None
        lists = self._deferred
        if not lists[2]:
            distinct = set(lists[0])
            if len(distinct) != len(lists[0]) or not distinct.isdisjoint(dict.keys(self)):
                DeferredPairs.insert_deferred(self)
                return None
            lists[2] = True
        return lists

    def keys_list(self) -> list:
        with _DEFERRED:
            lists = DeferredPairs._lists(self)
            return list(dict.keys(self)) + (lists[0] if lists else [])

    def values_list(self) -> list:
        with _DEFERRED:
            lists = DeferredPairs._lists(self)
            return list(dict.values(self)) + (lists[1] if lists else [])

    def __len__(self) -> int:
        with _DEFERRED:
            lists = DeferredPairs._lists(self)
            return dict.__len__(self) + (len(lists[0]) if lists else 0)

    def insert_deferred(self) -> None:
        with _DEFERRED:
            if type(self) is DeferredPairs:
                names, values, _ = self._deferred
                any(map(OrderedDict.__setitem__, repeat(self), names, values))
                del self._deferred
                self.__class__ = PickledOrderedDict


def _inserting_first(name: str):
    method = getattr(PickledOrderedDict, name)

    def inserted_first(self, *args, **kwargs):
        for d in (self, *args, *kwargs.values()):  # (`==` of two: the C code reads the other's)
            if type(d) is DeferredPairs:
                DeferredPairs.insert_deferred(d)
        return method(self, *args, **kwargs)
    inserted_first.__name__ = name
    return inserted_first


for _name in ("__getitem__", "__delitem__", "__contains__", "__iter__",
              "__reversed__", "__eq__", "__ne__", "__repr__", "__reduce__", "__sizeof__",
              "__or__", "__ror__", "__ior__", "get", "keys", "values", "items", "pop", "popitem",
              "setdefault", "update", "clear", "copy", "move_to_end"):
    setattr(DeferredPairs, _name, _inserting_first(_name))
del _name


def keys_and_values(d: dict) -> tuple:
    """A dict's own keys and values views (a DeferredPairs': lists, its pairs not inserted)."""
    if type(d) is DeferredPairs:  # (through the class: never a name a pickle could shadow)
        return DeferredPairs.keys_list(d), DeferredPairs.values_list(d)
    return dict.keys(d), dict.values(d)
