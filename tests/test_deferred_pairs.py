"""`unpickle.DeferredPairs`: a bulk-read run's pairs kept as two lists until the dict is used as
a dict. Whatever is asked of it gives what the PickledOrderedDict with the pairs inserted
gives, and leaves that very dict behind (class and content); `len`, the layouts' keys_of /
values_of and the tree check read the lists without inserting; runs that could not keep a
dict's meaning (a key twice, a key already in the dict, a short run, a plain dict) are
inserted at once; threads racing to insert insert once."""

from __future__ import annotations

import copy
import io
import json
import operator
import pickle
import threading
from collections import OrderedDict

import pytest

from zinspect.core.bounded_unpickler import plain
from zinspect.core.layouts.pickled import group_columns, keys_of, values_of
from zinspect.core.torchpickle import FastMetaUnpickler, MetaUnpickler
from zinspect.core.unpickle import (
    _ATOMS,
    DEFER_AT_LEAST,
    DeferredPairs,
    PairsRun,
    PickledDict,
    PickledOrderedDict,
    check_tree,
)

N = DEFER_AT_LEAST + 6
NAMES = [f"model.layers.{i}.weight" for i in range(N)]
SHAPES = [(i % 7 + 1, 3) for i in range(N)]


def _deferred(prefix=(("embed", (4, 4)),), names=NAMES, values=SHAPES, kind=PickledOrderedDict):
    """A dict given `prefix`'s items, then a PairsRun of `names` and `values` (as the C
    unpickler sets one: under the key '')."""
    d = kind()
    for k, v in prefix:
        d[k] = v
    d[""] = PairsRun(list(names), list(values))
    return d


def _inserted(prefix=(("embed", (4, 4)),), names=NAMES, values=SHAPES) -> OrderedDict:
    return OrderedDict([*prefix, *zip(names, values, strict=True)])


def _same_dict(d, want: OrderedDict) -> None:
    """`d` is a PickledOrderedDict (no longer deferred) holding `want`'s items in its order
    (the OrderedDict's: a use that moves a key changes only that one)."""
    items = list(d.items())
    assert type(d) is PickledOrderedDict and not hasattr(d, "_deferred")
    assert items == list(want.items()) and len(dict.keys(d)) == len(want)


def test_a_long_run_of_distinct_new_keys_is_deferred_and_its_lists_read_without_inserting():
    d = _deferred()
    assert type(d) is DeferredPairs and dict.__len__(d) == 1  # only the prefix is in the dict
    assert len(d) == N + 1 and bool(d)
    assert keys_of(d) == ["embed", *NAMES] and values_of(d) == [(4, 4), *SHAPES]
    assert d.keys_list() == ["embed", *NAMES] and d.values_list() == [(4, 4), *SHAPES]
    names, shapes = group_columns(d)
    assert names == ["embed", *NAMES] and shapes == [(4, 4), *SHAPES]
    assert vars(d) == {}  # the lists are in a slot, not an attribute a BUILD or `vars` sees
    assert type(d) is DeferredPairs  # none of the above inserted the pairs


# each way of using a dict, as (name, call on the dict): the result and the dict after it must
# be those of the same call on the OrderedDict with the pairs inserted
USES = {
    "getitem": lambda d: d[NAMES[5]],
    "get": lambda d: d.get(NAMES[-1]),
    "get missing": lambda d: d.get("nope", "dflt"),
    "contains": lambda d: NAMES[3] in d,
    "not contains": lambda d: "nope" in d,
    "iter": lambda d: list(iter(d)),
    "reversed": lambda d: list(reversed(d)),
    "keys": lambda d: list(d.keys()),
    "values": lambda d: list(d.values()),
    "items": lambda d: list(d.items()),
    "eq": lambda d: d == _inserted(),
    "ne": lambda d: d != _inserted(),
    "repr": lambda d: repr(d).removeprefix(type(d).__name__),
    "str": lambda d: str(d).removeprefix(type(d).__name__),
    "or": lambda d: list((d | {"x": 1}).items()),
    "ror": lambda d: list(({"x": 1} | d).items()),
    "ior": lambda d: d.__ior__({"x": 1}) is d,
    "pop": lambda d: d.pop(NAMES[2]),
    "popitem": lambda d: d.popitem(),
    "popitem first": lambda d: d.popitem(last=False),
    "setdefault": lambda d: d.setdefault(NAMES[1], 0),
    "update": lambda d: d.update({NAMES[0]: (9,), "new": (1,)}),
    "setitem existing": lambda d: d.__setitem__(NAMES[4], (2, 2)),
    "setitem new": lambda d: d.__setitem__("new", (2, 2)),
    "delitem": lambda d: d.__delitem__(NAMES[6]),
    "clear": lambda d: d.clear(),
    "copy": lambda d: list(d.copy().items()),
    "move_to_end": lambda d: d.move_to_end(NAMES[0]),
    "move_to_start": lambda d: d.move_to_end(NAMES[-1], last=False),
    "dict()": lambda d: list(dict(d).items()),
    "** unpacking": lambda d: list({**d}.items()),
    "sorted": lambda d: sorted(d)[:3],
    "json": lambda d: json.dumps(d),
    "pickle": lambda d: list(pickle.loads(pickle.dumps(d)).items()),
    "deepcopy": lambda d: list(copy.deepcopy(d).items()),
    "reduce": lambda d: (lambda r: (r[0], r[1], r[2], list(r[4])))(d.__reduce__()),
}


