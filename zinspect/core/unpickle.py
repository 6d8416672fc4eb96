"""A pickle reader whose time and memory are bounded by the size of the pickle.

The pure-Python `pickle._Unpickler` keeps its memo in a dict (the C one sizes an array by the
largest PUT index: a forged `LONG_BINPUT 2**32-1` allocates gigabytes) and builds objects with
an explicit stack, so reading is linear in the pickle's bytes. What stays unbounded is what the
objects can make others do: a dict key that is a tuple nested 100,000 deep crashes the
interpreter when it is hashed (SIGSEGV) or raises RecursionError; a "memo bomb" (each level a
tuple of two references to the level below) is 2**60 nodes when walked or formatted, from a few
KB; a 24 MiB string hangs a terminal. `BoundedUnpickler` therefore checks, as it reads:

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
hashed, and `plain` swaps each PickledDict back for a dict after the tree check.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import threading
from collections import OrderedDict
from itertools import repeat

from zinspect.core.gcpause import gc_paused

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
        attrs = _attributes(obj)
        return itertools.chain(dict.keys(obj), dict.values(obj), attrs) if obj or attrs else None
    args = getattr(obj, "args", None) if hasattr(obj, "state") else None
    if isinstance(args, tuple):
        return (*args, obj.state)
    return None


def _attributes(obj) -> list:
    """[the instance dict] of an OrderedDict that a BUILD gave attributes (a state_dict's
    `_metadata`: its dicts are swapped by `plain`, a memo bomb in it is counted), else []."""
    attrs = vars(obj) if type(obj) is PickledOrderedDict else None
    return [attrs] if attrs else []


def _non_leaves(obj, leaves: frozenset) -> list:
    """The members of `obj` (as `children` lists them) that are not leaves."""
    if isinstance(obj, dict):
        # the dict's own views: an OrderedDict's are 5-10x slower to walk
        return _drop_leaves(dict.keys(obj), leaves) + _drop_leaves(dict.values(obj), leaves) + \
            _attributes(obj)
    kids = children(obj)
    return _drop_leaves(kids, leaves) if kids else []


def _drop_leaves(items, leaves: frozenset) -> list:
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
    go deeper than `max_depth`. Iterative; leaves (objects of the types `leaves`) are counted
    without being stacked, and so are tuples of leaves (a param's shape), in bulk; the walk
    stops at the first budget passed. `settled`, when given, receives the id of each container
    whose members are all leaves or tuples of leaves (`plain` need not walk them again)."""
    stack, nodes = [(obj, 0)], 1
    while stack:
        item, depth = stack.pop()
        if not children(item):
            continue
        if depth >= max_depth:
            raise PickleBudgetExceeded(f"{what} nests deeper than {max_depth} levels")
        inner = _non_leaves(item, leaves)
        nodes += len(item) * (2 if isinstance(item, dict) else 1) if isinstance(item, _SIZED) \
            else len(inner) + 2
        flat = _flat_tuples(inner, leaves)
        if flat is None:
            stack.extend([(kid, depth + 1) for kid in inner])
        elif flat and depth + 1 >= max_depth:
            raise PickleBudgetExceeded(f"{what} nests deeper than {max_depth} levels")
        else:
            nodes += flat
        if settled is not None and (flat is not None or not inner):
            settled.add(id(item))
        if nodes > max_nodes:
            raise PickleBudgetExceeded(f"{what} holds more than {max_nodes:,} objects" +
                                       (" (shared references repeated: a memo bomb)"
                                        if what == "the pickle" else ""))


def _flat_tuples(items: list, leaves: frozenset) -> int | None:
    """When every one of `items` is a tuple of leaves: how many leaves they hold; else None."""
    if not items or type(items[0]) is not tuple or set(map(type, items)) != {tuple} or \
            not set(map(type, itertools.chain.from_iterable(items))) <= leaves:
        return None
    return sum(map(len, items))


