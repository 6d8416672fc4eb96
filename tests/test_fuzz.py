"""Fuzz the readers with damaged copies of the real fixture files (optimizer and model states).

Mutations: truncation anywhere; byte flips anywhere; and flips inside `data.pkl` with the zip
CRC fixed up, so the damage gets past zipfile's check and reaches the unpickler itself.

For every example, `open_checkpoint` returns a model (with findings) or raises a
`ZinspectError`, `deep_check` returns findings and never raises, and `plan_merge(salvage=True)`
returns a plan or raises a `ZinspectError`. Never any other exception, never more than
`HANG_SECONDS` per example (an interval timer raises), never more than `PEAK_BYTES` of Python
allocations (tracemalloc). Examples are derandomized, so CI runs the same ones each time.
Crashes found here are kept as regular tests at the bottom.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import damage as D
import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zinspect.core import open_checkpoint
from zinspect.core.deep import deep_check
from zinspect.core.plan import plan_merge
from zinspect.errors import ZinspectError

HANG_SECONDS = 10
PEAK_BYTES = 64 << 20  # the fixture files are < 250 KB; the deep check's buffer is 1 MB here
FIXTURE_SET = ["s2_w4_fp16", "s3_w4_bf16", "s1_w2_bf16_bf16opt", "s3_w3_fp16_sub"]
FILES = {name: sorted(p.name for p in (FIXTURES / name / D.TAG).iterdir())
         for name in FIXTURE_SET}
#: ZINSPECT_FUZZ_EXAMPLES=5000 hunts longer, with fresh random examples (CI: 120, fixed ones)
_EXAMPLES = int(os.environ.get("ZINSPECT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXAMPLES or 120, deadline=None, derandomize=not _EXAMPLES,
                database=None, suppress_health_check=[HealthCheck.too_slow])


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"an example took more than {HANG_SECONDS} s")


def check_damaged(root: Path) -> None:
    """The contract every damaged checkpoint must meet."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    tracemalloc.start()
    try:
        try:
            ckpt = open_checkpoint(root)
        except ZinspectError:
            return
        assert isinstance(ckpt.findings, list)
        found = deep_check(ckpt, chunk=1 << 20)
        assert all(f.code and f.message for f in found)
        try:
            plan = plan_merge(ckpt, salvage=True)
        except ZinspectError:
            return
        for t in plan.tensors:  # nothing planned beyond what the files hold
            assert t.src_nbytes <= sum(f.size for f in ckpt.files)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert peak < PEAK_BYTES, f"allocated {peak:,} bytes"


def damaged_copy(name: str) -> tuple[Path, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="zinspect-fuzz-"))
    return tmp, D.copy_root(tmp, name)


@st.composite
def target(draw):
    name = draw(st.sampled_from(FIXTURE_SET))
    return name, draw(st.sampled_from(FILES[name]))


@FUZZ
@given(target(), st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_anywhere(tgt, where):
    name, leaf = tgt
    tmp, root = damaged_copy(name)
    try:
        p = root / D.TAG / leaf
        D.truncate(p, int(p.stat().st_size * where))
        check_damaged(root)
    finally:
        shutil.rmtree(tmp)


@FUZZ
@given(target(), st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True),
                                    st.integers(1, 255)), min_size=1, max_size=8))
def test_bytes_flipped_anywhere(tgt, flips):
    name, leaf = tgt
    tmp, root = damaged_copy(name)
    try:
        p = root / D.TAG / leaf
        data = bytearray(p.read_bytes())
        for where, xor in flips:
            data[int(len(data) * where)] ^= xor
        p.write_bytes(bytes(data))
        check_damaged(root)
    finally:
        shutil.rmtree(tmp)


@FUZZ
@given(target(), st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True),
                                    st.integers(1, 255)), min_size=1, max_size=4))
def test_pickle_bytes_flipped_with_valid_crc(tgt, flips):
    name, leaf = tgt
    tmp, root = damaged_copy(name)
    try:
        p = root / D.TAG / leaf
        off, size = D.zip_entry(p, "data.pkl")
        data = bytearray(p.read_bytes())
        for where, xor in flips:
            data[off + int(size * where)] ^= xor
        p.write_bytes(bytes(data))
        D.set_crc(p, "data.pkl")
        with zipfile.ZipFile(p) as zf:  # the damage really reaches the unpickler
            zf.read(next(z for z in zf.infolist() if z.filename.endswith("/data.pkl")))
        check_damaged(root)
    finally:
        shutil.rmtree(tmp)


#: central-directory fields (offset in the entry, struct format) a forgery would change: the
#: sizes, the local header offset and the name length
_CD_FIELDS = [(20, "<I"), (24, "<I"), (42, "<I"), (28, "<H")]


@FUZZ
@given(target(), st.data())
def test_zip_structure_fields_forged(tgt, data):
    """A central-directory entry's size, offset or name length set to another value, and/or a
    local header's name changed: the records are cross-checked, never trusted."""
    name, leaf = tgt
    tmp, root = damaged_copy(name)
    try:
        p = root / D.TAG / leaf
        buf = bytearray(p.read_bytes())
        entries = D._central_entries(bytes(buf))
        pos, _ = data.draw(st.sampled_from(entries))
        at, fmt = data.draw(st.sampled_from(_CD_FIELDS))
        top = 0xFFFF if fmt == "<H" else len(buf) + 4096
        struct.pack_into(fmt, buf, pos + at, data.draw(st.integers(0, top)))
        if data.draw(st.booleans()):  # and a local header's name byte
            with zipfile.ZipFile(p) as zf:
                zi = data.draw(st.sampled_from(zf.infolist()))
            buf[zi.header_offset + 30 + data.draw(st.integers(0, len(zi.filename) - 1))] ^= 0x20
        p.write_bytes(bytes(buf))
        check_damaged(root)
    finally:
        shutil.rmtree(tmp)