@pytest.mark.parametrize("use", USES)
def test_every_other_use_inserts_the_pairs_first_and_gives_what_the_inserted_dict_gives(use):
    d, want = _deferred(), PickledOrderedDict(_inserted())
    assert USES[use](d) == USES[use](want)
    _same_dict(d, want)


def test_sets_before_any_read_are_appended_and_a_set_after_one_inserts_the_pairs_first():
    d = _deferred()
    d["after"] = (5,)  # (the unpickler's: an entry after the run)
    more = [f"more.{i}" for i in range(N)]
    d[""] = PairsRun(list(more), [(1,)] * N)  # a later run
    d[""] = PairsRun(["z1"], [(2,)])  # a short one
    assert type(d) is DeferredPairs and dict.__len__(d) == 1  # only the prefix is in the dict
    want = OrderedDict([*_inserted().items(), ("after", (5,)),
                        *zip(more, [(1,)] * N, strict=True), ("z1", (2,))])
    assert len(d) == len(want) and keys_of(d) == list(want) and values_of(d) == [*want.values()]
    d[NAMES[0]] = (6,)  # after a read: inserted first, then set (the key keeps its place)
    want[NAMES[0]] = (6,)
    assert type(d) is PickledOrderedDict and len(d) == len(want) and keys_of(d) == list(want)
    _same_dict(d, want)


def test_a_run_set_twice_is_refused():
    run, d = PairsRun(list(NAMES), list(SHAPES)), _deferred()
    d["x"] = run
    with pytest.raises(pickle.UnpicklingError, match="set twice"):
        d["y"] = run


@pytest.mark.parametrize("case", ["a name twice", "a name already set", "a set name twice",
                                  "a set name already set", "short run", "a plain dict"])
def test_pairs_that_would_change_the_dicts_meaning_are_inserted_as_set(case):
    names, prefix, kind, after = list(NAMES), (("embed", (4, 4)),), PickledOrderedDict, []
    if case == "a name twice":
        names[-1] = names[0]  # the later value wins, at the first place: as inserting does
    elif case == "a name already set":
        prefix = ((names[7], (1, 1)),)
    elif case == "a set name twice":
        after = [("x", (1,)), ("x", (2,))]
    elif case == "a set name already set":
        after = [(names[9], (3,))]
    elif case == "short run":
        names = names[:DEFER_AT_LEAST - 1]
    else:
        kind = PickledDict
    values = SHAPES[:len(names)]
    d = _deferred(prefix, names, values, kind)
    for k, v in after:
        d[k] = v
    want = OrderedDict(prefix)
    for n, v in [*zip(names, values, strict=True), *after]:
        want[n] = v
    deferred = kind is PickledOrderedDict and len(names) >= DEFER_AT_LEAST
    assert type(d) is (DeferredPairs if deferred else kind)
    assert len(d) == len(want)  # (the first read: the keys are checked, the pairs inserted)
    assert type(d) is kind and list(dict.items(d)) == list(want.items())


def _nodes(obj) -> int:
    """The fewest nodes `check_tree` lets `obj` have (found by bisection)."""
    low, high = 1, 1 << 20
    while low < high:
        mid = (low + high) // 2
        try:
            check_tree(obj, mid)
            high = mid
        except pickle.UnpicklingError:
            low = mid + 1
    return low


def test_the_tree_check_counts_a_deferred_dict_as_the_inserted_one_and_plain_leaves_it():
    want = _nodes({"g": PickledOrderedDict(_inserted())})
    assert want > 4 * N  # every key, value and int counted
    d = _deferred()
    assert _nodes({"g": d}) == want
    settled: set = set()
    check_tree({"g": d}, want, settled=settled)
    assert id(d) in settled and plain({"g": d}, _ATOMS, settled)["g"] is d
    assert type(d) is DeferredPairs