def plain(obj, leaves: frozenset = _ATOMS, settled: set | frozenset = frozenset()):
    """`obj` with each PickledDict replaced by a dict of the same items (lists and inert
    records are fixed in place, dicts' values too, tuples rebuilt where a member changed;
    shared objects stay shared). Call it after `check_tree`: the graph is then acyclic and at
    most MAX_DEPTH deep, which bounds the recursion; the members of the containers it
    `settled` are not walked again (the 297k shapes of a large model-states file)."""
    done: dict[int, object] = {}

    def fixed(items) -> list | None:
        """Replacements for `items` (None: nothing in them changes)."""
        inner = _drop_leaves(items, leaves)
        if not inner or _flat_tuples(inner, leaves) is not None:
            return None
        out = [x if type(x) in leaves else conv(x) for x in items]
        return out if any(a is not b for a, b in zip(out, items, strict=True)) else None

    def conv(x):
        key = id(x)
        if key in done:
            return done[key]
        t = type(x)
        out = done[key] = dict(x) if t is PickledDict else x
        if key in settled:
            return out
        if isinstance(out, dict):
            fixed(dict.keys(out))  # keys are never replaced: walked for inert records only
            values = fixed(dict.values(out))
            if values is not None:
                out.update(zip(list(dict.keys(out)), values, strict=True))
            for attrs in _attributes(out):
                conv(attrs)  # fixed in place
        elif t is list:
            items = fixed(x)
            if items is not None:
                x[:] = items
        elif t is tuple:
            items = fixed(x)
            if items is not None:
                out = done[key] = tuple(items)
        elif t in (set, frozenset):
            fixed(list(x))
        elif hasattr(x, "state") and isinstance(getattr(x, "args", None), tuple):
            x.args, x.state = conv(x.args), x.state if type(x.state) in leaves else \
                conv(x.state)
        return out

    try:
        return obj if type(obj) in leaves else conv(obj)
    finally:
        # fixed and conv refer to each other (a reference cycle holding `done`): cleared, the
        # objects walked are freed by reference counting when dropped, not at the next
        # collection pass (the parsed 297k-name model states otherwise outlived their use)
        done.clear()


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


def _int_bounded(fn):
    def load(self):
        fn(self)
        bits = self.stack[-1].bit_length()
        if bits > 8 * MAX_INT_BYTES - 1:  # a signed int of MAX_INT_BYTES bytes
            raise pickle.UnpicklingError(f"an int of {bits:,} bits (at most "
                                         f"{8 * MAX_INT_BYTES - 1} are accepted)")
    return load


def _keys_checked(fn, items):
    def load(self):
        for key in items(self):
            _hashable(key)
        fn(self)
    return load


