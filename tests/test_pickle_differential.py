"""Differential tests of the two readers: the fast path (fastpickle's scan + the C unpickler) and
the bounded reader build the same objects on every fixture pickle and on forged variants, down
to which tensors share a StorageRef and which dicts are plain dicts; where the fast path cannot,
it declines and the bounded reader's verdict is the answer. Also the shortcuts they rely on:
persistent_load's field-by-field check (zip pickles only), and `plain` skipping what
`check_tree` settled (and not running at all on the bounded reader, which builds no
PickledDict)."""

from __future__ import annotations

import io
import pickle

import pytest
from test_fast_unpickle import PICKLES, _bomb, _key, _one_tensor, both, forged, outcome, same

from zinspect.core.bounded_unpickler import plain
from zinspect.core.fastpickle import PiecesReader, _opcode_runs, prepare_for_c
from zinspect.core.torchzip import FastMetaUnpickler, MetaUnpickler, Opaque, TensorRef
from zinspect.core.unpickle import PickledDict, check_tree

pytestmark = pytest.mark.skipif(_opcode_runs(16) is None,
                                reason="the fast path needs Python 3.11 (possessive repeats)")


def walk(obj) -> list:
    """Every object reachable from `obj` (dict keys and values, sequences, inert records' args
    and state), each once, in a fixed order."""
    seen, out, stack = set(), [], [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        if isinstance(x, dict):
            stack += [*x.keys(), *x.values(), *vars(x).values()] if hasattr(x, "__dict__") \
                else [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack += list(x)
        elif isinstance(x, Opaque):
            stack += [x.args, x.state]
    return out


def sharing(obj, up) -> list[int]:
    """For each tensor of `obj` in walk order, the index of the first tensor with the same
    StorageRef object; and every tensor's StorageRef is the reader's one for its key."""
    tensors = [x for x in walk(obj) if type(x) is TensorRef]
    assert all(t.storage is up.storages[t.storage.key] for t in tensors)
    first: dict[int, int] = {}
    return [first.setdefault(id(t.storage), i) for i, t in enumerate(tensors)]


def test_every_fixture_pickle_gives_the_same_objects_and_sharing_on_both_paths():
    tensors = shared = 0
    for name, raw in PICKLES:
        (a, fast), (b, slow) = both(raw)
        assert same(a, b), name
        assert sharing(a, fast) == sharing(b, slow), name
        assert not [x for x in walk(a) + walk(b) if type(x) is PickledDict], name
        assert list(fast.storages.items()) == list(slow.storages.items()), name
        share = sharing(a, fast)
        tensors, shared = tensors + len(share), shared + sum(i != j for j, i in enumerate(share))
    assert tensors > 5000 and shared > 0, (tensors, shared)


def _tensor(pid: bytes, pid_as: bytes = b"t") -> bytes:
    """A tensor of 4 elements whose storage id has the fields `pid` (a tuple, or what `pid_as`
    makes of them)."""
    return (b"ctorch._utils\n_rebuild_tensor_v2\n((" + pid + pid_as + b"QK\x00K\x04\x85K\x01\x85"
            b"\x89ccollections\nOrderedDict\n)RtR")


def _pid(key: bytes, numel: bytes) -> bytes:
    return _key("storage") + b"ctorch\nFloatStorage\n" + key + _key("cpu") + numel


def _read_both(raw: bytes):
    """(fast result, fast reader) or None when the fast path declines; and the bounded one."""
    assert prepare_for_c(raw) is not None
    slow = MetaUnpickler(io.BytesIO(raw), budget_bytes=len(raw))
    b = slow.load()
    fast = FastMetaUnpickler(io.BufferedReader(PiecesReader(prepare_for_c(raw))),
                             budget_bytes=len(raw))
    return (fast.load(), fast), (b, slow)


def test_tensors_naming_one_storage_share_the_first_reference_on_both_paths():
    """torch writes a storage's fields again for each tensor viewing it; the first reference
    makes the StorageRef and later ones share it, even when their element count differs (the
    window of each tensor is checked against the first's)."""
    raw = (b"\x80\x02}(" + _key("a") + _tensor(_pid(_key("0"), b"K\x08")) +
           _key("b") + _tensor(_pid(_key("0"), b"K\x04")) +
           _key("c") + _tensor(_pid(b"K\x00", b"K\x04")) +  # an int key: str(0)
           _key("d") + _tensor(_pid(_key("1"), b"K\x04")) + b"u.")
    (a, fast), (b, slow) = _read_both(raw)
    assert same(a, b) and sharing(a, fast) == sharing(b, slow)
    for obj in (a, b):
        assert obj["a"].storage is obj["b"].storage is obj["c"].storage is not obj["d"].storage
    assert a["b"].storage.numel == 8 and list(fast.storages) == list(slow.storages) == ["0", "1"]


@pytest.mark.parametrize("what,pid", [
    ("a bytes kind", b"C\x07storage" + _pid(_key("0"), b"K\x04")[len(_key("storage")):]),
    ("a list", None),
    ("six fields", _pid(_key("0"), b"K\x04") + b"N"),
    ("a long key", _pid(_key("k" * 65), b"K\x04")),
    ("a count past 2**48", _pid(_key("0"), b"\x8a\x07" + (1 << 49).to_bytes(7, "little"))),
    ("a float count", _pid(_key("0"), b"G@\x10\x00\x00\x00\x00\x00\x00")),
    ("an int location", _pid(_key("0"), b"K\x04").replace(_key("cpu"), b"K\x00")),
])
def test_storage_ids_off_the_usual_form_get_the_bounded_readers_verdict(what, pid):
    """Anything persistent_load's shortcut does not take goes the long way, on both paths."""
    raw = b"\x80\x02}(" + _key("d") + (_tensor(_pid(_key("0"), b"K\x04"), b"l") if pid is None
                                         else _tensor(pid)) + b"u."
    fast, slow = outcome(raw, "fast"), outcome(raw, "slow")
    assert fast == slow, (fast, slow)
    assert fast.startswith("ok") == (what == "a bytes kind"), fast


def test_a_legacy_reader_takes_no_zip_storage_id():
    """Legacy storage ids have six fields: the five-field shortcut is for zip pickles only,
    on both readers."""
    raw = _one_tensor(b"K\x00", b"K\x00\x85", b"K\x01\x85")
    for reader in (FastMetaUnpickler(io.BufferedReader(PiecesReader(prepare_for_c(raw))),
                                     legacy=True, budget_bytes=len(raw)),
                   MetaUnpickler(io.BytesIO(raw), legacy=True, budget_bytes=len(raw))):
        with pytest.raises(pickle.UnpicklingError, match=r"malformed storage reference \(5"):
            reader.load()


_SHARED_DICT = b"}q\x10(" + _key("k") + b"K\x01u"


def test_dicts_anywhere_come_out_as_plain_dicts_on_both_paths():
    """The fast path's checking dicts inside tuples, lists, inert records, other dicts, beside
    300k-like runs of shapes that `plain` skips, and one dict reached twice: all plain dicts,
    shared where the pickle shares them, as the bounded reader builds them."""
    shapes = b"}(" + b"".join(_key(f"p{i}") + b"K@K@\x86" for i in range(50)) + b"u"
    raw = (b"\x80\x02}(" +
           _key("tuple") + b"(K\x01" + _SHARED_DICT + b"t" +
           _key("list") + b"](h\x10K\x02K\x03\x86e" +
           _key("inert") + b"cos\nsystem\n(h\x10tR" +
           _key("nested") + b"}(" + _key("in") + b"}(" + _key("deep") + b"]uu" +
           _key("shapes") + shapes +
           _key("ordered") + b"ccollections\nOrderedDict\n)R(" + _key("x") + b"h\x10u" +
           b"u.")
    (a, fast), (b, slow) = _read_both(raw)
    assert same(a, b)
    kinds = {type(x) for x in walk(a)}
    assert dict in kinds and PickledDict not in kinds
    assert a["tuple"][1] is a["list"][0] is a["inert"].args[0] is a["ordered"]["x"]
    assert type(a["nested"]["in"]) is dict and a["shapes"]["p3"] == (64, 64)


def _with_attributes(state: bytes) -> bytes:
    """The real pickle plus an OrderedDict whose BUILD gives it the attributes `state` (the
    opcodes of a dict's items), as torch gives a state_dict its `_metadata`."""
    return forged(_key("o") + b"ccollections\nOrderedDict\n)R}(" + state + b"ub")


def test_an_ordered_dicts_attributes_are_walked_like_its_items():
    """A state_dict's `_metadata` (an OrderedDict of dicts, set by BUILD) holds plain dicts on
    both paths, and a memo bomb or deep nesting there is refused as anywhere else."""
    raw = _with_attributes(_key("_metadata") + b"ccollections\nOrderedDict\n)R(" + _key("") +
                           b"}(" + _key("version") + b"K\x01uu")
    (a, fast), (b, slow) = _read_both(raw)
    assert same(a, b) and type(vars(a["o"])["_metadata"][""]) is dict
    for state, says in ((_key("_metadata") + _bomb(80), "(shared references repeated: a memo"),
                        (_key("deep") + b"(" * 300 + b"N" + b"t" * 300, "nests deeper than 100")):
        fast, slow = outcome(_with_attributes(state), "fast"), outcome(_with_attributes(state),
                                                                        "slow")
        assert fast == slow and fast.startswith("unreadable") and says in fast, (fast, slow)


def test_a_slice_holds_ints_and_none_only_on_both_paths():
    """The tree check does not walk into a slice: one of ints and None is read; one holding a
    dict (a PickledDict left in the fast path's result) or a memo bomb (repr'd forever) is
    refused, by both readers."""
    call = b"c__builtin__\nslice\n("
    raw = forged(_key("d") + call + b"K\x01NJ\xff\xff\xff\xfftR")
    (a, _), (b, _) = _read_both(raw)
    assert same(a, b) and a["d"] == slice(1, None, -1)
    for args in (b"}t", _bomb(80) + b"t", b"\x88t"):
        fast, slow = outcome(forged(_key("d") + call + args + b"R"), "fast"), \
            outcome(forged(_key("d") + call + args + b"R"), "slow")
        assert fast == slow and "a malformed slice" in fast, (fast, slow)


def test_check_tree_settles_the_containers_of_leaves_and_flat_tuples():
    flat, inner = {"x": (1, 2), "y": 3}, [1, "a"]
    mixed = {"z": inner, "w": (1, (2,))}
    settled: set[int] = set()
    check_tree({"f": flat, "m": mixed}, 1000, settled=settled)
    assert settled == {id(flat), id(inner), id(mixed["w"])}


def test_plain_skips_settled_containers_and_swaps_the_rest():
    """`plain` leaves a settled container's members alone (they are leaves or tuples of leaves:
    nothing to swap) and swaps every PickledDict elsewhere."""
    pd = PickledDict(a=1)
    obj = PickledDict(keep={"x": (1, 2)}, wrapped=(pd, [pd]))
    settled: set[int] = set()
    check_tree(obj, 1000, settled=settled)
    assert id(obj["keep"]) in settled and id(obj) not in settled
    out = plain(obj, settled=settled)
    assert type(out) is dict and type(out["wrapped"][0]) is dict
    assert out["wrapped"][0] is out["wrapped"][1][0] and out["keep"] is obj["keep"]
    assert out == {"keep": {"x": (1, 2)}, "wrapped": ({"a": 1}, [{"a": 1}])}


def test_the_bounded_reader_builds_no_pickled_dict_so_plain_does_not_run(monkeypatch):
    import zinspect.core.bounded_unpickler as bounded_unpickler

    assert not MetaUnpickler.builds_pickled_dicts and FastMetaUnpickler.builds_pickled_dicts
    raw = next(r for n, r in PICKLES if "model_states" in n)
    monkeypatch.setattr(bounded_unpickler, "plain",
                        lambda *a: pytest.fail("plain on the bounded path"))
    obj = MetaUnpickler(io.BytesIO(raw), budget_bytes=len(raw)).load()
    assert not [x for x in walk(obj) if type(x) is PickledDict]
