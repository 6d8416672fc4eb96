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

The pure-Python reader is about 7x slower than the C unpickler (13 s against 1.1 s on the
model-states pickle of a 300k-name checkpoint), so a pickle is first offered to a fast path,
`prepare_for_c`, which either proves the C unpickler safe on it or declines (None: the bounded
reader above reads it, and says what is wrong). It declines much rather than risk anything,
and the C unpickler is only ever run with the same `find_class`/`persistent_load` rules and
the same tree check after the load. What it proves, in one C-speed regex match over the whole
opcode stream (a possessive repeat of one alternative per opcode and argument length, so the
tokenisation is exact, not a guess from byte patterns), plus a Python step at each opcode that
needs one (EMPTY_DICT, long strings, STOP):

* every opcode is one of a short list the C unpickler builds without hashing or calling
  anything we did not pick (no DICT, sets, DUP, INST/OBJ, EXT, text PUT/GET, STACK_GLOBAL,
  FRAME, LONG4...); anything else declines;
* every LONG_BINPUT index is below 2**k with 2**k <= len(pickle) / 4: the C memo is an array
  sized by the largest index, so it stays under 4 bytes per pickle byte (the forged 2**32-1
  index declines; the bounded reader keeps its memo in a dict);
* every string and bytes argument is at most `MAX_STRING` long;
* GLOBAL lines are short and hold no NUL, so the marker below cannot be forged.

Hashing is the one thing the C unpickler does that could still blow up (a deep or memo-bomb
tuple used as a dict key). Each EMPTY_DICT is rewritten into a call of `PickledDict` (a GLOBAL
with NUL bytes, which no real pickle holds and the scan refuses in the input) and OrderedDict
resolves to `PickledOrderedDict`: their `__setitem__`, which SETITEM(S) must call for a dict
subclass, checks each key exactly as the bounded reader does before it is hashed. Deep nesting
is built iteratively by the C unpickler and freed by the interpreter's trashcan; the tree check
after the load bounds depth, node count and memo bombs in values, as on the slow path. Any
exception on the fast path declines to the slow path, which gives the verdict and message, so
both paths accept exactly the same pickles and build the same objects: `plain` swaps each
PickledDict for a dict after the tree check (OrderedDicts stay PickledOrderedDict on both
paths, and pickle as OrderedDict). Hostile pickles can cost two reads, each bounded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import pickle
import re
import threading
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
    """The objects a walk over `obj` reaches next (None for a leaf): a container's members,
    a dict's keys then values; inert records of the restricted unpickler expose their `args`
    and `state`."""
    if isinstance(obj, (tuple, list, set, frozenset)):
        return obj
    if isinstance(obj, dict):
        return itertools.chain(dict.keys(obj), dict.values(obj)) if obj else None
    args = getattr(obj, "args", None) if hasattr(obj, "state") else None
    if isinstance(args, tuple):
        return (*args, obj.state)
    return None


def _non_leaves(obj, leaves: frozenset) -> list:
    """The members of `obj` (as `children` lists them) that are not leaves."""
    if isinstance(obj, dict):
        # the dict's own views: an OrderedDict's are 5-10x slower to walk
        return _drop_leaves(dict.keys(obj), leaves) + _drop_leaves(dict.values(obj), leaves)
    kids = children(obj)
    return _drop_leaves(kids, leaves) if kids else []


def _drop_leaves(items, leaves: frozenset) -> list:
    """`items` (a collection or dict view) without its leaves. The common case, all leaves (a
    dict of 300k names and tensors), is decided at C speed."""
    if set(map(type, items)) <= leaves:
        return []
    return [x for x in items if type(x) not in leaves]


def check_tree(obj, max_nodes: int, max_depth: int = MAX_DEPTH, what: str = "the pickle",
               leaves: frozenset = _ATOMS) -> None:
    """Raise PickleBudgetExceeded when walking `obj` would visit more than `max_nodes` nodes or
    go deeper than `max_depth`. Iterative; leaves (objects of the types `leaves`) are counted
    without being stacked, and so are tuples of leaves (a param's shape), in bulk; the walk
    stops at the first budget passed."""
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
        if nodes > max_nodes:
            raise PickleBudgetExceeded(f"{what} holds more than {max_nodes:,} objects" +
                                       (" (shared references repeated: a memo bomb)"
                                        if what == "the pickle" else ""))