def test_attributes_a_build_gives_are_walked_and_kept_on_a_deferred_dict():
    d, inserted = _deferred(), PickledOrderedDict(_inserted())
    for x in (d, inserted):
        x._metadata = OrderedDict([("", {"version": 1})])  # what a BUILD does
    assert vars(d) == {"_metadata": OrderedDict([("", {"version": 1})])}
    assert _nodes(d) == _nodes(inserted) > _nodes(PickledOrderedDict(_inserted()))
    assert type(d) is DeferredPairs
    copied = pickle.loads(pickle.dumps(d))
    assert copied._metadata == d._metadata and list(copied.items()) == list(_inserted().items())


def test_threads_racing_to_use_a_deferred_dict_see_one_whole_dict_inserted_once():
    for _ in range(20):
        d, results, start = _deferred(), [], threading.Barrier(6)
        uses = [len, keys_of, values_of, list, lambda x: x[NAMES[-1]], lambda x: list(x.items())]

        def run(use, d=d, results=results, start=start):
            start.wait()
            results.append((use, use(d)))
        threads = [threading.Thread(target=run, args=(u,)) for u in uses]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        want = _inserted()
        got = dict(results)
        assert got[len] == len(want) and got[keys_of] == list(want) == got[list]
        assert got[values_of] == list(want.values()) and got[uses[4]] == SHAPES[-1]
        assert got[uses[5]] == list(want.items())
        _same_dict(d, want)


def test_the_values_are_the_very_objects_set():
    values = [object() for _ in NAMES]
    d = _deferred((), NAMES, values)
    assert all(map(operator.is_, values_of(d), values))
    d.insert_deferred()
    assert all(map(operator.is_, dict.values(d), values))


def _build(state: bytes) -> bytes:
    """OrderedDict(), then BUILD `state` (pickle opcodes pushing it)."""
    return b"\x80\x02ccollections\nOrderedDict\n)R" + state + b"b."


def _text(s: str) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s.encode()


#: BUILD states a pickle could give an OrderedDict to make it answer for itself: a method, a
#: slot, its class (the C and the Python BUILD set a dict state into `__dict__`, which a
#: method's name there shadows, and a slot state with setattr)
SHADOWS = {
    f"{how} {name}": (b"N}" if how == "slot" else b"}") + _text(name) + value + b"s" +
    (b"\x86" if how == "slot" else b"")
    for how in ("dict", "slot")
    for name, value in (("_deferred", b"K\x01"), ("insert_deferred", b"cbuiltins\nset\n"),
                        ("keys_list", b"ccollections\nOrderedDict\n"),
                        ("_lists", b"ccollections\nOrderedDict\n"),
                        ("items", b"ccollections\nOrderedDict\n"), ("get", b"cbuiltins\nset\n"),
                        ("__class__", b"ccollections\nOrderedDict\n"))}


@pytest.mark.parametrize("reader", [FastMetaUnpickler, MetaUnpickler])
@pytest.mark.parametrize("shadow", SHADOWS)
def test_a_build_may_not_name_an_attribute_as_a_method_or_slot(reader, shadow):
    """Found by review: a BUILD setting `insert_deferred` or `_lists` on the module made
    validate pass on a module of 31 of 29,703 names (and let a memo bomb past the tree check),
    `__class__` dropped the deferred pairs; `items` did the same on the code before them."""
    with pytest.raises(pickle.UnpicklingError, match="named as one of its methods or slots"):
        reader(io.BytesIO(_build(SHADOWS[shadow])), budget_bytes=64).load()


@pytest.mark.parametrize("reader", [FastMetaUnpickler, MetaUnpickler])
def test_a_build_still_gives_an_ordered_dict_its_metadata(reader):
    for state in (b"}" + _text("_metadata") + b"K\x01s", b"N}" + _text("_metadata") + b"K\x01s\x86"):
        d = reader(io.BytesIO(_build(state)), budget_bytes=64).load()
        assert type(d) is PickledOrderedDict and vars(d) == {"_metadata": 1}
    with pytest.raises(pickle.UnpicklingError, match="not a dict"):
        reader(io.BytesIO(_build(b"]")), budget_bytes=64).load()


def test_a_deferred_dict_compares_as_its_inserted_self_on_either_side():
    a, b, want = _deferred(), _deferred(), PickledOrderedDict(_inserted())
    assert a == b and b == a and not a != b
    c, d = _deferred(), _deferred()
    assert want == c and c == want and dict(want) == d and OrderedDict(want) == _deferred()
    e = _deferred()
    e.update(_deferred())
    _same_dict(e, want)
