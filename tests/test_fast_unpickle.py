"""The unpickler's fast path (zinspect.core.fastpickle.prepare_for_c + the C unpickler): it takes
every real fixture pickle and builds exactly what the bounded reader builds; a forged pickle is
either declined by the scan or stopped inside the C unpickler by the same checks, and then
`_load_pickle` gives the bounded reader's verdict, word for word. The hostile cases run in a
subprocess under an address-space limit, so a crash or a huge allocation fails the test rather
than the test run."""

from __future__ import annotations

import io
import pickle
import resource
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict

import pytest
from conftest import FIXTURES, REPO

from zinspect.core import torchzip
from zinspect.core.fastpickle import PiecesReader, _opcode_runs, prepare_for_c
from zinspect.core.torchzip import FastMetaUnpickler, MetaUnpickler, Opaque, StorageRef, TensorRef
from zinspect.core.unpickle import PickledOrderedDict
from zinspect.errors import UnreadableFile

pytestmark = pytest.mark.skipif(_opcode_runs(16) is None,
                                reason="the fast path needs Python 3.11 (possessive repeats)")


def fixture_pickles() -> list[tuple[str, bytes]]:
    out = []
    for path in sorted(FIXTURES.rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as zf:
                name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
                out.append((str(path.relative_to(FIXTURES)), zf.read(name)))
        except (zipfile.BadZipFile, StopIteration):
            continue  # legacy or damaged on purpose: read by the bounded reader only
    return out


PICKLES = fixture_pickles()


def same(a, b, seen=None) -> bool:
    """a and b are the same object graph: same types, values, order and sharing."""
    seen = {} if seen is None else seen
    if type(a) is not type(b) and not (isinstance(a, Opaque) and isinstance(b, Opaque)):
        return False  # (each reader makes its own inert classes)
    if id(a) in seen:
        return seen[id(a)] is b
    seen[id(a)] = b
    if isinstance(a, dict):  # (and the attributes a BUILD gave an OrderedDict: `_metadata`)
        return list(a) == list(b) and all(same(a[k], b[k], seen) for k in a) and \
            same(getattr(a, "__dict__", None), getattr(b, "__dict__", None), seen)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, seen) for x, y in zip(a, b, strict=True))
    if isinstance(a, TensorRef):
        return (a.storage, a.offset, a.shape, a.stride, a.dtype, a.requires_grad) == \
            (b.storage, b.offset, b.shape, b.stride, b.dtype, b.requires_grad)
    if isinstance(a, Opaque):
        return a.qualname == b.qualname and same(a.args, b.args, seen) and \
            same(a.state, b.state, seen)
    return a == b


def both(raw: bytes):
    fast = FastMetaUnpickler(io.BufferedReader(PiecesReader(prepare_for_c(raw))),
                             budget_bytes=len(raw))
    slow = MetaUnpickler(io.BytesIO(raw), budget_bytes=len(raw))
    return (fast.load(), fast), (slow.load(), slow)


def test_the_fixtures_hold_many_pickles():
    assert len(PICKLES) > 300  # plain ZeRO, parallel layouts, HF/PEFT runs


@pytest.mark.parametrize("name,raw", PICKLES, ids=[n for n, _ in PICKLES])
def test_every_real_pickle_takes_the_fast_path_with_the_same_result(name, raw):
    assert prepare_for_c(raw) is not None, name
    (a, fast), (b, slow) = both(raw)
    assert same(a, b), name
    assert fast.storages == slow.storages and fast.unknown_globals == slow.unknown_globals


def test_results_hold_plain_dicts_and_ordered_dicts_that_pickle_as_such():
    """The fast path's checking dict is never in a result; OrderedDicts (one per tensor of a
    300k-name file: too many to copy) are PickledOrderedDict and pickle as OrderedDict."""
    raw = next(r for n, r in PICKLES if n.startswith("s3_w4_bf16/") and
               n.endswith("zero_pp_rank_0_mp_rank_00_model_states.pt"))
    (obj, _), _ = both(raw)
    types, stack = set(), [obj]
    while stack:
        x = stack.pop()
        types.add(type(x))
        if isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple)):
            stack += x
    assert dict in types and PickledOrderedDict in types
    assert not [t for t in types if issubclass(t, dict) and t not in (dict, PickledOrderedDict)]
    od = obj["module"]
    assert type(od) is PickledOrderedDict
    mine, real = PickledOrderedDict(a=1, b=(2, "c")), OrderedDict(a=1, b=(2, "c"))
    assert pickle.dumps(mine, 2) == pickle.dumps(real, 2)  # the C pickler
    assert pickle._dumps(mine, 2) == pickle._dumps(real, 2)  # the one core/torchsave.py extends


# ----------------------------------------------------------------------------- forged pickles
BASE = next(r for n, r in PICKLES if n.startswith("s2_w4_fp16/") and "model_states" in n)