class _Budgeted:
    """What both readers do around the unpickler's own load: the work budget while it runs,
    then the tree check and the plain result (the pickle's size sets the budget)."""

    #: types of the objects a subclass builds that hold nothing from the pickle to walk
    leaf_types: frozenset = frozenset()
    #: whether the reader builds PickledDicts (the fast path's), which `plain` swaps for dicts
    builds_pickled_dicts = False

    def __init__(self, file, *, budget_bytes: int, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self.max_nodes = NODES_PER_BYTE * budget_bytes + NODES_FLOOR

    def load(self):
        with gc_paused(), work_budget(self.max_nodes):
            obj = super().load()
            # the memo holds every intermediate object of the pickle (at 297k names: 100 MB of
            # argument tuples, storage ids, hooks dicts) until the reader is dropped
            self.memo.clear()
            leaves = _ATOMS | self.leaf_types
            settled = set() if self.builds_pickled_dicts else None
            check_tree(obj, self.max_nodes, leaves=leaves, settled=settled)
            return obj if settled is None else plain(obj, leaves, settled)


class BoundedUnpickler(_Budgeted, pickle._Unpickler):
    """`pickle._Unpickler` with the budgets of this module. Call `load()` as usual; the result
    is checked as a tree against `budget_bytes` (the pickle's size)."""

    dispatch = dict(pickle._Unpickler.dispatch)
    #: globals resolved before a subclass's allowlist (see FastUnpickler)
    special_globals: dict = {}


_d = BoundedUnpickler.dispatch
for _op in (pickle.BINUNICODE, pickle.BINUNICODE8, pickle.UNICODE, pickle.BINBYTES,
            pickle.BINBYTES8, pickle.BYTEARRAY8, pickle.BINSTRING, pickle.STRING):
    _d[_op[0]] = _strings_bounded(_d[_op[0]])
for _op in (pickle.LONG1, pickle.LONG4, pickle.INT, pickle.LONG):
    _d[_op[0]] = _int_bounded(_d[_op[0]])
# after a MARK, `stack` holds only what the next container opcode consumes: DICT and SETITEMS
# hash every other item, ADDITEMS and FROZENSET all of them; SETITEM hashes stack[-2]
for _op in (pickle.DICT, pickle.SETITEMS):
    _d[_op[0]] = _keys_checked(_d[_op[0]], lambda self: self.stack[0::2])
for _op in (pickle.ADDITEMS, pickle.FROZENSET):
    _d[_op[0]] = _keys_checked(_d[_op[0]], lambda self: self.stack)
_d[pickle.SETITEM[0]] = _keys_checked(_d[pickle.SETITEM[0]], lambda self: self.stack[-2:-1])
del _d, _op


def checked_set(kind):
    """`set`/`frozenset` for a restricted unpickler's allowlist: the members are checked
    before they are hashed."""
    def build(*args):
        if len(args) > 1:
            raise pickle.UnpicklingError(f"{kind.__name__} with {len(args)} arguments")
        charge(len(args[0]) if args else 0)
        items = list(args[0]) if args else []  # a dict gives its keys
        for item in items:
            _hashable(item)
        return kind(items)
    return build


# ------------------------------------------------------------- the checked dicts of both paths


class PairsRun:
    """The (name, value) pairs of a run of dict entries the fast path read in bulk
    (zinspect.core.pickle_runs): set as a value into a PickledDict or PickledOrderedDict, it
    inserts its pairs instead, in order and once (their keys are str: nothing to check)."""

    __slots__ = ("names", "values", "inserted")

    def __init__(self, names: list, values: list) -> None:
        self.names, self.values, self.inserted = names, values, False

    def insert_into(self, target: dict, setter) -> None:
        if self.inserted:
            raise pickle.UnpicklingError("a run of entries set twice")
        self.inserted = True
        any(map(setter, repeat(target), self.names, self.values))  # (each returns None)
        self.names = self.values = None


class PickledDict(dict):
    """A dict built by the C unpickler on the fast path: each key is checked before it is
    hashed (SETITEM and SETITEMS call `__setitem__` on a dict subclass)."""

    __slots__ = ()

    def __setitem__(self, key, value, _atoms=_ATOMS, _set=dict.__setitem__,
                    _run=PairsRun) -> None:
        if type(key) not in _atoms:  # (the defaults: no global lookups, 600k calls at 300k names)
            _hashable(key)
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
    not (its methods are the rules, shared by every later pickle)."""

    __setstate__ = refuse_build


class PickledOrderedDict(OrderedDict, metaclass=NoBuild):
    """`collections.OrderedDict` for a restricted unpickler's allowlist (see PickledDict); its
    constructor fills it through `__setitem__` too. It stays in the results (copying 300k
    items costs 0.2 s) and pickles as an OrderedDict. A BUILD sets an instance's attributes
    (a state_dict's `_metadata`), never the class's (`NoBuild`)."""

    def __init__(self, *args, **kwargs) -> None:
        if args or kwargs:  # (OrderedDict(): nothing to do, 300k times at 300k names)
            if args:  # OrderedDict(items): a copy, charged (see `charge`)
                charge(len(args[0]))
            OrderedDict.__init__(self, *args, **kwargs)

    def __reduce__(self):
        return OrderedDict, (), vars(self) or None, None, iter(self.items())

    def __setitem__(self, key, value, _atoms=_ATOMS, _set=OrderedDict.__setitem__,
                    _run=PairsRun) -> None:
        if type(key) not in _atoms:
            _hashable(key)
        if type(value) is _run:
            return value.insert_into(self, _set)
        _set(self, key, value)
