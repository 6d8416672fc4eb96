"""The budgets of `zinspect.core.unpickle` around both readers' loads (`_Budgeted`: the work
budget while the unpickler runs, then the tree check, then `plain`), in the allowlists' sets
(`checked_set`), and the pure-Python reader: `pickle._Unpickler` with its budgets checked
opcode by opcode (strings, ints, the keys a container opcode is about to hash), for the
pickles the C unpickler may not read (`zinspect.core.fastpickle` decides)."""

from __future__ import annotations

import pickle

from zinspect.core.gcpause import gc_paused
from zinspect.core.unpickle import (
    _ATOMS,
    MAX_INT_BYTES,
    MAX_STRING,
    NODES_FLOOR,
    NODES_PER_BYTE,
    DeferredPairs,
    PickleBudgetExceeded,
    PickledDict,
    attributes_of,
    charge,
    check_key,
    check_tree,
    drop_leaves,
    flat_tuples,
    keys_and_values,
    work_budget,
)


def plain(obj, leaves: frozenset = _ATOMS, settled: set | frozenset = frozenset()):
    """`obj` with each PickledDict replaced by a dict of the same items (lists and inert
    records are fixed in place, dicts' values too, tuples rebuilt where a member changed;
    shared objects stay shared). Call it after `check_tree`: the graph is then acyclic and at
    most MAX_DEPTH deep, which bounds the recursion; the members of the containers it
    `settled` are not walked again (the 297k shapes of a large model-states file)."""
    done: dict[int, object] = {}

    def fixed(items) -> list | None:
        """Replacements for `items` (None: nothing in them changes)."""
        inner = drop_leaves(items, leaves)
        if not inner or flat_tuples(inner, leaves) is not None:
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
            keys, values = keys_and_values(out)  # (a DeferredPairs': its lists)
            fixed(keys)  # keys are never replaced: walked for inert records only
            values = fixed(values)
            if values is not None:
                if type(out) is DeferredPairs:  # (values to replace: not a run's)
                    DeferredPairs.insert_deferred(out)
                out.update(zip(list(dict.keys(out)), values, strict=True))
            for attrs in attributes_of(out):
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


def checked_set(kind):
    """`set`/`frozenset` for a restricted unpickler's allowlist: the members are checked
    before they are hashed."""
    def build(*args):
        if len(args) > 1:
            raise pickle.UnpicklingError(f"{kind.__name__} with {len(args)} arguments")
        charge(len(args[0]) if args else 0)
        items = list(args[0]) if args else []  # a dict gives its keys
        for item in items:
            check_key(item)
        return kind(items)
    return build


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
            check_key(key)
        fn(self)
    return load


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
