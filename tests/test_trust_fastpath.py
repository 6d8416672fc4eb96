"""Hostile inputs against the parse layer's fast paths (the review of the 297k-name speed work:
the scan's tensor runs, the empty 1-D tensor shortcut, storage ids checked field by field, the
OrderedDict() shortcut, the zip record checks). Each is run through the C unpickler's path and
the bounded pure-Python reader, in a fresh process under an address-space limit, and must get
the same exact verdict on both.

What the review found: BUILD (the opcode that sets the state of an object already on the stack)
could change objects the rules rely on, on both paths alike: a tensor already checked against its
storage (offset -16 passed `validate` and `merge` wrote other bytes), and the allowlist's shared
objects for every pickle read after it in the process (`torch.FloatStorage` read as int8, the
empty-tensor shortcut's `(0,)` made any shape). Now refused (unpickle.refuse_build).
"""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import damage as D
import pytest
from conftest import REPO

from zinspect.core.fastpickle import _opcode_runs, prepare_for_c

pytestmark = pytest.mark.skipif(_opcode_runs(16) is None,
                                reason="the fast path needs Python 3.11 (possessive repeats)")

MEMORY = 1 << 30


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _key(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


_PID = _key("storage") + b"ctorch\nFloatStorage\n" + _key("0") + _key("cpu") + b"K\x04"
_ENUM0 = b"cdeepspeed.runtime.zero.config\nZeroStageEnum\nK\x00\x85R"  # an int subclass, == 0


def _tensor(offset: bytes = b"K\x00", size: bytes = b"K\x04\x85", stride: bytes = b"K\x01\x85",
            pid: bytes = _PID, after: bytes = b"") -> bytes:
    """A pickle {"t": tensor}: the given offset, size, stride opcodes and persistent id fields;
    `after` runs on the tensor right after it is built."""
    return (b"\x80\x02}(" + _key("t") + b"ctorch._utils\n_rebuild_tensor_v2\n((" + pid +
            b"tQ" + offset + size + stride + b"\x89ccollections\nOrderedDict\n)RtR" + after +
            b"u.")


def _build(*items: bytes, slots: bool = True) -> bytes:
    """BUILD with the state (None, {items}) (set as attributes), or {items} (into __dict__)."""
    state = b"}(" + b"".join(items) + b"u"
    return (b"N" + state + b"\x86" if slots else state) + b"b"


_RUN = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from zinspect.core import fastpickle, torchzip
    from zinspect.errors import UnreadableFile
    if sys.argv[1] == "slow":
        fastpickle.prepare_for_c = lambda raw: None
        torchzip.prepare_for_c = fastpickle.prepare_for_c
    else:  # every size offered to the fast path
        torchzip.FAST_PICKLE_BYTES = 0
    for raw in sys.stdin.buffer.read().split(b"<next pickle>"):
        try:
            obj, up = torchzip._load_pickle(raw, "f.pt")
            print("ok", sorted(up.storages.values()), repr(obj)[:300])
        except UnreadableFile as e:
            print("unreadable", e.message)
""")


def outcomes(*raws: bytes) -> dict[str, list[str]]:
    """What each path makes of each pickle, read one after the other in one process."""
    out = {}
    for path in ("fast", "slow"):
        r = subprocess.run([sys.executable, "-c", _RUN, path], input=b"<next pickle>".join(raws),
                           capture_output=True, cwd=REPO, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        out[path] = r.stdout.decode().splitlines()
    return out


CLEAN = _tensor()
CLEAN_READ = ("ok [StorageRef(key='0', dtype='float32', numel=4, location='cpu')] {'t': "
              "TensorRef(storage=StorageRef(key='0', dtype='float32', numel=4, location='cpu'), "
              "offset=0, shape=(4,), stride=(1,), dtype='float32', requires_grad=False)}")
REFUSED = ("unreadable f.pt: its pickle is corrupt (UnpicklingError: the pickle changes an "
           "object it may not change (BUILD of an allowlisted object or a tensor))")

#: BUILDs of what the rules rely on: each refused on both paths, and a clean pickle read after
#: it in the same process reads as in a fresh one
BUILDS = {
    "a checked tensor's offset": _tensor(after=_build(_key("offset") + b"J\xf0\xff\xff\xff")),
    "a checked tensor's shape": _tensor(after=_build(_key("shape") + b"J\x00\xca\x9a\x3b\x85")),
    "a checked tensor's dtype": _tensor(after=_build(_key("dtype") + _key("nonsense"))),
    "torch.FloatStorage's dtype": b"\x80\x02ctorch\nFloatStorage\n]" + _key("int8") + b"ab0}.",
    "torch.float32's name": b"\x80\x02ctorch\nfloat32\n]" + _key("bool") + b"ab0}.",
    "the empty-tensor shortcut's shape": (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + _build(
            _key("__kwdefaults__") + b"}(" + _key("_int") + b"N" + _key("_mul") + b"N" +
            _key("_empty") + b"J\x00\x10\xa5\xd4\x85" + _key("_unit") + b"K\x01\x85u") +
        b"0}."),
    "the OrderedDict class": (b"\x80\x02ccollections\nOrderedDict\n" +
                              _build(_key("__init__") + b"N") + b"0}."),
    "the ZeroStageEnum class": (b"\x80\x02cdeepspeed.runtime.zero.config\nZeroStageEnum\n" +
                                _build(_key("names") + b"N") + b"0}."),
    "a ZeroStageEnum member": (b"\x80\x02" + _ENUM0 + _build(_key("names") + b"N") + b"0}."),
    "the checked set()": b"\x80\x02cbuiltins\nset\n" + _build(_key("__defaults__") + b"N") + b"0}.",
}


@pytest.mark.parametrize("what", list(BUILDS))
def test_a_build_changes_no_checked_tensor_and_no_allowlisted_object(what):
    raw = BUILDS[what]
    assert prepare_for_c(raw) is not None  # the C unpickler reads it: stopped by the rules
    assert outcomes(raw, CLEAN) == {"fast": [REFUSED, CLEAN_READ], "slow": [REFUSED, CLEAN_READ]}


def test_no_global_of_the_allowlist_takes_a_build():
    """Every object a pickle can name (what a new allowlist entry must not break): a BUILD of it
    is refused on both paths, and a clean pickle read after them all reads as in a fresh one."""
    from zinspect.core.torchpickle import _ALLOWED

    names = sorted(_ALLOWED)
    raws = [b"\x80\x02" + f"c{m}\n{n}\n".encode() + _build(_key("x") + b"N") + b"0}."
            for m, n in names]
    out = outcomes(*raws, CLEAN)
    assert out["fast"] == out["slow"]
    assert out["fast"][-1] == CLEAN_READ
    verdicts = dict(zip(names, out["fast"], strict=False))
    assert ("builtins", "slice") in verdicts  # (a checked function now, refused like the rest)
    assert set(verdicts.values()) == {REFUSED}, verdicts


def test_a_build_still_sets_an_ordered_dict_or_inert_record():
    """What real checkpoints BUILD (a state_dict's `_metadata`, a LossScaler's and a
    fragment_address's state) is still set, on both paths."""
    raw = (b"\x80\x02}(" + _key("o") + b"ccollections\nOrderedDict\n)R" +
           _build(_key("_metadata") + b"}", slots=False) + _key("s") +
           b"cdeepspeed.runtime.fp16.loss_scaler\nLossScaler\n)\x81" +
           _build(_key("cur_scale") + b"K\x02", slots=False) + b"u.")
    assert prepare_for_c(raw) is not None
    code = ("from zinspect.core.torchzip import _load_pickle, FAST_PICKLE_BYTES\n"
            "import sys, zinspect.core.torchzip as tz\n"
            "tz.FAST_PICKLE_BYTES = int(sys.argv[1])\n"
            "obj, up = _load_pickle(sys.stdin.buffer.read(), 'f.pt')\n"
            "print(type(up).__name__, obj['o']._metadata, obj['s'].state)\n")
    for limit, reader in (("0", "FastMetaUnpickler"), ("1000000", "MetaUnpickler")):
        r = subprocess.run([sys.executable, "-c", code, limit], input=raw, capture_output=True,
                           cwd=REPO, timeout=120)
        assert r.stdout.decode().split(None, 1) == [reader, "{} {'cur_scale': 2}\n"], r.stderr


# ------------------------------------------------ the same on a real checkpoint, as a user runs it
def _forged_fp32_offset(tmp: Path) -> Path:
    """Rank 1's fp32 partition (s2_w4_fp16) built with offset 0, then given offset -16 by a
    BUILD (the record before would be read as its first 16 elements)."""
    root = D.copy_root(tmp, "s2_w4_fp16")
    p = root / D.TAG / D.optim_name(1)
    raw = D.pickle_of(p)
    ops = D._ops(raw)
    key = D._fp32_and_moment(p)[0]
    i = next(k for k, (op, _, _) in enumerate(ops)
             if op.name == "BINPERSID" and any(a == key for _, a, _ in ops[k - 8:k]))
    reduce = [k for k in range(i, len(ops)) if ops[k][0].name == "REDUCE"][1]  # the tensor's
    at = ops[reduce + 1][2]
    D.rewrite_pickle(p, raw[:at] + _build(_key("offset") + b"J\xf0\xff\xff\xff") + raw[at:])
    return root


def _zinspect(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "zinspect", *map(str, args)], capture_output=True,
                       text=True, cwd=REPO, timeout=120, preexec_fn=_limits)
    assert r.returncode in (0, 1, 2), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-2000:]
    return r