#: pickle fragments that each push one value, at sizes bounded here (the budgets must stop
#: them well before these bounds matter): memo bombs, deep nesting, memo indices, long strings
_FRAGMENTS = st.one_of(
    st.integers(1, 80).map(lambda k: b"N" + b"2\x86" * k),
    st.integers(1, 50_000).map(lambda k: b"N" + b"\x85" * k),
    st.integers(0, 2**32 - 1).map(lambda i: b"N" + b"r" + struct.pack("<I", i)),
    st.integers(0, 3 << 20).map(lambda n: b"X" + struct.pack("<I", n) + b"x" * n),
    st.integers(1, 5_000).map(lambda k: b"(" * k + b"N" + b"t" * k),
)


@FUZZ
@given(target(), _FRAGMENTS, st.booleans())
def test_pickle_opcodes_forged(tgt, fragment, as_key):
    """A forged entry spliced into a real data.pkl (every CRC valid): the fragment as a value
    or as a dict key (hashed). Each is read within the budgets or refused as unreadable."""
    name, leaf = tgt
    tmp, root = damaged_copy(name)
    try:
        p = root / D.TAG / leaf
        raw = D.pickle_of(p)
        entry = fragment + b"N" if as_key else D._key("fz") + fragment
        D.rewrite_pickle(p, raw[:-1] + entry + b"s.")
        check_damaged(root)
    finally:
        shutil.rmtree(tmp)


# ------------------------------------------------------------------ reproducers kept as tests


def _bounded(fn):
    """Run fn() and return its Python allocation peak in bytes."""
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_huge_memo_index_does_not_allocate(tmp_path):
    """Found by the fuzzer: one flipped byte in a LONG_BINPUT index (here set to 2**31 - 16)
    made the C unpickler allocate and zero a memo array of 2 * index pointers (GBs) before
    failing. The pure-Python unpickler keeps its memo in a dict."""
    import pickletools

    root = D.copy_root(tmp_path, "s1_w2_bf16_bf16opt")
    p = root / D.TAG / D.MODEL
    off, size = D.zip_entry(p, "data.pkl")
    raw = p.read_bytes()[off:off + size]
    pos = next(pos for op, _, pos in pickletools.genops(raw) if op.name == "LONG_BINPUT")
    with open(p, "r+b") as f:
        f.seek(off + pos + 1)
        f.write((2**31 - 16).to_bytes(4, "little"))
    D.set_crc(p, "data.pkl")
    check_damaged(root)  # raises on > PEAK_BYTES
    # that memo slot is never read back here, so the file still parses, to the same params
    assert open_checkpoint(root).params.keys() == \
        open_checkpoint(FIXTURES / "s1_w2_bf16_bf16opt").params.keys()


def _torch_zip(path: Path, pickle_bytes: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")


def test_hostile_bytearray_size_is_refused(tmp_path):
    """`bytearray(10**12)` through REDUCE of the allowlisted builtins.bytearray: refused, not
    allocated."""
    from zinspect.core.torchzip import read_torch_file
    from zinspect.errors import UnreadableFile

    bomb = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x7f\x85R."  # bytearray(0x7f000000)
    path = tmp_path / "mp_rank_00_model_states.pt"
    _torch_zip(path, bomb)

    def read():
        with pytest.raises(UnreadableFile, match="bytearray"):
            read_torch_file(path)

    assert _bounded(read) < PEAK_BYTES
    ok = b"\x80\x02c__builtin__\nbytearray\nX\x02\x00\x00\x00ab\x85R."  # bytearray("ab")
    _torch_zip(path, ok)
    assert read_torch_file(path).obj == bytearray(b"ab")


def test_self_referencing_pickle_does_not_hang_the_checks(tmp_path):
    """A model-states dict that contains itself (memo GET of its own id) under every key the
    loader walks: the checks finish with findings."""
    import pickle

    d: dict = {"buffer_names": [], "ds_version": "0.19.8"}
    d["module"] = d
    d["param_shapes"] = [d]
    d["frozen_param_shapes"] = d
    d["shared_params"] = d
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    _torch_zip(root / D.TAG / D.MODEL, pickle.dumps(d, protocol=2))
    check_damaged(root)
    assert open_checkpoint(root).errors


@pytest.mark.parametrize("field,value", [
    (6, b"\x40\x00"),  # "version needed to extract" 6.4: zipfile raised NotImplementedError
    (8, b"\x01\x00"),  # general purpose flags: "encrypted" (zipfile: RuntimeError on read)
    (8, b"\x20\x00"),  # "compressed patched data" (zipfile: NotImplementedError on read)
    (10, b"\x0e\x00"),  # compression method 14 (LZMA)
])
def test_odd_central_directory_fields(tmp_path, field, value):
    """Found by the fuzzer (a flip in the version field of a central-directory entry of a
    ZeRO-3 model-states file): such files give findings or a clean error, in every reader."""
    root = D.copy_root(tmp_path, "s3_w4_bf16")
    p = root / D.TAG / D.z3_model_name(0)
    with zipfile.ZipFile(p) as zf:
        pos = zf.start_dir
    data = bytearray(p.read_bytes())
    while data[pos:pos + 4] == b"PK\x01\x02":  # every entry, data.pkl included
        data[pos + field:pos + field + 2] = value
        n, e, c = (int.from_bytes(data[pos + k:pos + k + 2], "little") for k in (28, 30, 32))
        pos += 46 + n + e + c
    p.write_bytes(bytes(data))
    check_damaged(root)