def _flat_tuples(items: list, leaves: frozenset) -> int | None:
    """When every one of `items` is a tuple of leaves: how many leaves they hold; else None."""
    if not items or set(map(type, items)) != {tuple} or \
            not set(map(type, itertools.chain.from_iterable(items))) <= leaves:
        return None
    return sum(map(len, items))


def plain(obj, leaves: frozenset = _ATOMS):
    """`obj` with each PickledDict replaced by a dict of the same items (lists and inert
    records are fixed in place, dicts' values too, tuples rebuilt where a member changed;
    shared objects stay shared). Call it after `check_tree`: the graph is then acyclic and at
    most MAX_DEPTH deep, which bounds the recursion."""
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
        if isinstance(out, dict):
            fixed(dict.keys(out))  # keys are never replaced: walked for inert records only
            values = fixed(dict.values(out))
            if values is not None:
                out.update(zip(list(dict.keys(out)), values, strict=True))
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


_gc_lock = threading.Lock()
_gc_state = {"readers": 0, "was_enabled": False}


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off while pickles are read or a checkpoint is opened
    (nested and from several threads): a reader builds millions of objects and no cycles, and
    the collector's passes over them cost as much as the unpickling itself (1.9 s instead of
    3.1 s here). Reference counting still frees everything that is dropped.

    When the collector is turned back on, the objects built meanwhile are moved straight to
    the oldest generation (gc.freeze() then gc.unfreeze(): two list splices) instead of being
    walked by the next young collection (0.3-0.5 s at 297k names). Cyclic garbage made while
    paused is then freed by the next full collection instead: there is little (59 objects at
    297k names, since `plain` clears its memo; before that, the whole parsed model states)."""
    with _gc_lock:
        if not _gc_state["readers"]:
            _gc_state["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_state["readers"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_state["readers"] -= 1
            if not _gc_state["readers"] and _gc_state["was_enabled"]:
                gc.freeze()
                gc.unfreeze()
                gc.enable()


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


class _Budgeted:
    """What both readers do around the unpickler's own load: the work budget while it runs,
    then the tree check and the plain result (the pickle's size sets the budget)."""

    #: types of the objects a subclass builds that hold nothing from the pickle to walk
    leaf_types: frozenset = frozenset()

    def __init__(self, file, *, budget_bytes: int, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self.max_nodes = NODES_PER_BYTE * budget_bytes + NODES_FLOOR

    def load(self):
        with gc_paused(), work_budget(self.max_nodes):
            obj = super().load()
            check_tree(obj, self.max_nodes, leaves=_ATOMS | self.leaf_types)
            return plain(obj, _ATOMS | self.leaf_types)


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


# ----------------------------------------------------------------------------- the fast path


class PickledDict(dict):
    """A dict built by the C unpickler on the fast path: each key is checked before it is
    hashed (SETITEM and SETITEMS call `__setitem__` on a dict subclass)."""

    __slots__ = ()

    def __setitem__(self, key, value, _atoms=_ATOMS, _set=dict.__setitem__) -> None:
        if type(key) not in _atoms:  # (the defaults: no global lookups, 600k calls at 300k names)
            _hashable(key)
        _set(self, key, value)


class PickledOrderedDict(OrderedDict):
    """`collections.OrderedDict` for a restricted unpickler's allowlist (see PickledDict); its
    constructor fills it through `__setitem__` too. It stays in the results (copying 300k
    items costs 0.2 s) and pickles as an OrderedDict."""

    def __init__(self, *args, **kwargs) -> None:
        if args:  # OrderedDict(items): a copy, charged (see `charge`)
            charge(len(args[0]))
        OrderedDict.__init__(self, *args, **kwargs)

    def __reduce__(self):
        return OrderedDict, (), vars(self) or None, None, iter(self.items())

    def __setitem__(self, key, value, _atoms=_ATOMS, _set=OrderedDict.__setitem__) -> None:
        if type(key) not in _atoms:
            _hashable(key)
        _set(self, key, value)


#: what each EMPTY_DICT becomes: GLOBAL (a name no scanned pickle may hold), EMPTY_TUPLE, REDUCE
DICT_MARKER = ("\x00zinspect", "\x00dict")
_DICT_CALL = b"c" + "\n".join(DICT_MARKER).encode() + b"\n)R"
#: opcodes with a length-prefixed str/bytes argument -> bytes of the length
_LENGTH_PREFIXED = {ord("X"): 4, ord("B"): 4, ord("T"): 4, ord("C"): 1, ord("U"): 1,
                    0x8C: 1, 0x8D: 8, 0x8E: 8, 0x96: 8}
_STOP, _EMPTY_DICT = ord("."), ord("}")


def _below(bits: int) -> bytes:
    """A regex for a 4-byte little-endian unsigned int below 2**bits (16 <= bits < 32)."""
    top = (1 << (bits % 8)) - 1 if bits % 8 else 0xFF
    head = b"." * (bits // 8) if bits % 8 else b"." * (bits // 8 - 1)
    tail = b"\x00" * (4 - len(head) - 1)
    return head + b"[\x00-" + re.escape(bytes([top])) + b"]" + tail


@functools.lru_cache(maxsize=4)
def _opcode_runs(index_bits: int):
    """The regex matching a run of opcodes the C unpickler may read unwatched (None before
    Python 3.11, which lacks the possessive repeat that keeps the match linear)."""
    short_unicode = b"X(?:" + b"|".join(re.escape(bytes([n, 0, 0, 0])) + b"." * n
                                        for n in range(256)) + b")"
    ops = [  # most frequent in torch's protocol-2 pickles first
        b"r" + _below(index_bits), b"K.", b"h.", b"\x85", b"R", rb"\(", short_unicode, b"t",
        b"j....", rb"\)", b"\x89", b"\x88", b"Q", b"\x86", b"\x87", b"q.", b"N", b"u", b"s",
        rb"\]", b"a", b"e", b"l", b"M..", b"J....", b"G.{8}", b"b", b"\x81", b"0", b"1",
        b"\x94", b"\x80[\x02-\x05]", b"\x8a(?:" + b"|".join(re.escape(bytes([n])) + b"." * n
                                                            for n in range(9)) + b")",
        b"c[^\n\x00]{1,256}\n[^\n\x00]{1,256}\n",
    ]
    try:
        return re.compile(b"(?:" + b"|".join(ops) + b")*+", re.DOTALL)
    except re.error:
        return None


def prepare_for_c(raw: bytes) -> bytes | None:
    """`raw` with each EMPTY_DICT made a PickledDict call, when the scan proves the C unpickler
    safe on it (see the module docstring); None when it does not."""
    runs = _opcode_runs(max(16, min(31, (len(raw) // 4).bit_length() - 1)))
    if runs is None:
        return None
    pieces, start, pos, end = [], 0, 0, len(raw)
    view = memoryview(raw)  # pieces without copies: the join is the one copy
    while True:
        pos = runs.match(raw, pos).end()
        if pos >= end:
            return None
        op = raw[pos]
        if op == _STOP:
            pieces.append(view[start:pos + 1])
            return b"".join(pieces)
        if op == _EMPTY_DICT:
            pieces += (view[start:pos], _DICT_CALL)
            pos = start = pos + 1
            continue
        width = _LENGTH_PREFIXED.get(op)
        if width is None:
            return None
        n = int.from_bytes(raw[pos + 1:pos + 1 + width], "little")
        pos += 1 + width + n
        if n > MAX_STRING or pos > end:
            return None


class FastUnpickler(_Budgeted, pickle.Unpickler):
    """The C unpickler for pickles `prepare_for_c` prepared; same interface, tree check and
    plain result as BoundedUnpickler. A subclass's `find_class` must resolve `special_globals`
    first (the marker to PickledDict) and map collections.OrderedDict to PickledOrderedDict,
    as the bounded reader's allowlist should too (so NEWOBJ of it agrees on both paths)."""

    special_globals = {DICT_MARKER: PickledDict}