def test_a_tensor_moved_by_a_build_is_an_unreadable_file_and_no_merge(tmp_path):
    root = _forged_fp32_offset(tmp_path)
    r = _zinspect("validate", root, "--json")
    findings = json.loads(r.stdout)["findings"]
    assert r.returncode == 1
    assert {f["code"] for f in findings if f["severity"] == "error"} == \
        {"unreadable-file", "param-coverage"}, findings
    bad = [f for f in findings if f["code"] == "unreadable-file"]
    assert [(f["file"], f["rank"]) for f in bad] == [(D.optim_name(1), 1)]
    assert "(BUILD of an allowlisted object or a tensor)" in bad[0]["message"]
    out = tmp_path / "merged"
    r = _zinspect("merge", root, out)
    assert r.returncode == 1 and "validation found" in r.stderr and not out.exists()


# ------------------------------------------------------------------------ the zip record checks
def _local(path: Path, leaf: str) -> tuple[zipfile.ZipInfo, int, int]:
    with zipfile.ZipFile(path) as zf:
        zi = next(z for z in zf.infolist() if z.filename.endswith(leaf))
    nlen, xlen = struct.unpack_from("<HH", path.read_bytes(), zi.header_offset + 26)
    return zi, nlen, xlen


def _relabel(path: Path, leaf: str, grow: int) -> zipfile.ZipInfo:
    """Record `leaf`'s local name made `grow` bytes longer (shorter if negative) and its extra
    field as much shorter: the data stays where it was, the name takes in the extra's bytes."""
    zi, nlen, xlen = _local(path, leaf)
    buf = bytearray(path.read_bytes())
    struct.pack_into("<HH", buf, zi.header_offset + 26, nlen + grow, xlen - grow)
    path.write_bytes(bytes(buf))
    return zi