def _key(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _bomb(levels: int) -> bytes:
    """A tuple of 2**levels leaves from PUT/GET alone (no DUP): t = (t, t), memoized."""
    out = b"Nq\x000"
    for i in range(levels):
        out += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    return out[:-1]  # the last tuple stays on the stack


def forged(entry: bytes) -> bytes:
    """The real pickle's top dict with one more item (`entry` leaves a key and a value)."""
    return BASE[:-1] + entry + b"s."


#: (what, pickle, the scan takes it to the C unpickler)
FORGED = {
    "deep tuple key": (forged(b"N" + b"\x85" * 200_000 + b"N"), True),
    "memo bomb key (PUT/GET)": (forged(_bomb(80) + b"N"), True),
    "memo bomb value (PUT/GET)": (forged(_key("bomb") + _bomb(80)), True),
    "memo bomb (DUP)": (forged(_key("bomb") + b"N" + b"2\x86" * 60), False),
    "huge memo index": (forged(_key("memo") + b"N" + b"r\xfe\xff\xff\xff"), False),
    "giant string": (forged(_key("s") + _key("x" * (3 << 20))), False),
    "deep nesting": (forged(_key("deep") + b"(" * 5000 + b"N" + b"t" * 5000), True),
    "forged dict marker": (forged(_key("m") + b"c\x00zinspect\n\x00dict\n)R"), False),
    "SETITEMS on a list": (forged(_key("l") + b"]K\x01(K\x00K\x02u"), True),
    "NEWOBJ of OrderedDict": (forged(_key("o") + b"ccollections\nOrderedDict\n)\x81"), True),
    "torch.device memo bomb": (forged(_key("d") + b"ctorch\ndevice\n" + _bomb(80) + b"\x85R"),
                               True),
}

def _again(call: bytes, times: int = 20_000, item: bytes = b"N") -> bytes:
    """`{"again": L}` for a 100k-item list L, and on the way `times` calls `call` (the callable
    is memo 1, L memo 0), each result dropped: 1 MB of pickle asking for 2e9 item copies."""
    return _key("again") + b"]q\x00(" + item * 100_000 + b"e" + call * times


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode() + b"q\x010"  # memo 1, off the stack


#: amplification through calls: each must be refused by the work budget (on both paths)
AMPLIFIED = {
    "set(L) again and again": forged(_again(b"h\x01h\x00\x85R0", 20_000).replace(
        b"e", b"e" + _global("__builtin__", "set"), 1)),
    "OrderedDict(L) again and again": forged(_again(b"h\x01h\x00\x85R0", item=b"K\x01N\x86").replace(
        b"e", b"e" + _global("collections", "OrderedDict"), 1)),
    "an inert class called with *L": forged(_again(b"h\x01(h\x02Nh\x00Nt" b"R0").replace(
        b"e", b"e" + _global("torch._tensor", "_rebuild_from_type_v2") +
        b"cos\nsystem\nq\x020", 1)),
    "torch.Size(L) kept on the stack": forged(_key("s") + b"]q\x00(" + b"K\x01" * 100_000 +
                                              b"ectorch\nSize\nq\x01" +
                                              b"h\x01h\x00\x85R" * 20_000 + b"0" * 20_001),
}


@pytest.mark.parametrize("what", list(AMPLIFIED))
def test_calls_cannot_amplify_the_work(what):
    """Without the work budget each of these takes minutes (or gigabytes) from 1 MB."""
    raw = AMPLIFIED[what]
    fast, slow = outcome(raw, "fast"), outcome(raw, "slow")
    assert fast == slow and fast.startswith("unreadable"), (fast, slow)


_RUN = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from zinspect.core import fastpickle, torchzip
    from zinspect.errors import UnreadableFile
    raw = sys.stdin.buffer.read()
    if sys.argv[1] == "slow":
        fastpickle.prepare_for_c = lambda raw: None
        torchzip.prepare_for_c = fastpickle.prepare_for_c
    else:  # every size offered to the fast path
        torchzip.FAST_PICKLE_BYTES = 0
    try:
        obj, up = torchzip._load_pickle(raw, "f.pt")
        print("ok", sorted(up.storages), repr(obj.get("o", obj.get("l", obj.get("d")))))
    except UnreadableFile as e:
        print("unreadable", e.message)
""")


def outcome(raw: bytes, path: str) -> str:
    r = subprocess.run([sys.executable, "-c", _RUN, path], input=raw, capture_output=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return r.stdout.decode()


@pytest.mark.parametrize("what", list(FORGED))
def test_a_forged_pickle_gets_the_bounded_readers_verdict(what):
    raw, reaches_c = FORGED[what]
    assert (prepare_for_c(raw) is not None) == reaches_c
    assert outcome(raw, "fast") == outcome(raw, "slow")


def test_the_c_unpickler_is_stopped_by_the_key_check():
    """The deep key and the PUT/GET bomb key pass the scan: the checking dict refuses them
    before the C unpickler hashes them (unchecked, one crashes and the other never ends)."""
    for what in ("deep tuple key", "memo bomb key (PUT/GET)"):
        code = textwrap.dedent("""
            import io, resource, sys
            resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
            from zinspect.core.torchzip import FastMetaUnpickler
            from zinspect.core.fastpickle import PiecesReader, prepare_for_c
            from zinspect.core.unpickle import PickleBudgetExceeded
            raw = sys.stdin.buffer.read()
            try:
                FastMetaUnpickler(io.BufferedReader(PiecesReader(prepare_for_c(raw))),
                                  budget_bytes=len(raw)).load()
            except PickleBudgetExceeded as e:
                print(e)
        """)
        r = subprocess.run([sys.executable, "-c", code], input=FORGED[what][0],
                           capture_output=True, cwd=REPO, timeout=120)
        assert r.returncode == 0, (what, r.stderr.decode()[-2000:])
        assert "a dict key or set member" in r.stdout.decode(), what


def test_forged_pickles_are_live():
    """Positive control: unchecked, the C unpickler hangs hashing the PUT/GET bomb key."""
    code = ("import pickle, sys\n"
            "pickle.loads(b'\\x80\\x02}' + sys.stdin.buffer.read() + b's.')\n")
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", code], input=_bomb(80) + b"N",
                       capture_output=True, timeout=5)


def test_declined_on_doubt_never_wrong(tmp_path):
    """A pickle the fast path cannot prove safe is still read, by the bounded reader."""
    raw = forged(_key("memo") + b"N" + b"r\xfe\xff\xff\xff")
    assert prepare_for_c(raw) is None
    obj, up = torchzip._load_pickle(raw, "f.pt")
    assert isinstance(up, MetaUnpickler) and obj["memo"] is None
    with pytest.raises(UnreadableFile, match="parsing budget: a string of"):
        torchzip._load_pickle(FORGED["giant string"][0], "f.pt")
    assert isinstance(obj["module"], dict)
    assert all(isinstance(s, StorageRef) for s in up.storages.values())


def test_the_fast_path_keeps_memory_bounded(tmp_path):
    """A real pickle grown past FAST_PICKLE_BYTES (smaller ones go to the bounded reader, which
    is faster on them than compiling the scan) parsed in a process limited to 256 MB of address
    space, by the C unpickler."""
    big = forged(_key("pad") + b"](" + _key("x" * 1000) * 300 + b"e")
    assert len(big) > torchzip.FAST_PICKLE_BYTES > len(BASE)
    code = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20))
        from zinspect.core import torchzip
        raw, cut = sys.stdin.buffer.read(), int(sys.argv[1])
        print(type(torchzip._load_pickle(raw[:cut], "f.pt")[1]).__name__,
              type(torchzip._load_pickle(raw[cut:], "f.pt")[1]).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(len(big))], input=big + BASE,
                       capture_output=True, cwd=REPO,
                       timeout=120, preexec_fn=lambda: resource.setrlimit(
                           resource.RLIMIT_CPU, (60, 60)))
    assert r.stdout.decode().split() == ["FastMetaUnpickler", "MetaUnpickler"], \
        r.stderr.decode()[-2000:]


def _tensor_record(puts: list[int]) -> bytes:
    """The opcodes of one tensor as torch pickles it once its globals are in the memo (the
    scan matches them as two runs), with LONG_BINPUT indices `puts` (7)."""
    p = [b"r" + struct.pack("<I", i) for i in puts]
    return (b"h\x05((h\x06h\x07" + _key("0") + p[0] + b"h\x09K\x00t" + p[1] + b"QK\x00K\x00\x85" +
            p[2] + b"K\x01\x85" + p[3] + b"\x89h\x02)R" + p[4] + b"t" + p[5] + b"R" + p[6])


def test_the_scan_bounds_every_memo_index_of_a_tensor_record():
    """The scan's run for a whole tensor record bounds its LONG_BINPUT indices as the single
    token does: any one of them forged past the bound declines the pickle."""
    good = list(range(1000, 1007))
    assert prepare_for_c(b"\x80\x02N" + _tensor_record(good) * 3 + b"0.") is not None
    for i in range(7):
        bad = good[:i] + [0xFFFFFFFE] + good[i + 1:]
        raw = b"\x80\x02N" + _tensor_record(good) + _tensor_record(bad) + b"0."
        assert prepare_for_c(raw) is None, i


def test_the_readers_let_go_of_their_memo_once_loaded():
    """The memo holds every intermediate object of the pickle (argument tuples, storage ids, a
    hooks dict per tensor: 100 MB at 297k names); a reader kept for its storages afterwards
    (torchzip) must not keep them alive. Same result, on both paths."""
    raw = next(r for n, r in PICKLES if "model_states" in n)
    (a, fast), (b, slow) = both(raw)
    assert same(a, b)
    assert fast.memo.copy() == {} and slow.memo == {}


def test_an_empty_1d_tensor_passes_only_the_rules_of_any_other():
    """The shortcut for the empty 1-D tensor (a ZeRO-3 placeholder) takes only what `_window`
    takes: shape (0,) and stride (1,) of ints, an int offset >= 0; a lookalike (0.0, False,
    True, a negative offset) gets the general check and its message."""
    from zinspect.core.torchpickle import _rebuild_tensor_v2
    st = StorageRef("0", "float32", 0)
    t = _rebuild_tensor_v2(st, 0, (0,), (1,))
    assert (t.storage, t.offset, t.shape, t.stride, t.dtype) == (st, 0, (0,), (1,), "float32")
    u = _rebuild_tensor_v2(st, 0, tuple([0]), tuple([1]))  # (300k placeholders: one shape)
    assert u.shape is t.shape and u.stride is t.stride
    for offset, size, stride in ((0, (0.0,), (1,)), (0, (False,), (1,)), (0, (0,), (True,)),
                                 (0, (0,), (1.0,)), (-1, (0,), (1,)), (True, (0,), (1,))):
        with pytest.raises(pickle.UnpicklingError, match="malformed offset, shape or stride"):
            _rebuild_tensor_v2(st, offset, size, stride)


_PID = _key("storage") + b"ctorch\nFloatStorage\n" + _key("0") + _key("cpu") + b"K\x00"


def _one_tensor(offset: bytes, size: bytes, stride: bytes, pid: bytes = _PID) -> bytes:
    """A pickle {"t": tensor} whose tensor has the given offset, size and stride opcodes and
    the fields of its storage's persistent id."""
    return (b"\x80\x02}(" + _key("t") + b"ctorch._utils\n_rebuild_tensor_v2\n((" + pid +
            b"tQ" + offset + size + stride + b"\x89ccollections\nOrderedDict\n)RtRu.")


@pytest.mark.parametrize("what,parts", [
    ("placeholder", (b"K\x00", b"K\x00\x85", b"K\x01\x85")),
    ("float dim", (b"K\x00", b"G" + struct.pack(">d", 0.0) + b"\x85", b"K\x01\x85")),
    ("bool stride", (b"K\x00", b"K\x00\x85", b"\x88\x85")),
    ("negative offset", (b"J\xff\xff\xff\xff", b"K\x00\x85", b"K\x01\x85")),
])
def test_empty_tensors_get_the_same_verdict_on_both_paths(what, parts):
    raw = _one_tensor(*parts)
    assert prepare_for_c(raw) is not None
    fast, slow = outcome(raw, "fast"), outcome(raw, "slow")
    assert fast == slow, (fast, slow)
    assert fast.startswith("ok") == (what == "placeholder"), fast


@pytest.mark.parametrize("what,pid,ok", [
    ("as torch writes it", _PID, True),
    ("an int key", _key("storage") + b"ctorch\nFloatStorage\nK\x00" + _key("cpu") + b"K\x00",
     True),
    ("a bool count", _PID[:-2] + b"\x88", False),
    ("a negative count", _PID[:-2] + b"J\xff\xff\xff\xff", False),
    ("a long location", _PID.replace(_key("cpu"), _key("c" * 65)), False),
    ("another kind", _key("Storage") + _PID[len(_key("storage")):], False),
    ("a dtype for a storage class", _PID.replace(b"FloatStorage", b"float32"), False),
])
def test_storage_ids_get_the_same_verdict_on_both_paths(what, pid, ok):
    """persistent_load's field-by-field check takes what the long way takes, nothing else."""
    raw = _one_tensor(b"K\x00", b"K\x00\x85", b"K\x01\x85", pid)
    assert prepare_for_c(raw) is not None
    fast, slow = outcome(raw, "fast"), outcome(raw, "slow")
    assert fast == slow and fast.startswith("ok") == ok, (fast, slow)


def test_gc_paused_leaves_what_is_frozen_frozen():
    """The app freezes a loaded checkpoint out of the collector; a pickle read afterwards (the
    optimizer view, a compare) must not give it back (gc.unfreeze), or full collections walk it
    again and pause the UI. With nothing frozen, what was built while paused is not left frozen."""
    import gc

    from zinspect.core.gcpause import gc_paused

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with gc_paused():
            made = [[i] for i in range(100)]
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
    with gc_paused():
        made = [[i] for i in range(100)]
    assert gc.get_freeze_count() == 0 and gc.isenabled() and made