def _grow_last_record(path: Path, by: int) -> zipfile.ZipInfo:
    """The record nearest the directory made `by` bytes longer in its directory entry."""
    with zipfile.ZipFile(path) as zf:
        zi = max(zf.infolist(), key=lambda z: z.header_offset)
    leaf = zi.filename.rsplit("/", 1)[-1]
    for at in (20, 24):
        D._patch_central(path, leaf, "<I", at, zi.file_size + by)
    return zi


def _read(path: Path) -> str:
    from zinspect.core.torchzip import read_torch_file
    from zinspect.errors import UnreadableFile

    try:
        read_torch_file(path)
        return "ok"
    except UnreadableFile as e:
        return e.message.split(": its zip structure is forged or damaged: ", 1)[-1]


def test_a_local_name_longer_than_the_directorys_is_refused(tmp_path):
    """The tensor record's local header names '<its name>FB\\x11\\x00' (its extra field's first
    bytes taken into the name): zipfile refuses that file; so does zinspect, wherever the
    record lies in the read window (the slice of the name used to be cut at the window's end,
    the name of the last record in it, so only a tensor record with data passed)."""
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    p = root / D.TAG / D.optim_name(1)
    flat = D._fp32_and_moment(p)[0]
    zi = _relabel(p, "/data/" + flat, 4)
    n = len(zi.filename)
    assert _read(p) == (f"record {zi.filename!r}: its local header at offset "
                        f"{zi.header_offset:,} names {zi.filename!r} ({n + 4} bytes long, the "
                        f"directory's {n})")
    with pytest.raises(zipfile.BadZipFile, match="differ"), zipfile.ZipFile(p) as zf:
        zf.read(zi.filename)


def test_a_local_name_shorter_than_the_directorys_is_refused(tmp_path):
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    p = root / D.TAG / D.optim_name(1)
    zi = _relabel(p, "/data/" + D._fp32_and_moment(p)[0], -1)
    n = len(zi.filename)
    assert _read(p) == (f"record {zi.filename!r}: its local header at offset "
                        f"{zi.header_offset:,} names {zi.filename[:-1]!r} ({n - 1} bytes long, "
                        f"the directory's {n})")


def test_a_record_grown_into_the_directory_is_refused(tmp_path):
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    p = root / D.TAG / D.optim_name(1)
    with zipfile.ZipFile(p) as zf:
        start = zf.start_dir
    zi = _grow_last_record(p, 64)
    assert _read(p) == f"record {zi.filename!r} runs into the zip directory at offset {start:,}"
    _grow_last_record(p, -64)  # back as it was: read as before
    assert _read(p) == "ok"


# ------------------------------------- lookalikes for the shortcuts: the same exact verdict twice
_E3 = b"cdeepspeed.runtime.zero.config\nZeroStageEnum\nK\x03\x85R"
_STORAGE = "StorageRef(key='{k}', dtype='float32', numel=4, location='cpu')"
_CORRUPT = "unreadable f.pt: its pickle is corrupt (UnpicklingError: {})"
_WINDOW = _CORRUPT.format("storage 0: a tensor with a malformed offset, shape or stride")


def _ok(key: str = "0", offset: int = 0, extra: str = "") -> str:
    st = _STORAGE.format(k=key)
    return (f"ok [{st}] {{'t': TensorRef(storage={st}, offset={offset}, shape=(0,), stride=(1,), "
            f"dtype='float32', requires_grad=False){extra}}}")


def _empty(**kw) -> bytes:
    return _tensor(**{"size": b"K\x00\x85", **kw})


#: (pickle, its verdict on both paths): the empty 1-D tensor's shortcut and persistent_load's
#: field-by-field check against int subclasses (ZeroStageEnum), lists, bounds and sharing
LOOKALIKES = {
    "an int-subclass dim": (_tensor(size=_ENUM0 + b"\x85"), _WINDOW),
    "an int-subclass stride": (_empty(stride=_ENUM0 + b"\x85"), _WINDOW),
    "an int-subclass offset": (_empty(offset=_ENUM0), _WINDOW),
    "a 2**62 offset (holds nothing)": (_empty(offset=b"\x8a\x08" + (1 << 62).to_bytes(8, "little")),
                                       _ok(offset=1 << 62)),
    "a list shape and stride": (_empty(size=b"]K\x00a", stride=b"]K\x01a"), _ok()),
    "its shape shared with the result": (_tensor(size=b"K\x00\x85q\x07", after=_key("u") + b"h\x07"),
                                         _ok(extra=", 'u': (0,)")),
    "an int-subclass count": (_empty(pid=_PID[:-2] + _ENUM0),
                              _CORRUPT.format("storage 0: bad element count ZeroStageEnum")),
    "an int-subclass key (its str)": (_empty(pid=_PID.replace(_key("0"), _E3)),
                                      _ok(key="ZeroStageEnum.weights")),
    "a 64-character key": (_empty(pid=_PID.replace(_key("0"), _key("k" * 64))), _ok(key="k" * 64)),
    "a 65-character key": (_empty(pid=_PID.replace(_key("0"), _key("k" * 65))),
                           _CORRUPT.format("malformed storage reference (5 fields)")),
    "a count of 2**48 + 1": (_empty(pid=_PID[:-2] + b"\x8a\x07" + (2**48 + 1).to_bytes(7, "little")),
                             _CORRUPT.format("storage 0: bad element count 281474976710657")),
    "a legacy view field": (_empty(pid=_PID + b"N"),
                            _CORRUPT.format("malformed storage reference (6 fields)")),
}


@pytest.mark.parametrize("what", list(LOOKALIKES))
def test_lookalikes_get_the_same_exact_verdict_on_both_paths(what):
    raw, verdict = LOOKALIKES[what]
    assert prepare_for_c(raw) is not None
    assert outcomes(raw) == {"fast": [verdict], "slow": [verdict]}


_OD = b"\x80\x02}(" + _key("o") + b"ccollections\nOrderedDict\n"
#: OrderedDict() skips the copy's __init__ only when it has nothing to add: with items, each key
#: is checked and the copy charged, as before
ORDERED = {
    "OrderedDict(a dict)": (_OD + b"}(" + _key("a") + b"K\x01u\x85Ru.",
                            "ok [] {'o': PickledOrderedDict([('a', 1)])}"),
    "OrderedDict(pairs)": (_OD + b"](" + _key("a") + b"K\x01\x86" + _key("b") + b"N\x86e\x85Ru.",
                           "ok [] {'o': PickledOrderedDict([('a', 1), ('b', None)])}"),
    "OrderedDict(a deep key)": (_OD + b"](N" + b"\x85" * 2000 + b"K\x01\x86e\x85Ru.",
                                "unreadable f.pt: its pickle exceeds a parsing budget: a dict key "
                                "or set member holds more than 1,000 objects"),
}


@pytest.mark.parametrize("what", list(ORDERED))
def test_ordered_dicts_with_items_are_checked_on_both_paths(what):
    raw, verdict = ORDERED[what]
    assert prepare_for_c(raw) is not None
    assert outcomes(raw) == {"fast": [verdict], "slow": [verdict]}
