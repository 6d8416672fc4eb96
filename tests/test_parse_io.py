"""Parsing reads metadata only: the bytes read from disk are counted (every `open(..., "rb")`
the reader makes goes through a counting raw file), legacy files parse with the right offsets,
and a hostile pickle is recorded, never run."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import copy_fixture, tag_dir
from damage import zip_entry

from zinspect.core import open_checkpoint, torchzip
from zinspect.core.torchzip import TensorRef, read_torch_file
from zinspect.errors import UnreadableFile

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "int64": torch.int64, "float64": torch.float64, "uint8": torch.uint8}


class _CountingRaw(io.FileIO):
    """The OS-level reads of a file (buffered read-ahead included), with where they were."""

    total = 0
    spans: dict[str, list[tuple[int, int]]] = {}  # file name -> [(offset, length)]

    def _note(self, start: int, n: int) -> None:
        _CountingRaw.total += n
        if n:
            _CountingRaw.spans.setdefault(os.path.basename(self.name), []).append((start, n))

    def readinto(self, b):
        start = self.tell()
        n = super().readinto(b)
        self._note(start, n or 0)
        return n

    def readall(self):
        start = self.tell()
        data = super().readall()
        self._note(start, len(data))
        return data

    def read(self, size=-1):
        start = self.tell()
        data = super().read(size)
        self._note(start, len(data or b""))
        return data


@pytest.fixture
def count_reads(monkeypatch):
    """Route binary opens through a counting file; returns a function giving the bytes read
    since the last reset()."""
    real_open = builtins.open
    opened: list[str] = []

    def counting_open(file, mode="r", buffering=-1, *args, opener=None, **kwargs):
        if mode in ("rb", "br") and not args and not kwargs and isinstance(file, (str, Path)):
            opened.append(os.fspath(file))
            raw = _CountingRaw(file, "r", opener=opener)
            return raw if buffering == 0 else io.BufferedReader(raw)
        return real_open(file, mode, buffering, *args, opener=opener, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)

    def read_so_far() -> int:
        return _CountingRaw.total

    def reset() -> None:
        _CountingRaw.total = 0
        _CountingRaw.spans = {}
        opened.clear()

    read_so_far.opened = opened
    read_so_far.reset = reset
    reset()
    return read_so_far


def _tensor_ranges(tf) -> list[tuple[int, int]]:
    """[start, end) of each storage's bytes in the file (read without the counter).

    One-element storages are left out: the optimizer's `step` scalar is read on purpose (a
    4-byte read that tells a stale rank file from the others)."""
    out = []
    for key, st in tf.storages.items():
        off = tf.data_offset(key)
        if off is not None and st.nbytes and st.numel > 1:
            out.append((off, off + st.nbytes))
    return out


def _pickle_bytes_read(files: list[Path], spans: dict) -> int:
    """The bytes of the reads (offset, length) in `spans` that fall in the files' data.pkl."""
    out = 0
    for f in files:
        lo, size = zip_entry(f, "data.pkl")
        out += sum(max(0, min(lo + size, start + n) - max(lo, start))
                   for start, n in spans.get(f.name, []))
    return out


def _assert_no_tensor_bytes_read(path: Path, spans: list[tuple[int, int]]) -> None:
    tf = read_torch_file(path)
    for lo, hi in _tensor_ranges(tf):
        for start, n in spans:
            assert start + n <= lo or start >= hi, (path.name, (start, n), (lo, hi))


def _tree_refs(obj):
    if isinstance(obj, TensorRef):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tree_refs(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tree_refs(v)


def _bytes_at(path: Path, offset: int, n: int) -> bytes:
    with io.FileIO(path) as f:  # not counted: the test's own check
        f.seek(offset)
        return f.read(n)


# ------------------------------------------------------------------------- bytes read
def test_opening_a_checkpoint_reads_no_tensor_bytes(count_reads):
    tag = tag_dir("s3_w5_bf16_small")
    files = sorted(tag.glob("*.pt"))
    c = open_checkpoint(tag)
    read = count_reads()
    spans = {k: list(v) for k, v in _CountingRaw.spans.items()}
    assert {os.path.basename(p) for p in count_reads.opened} == {f.name for f in files}
    assert read > 0  # the counter does see the reads
    tensor_bytes = sum(s.nbytes for f in c.files for s in f.storages)
    on_disk = sum(f.stat().st_size for f in files)
    # beyond the pickles (validate reads the frozen params' ranks' too, 1f697ec): the zip
    # structure, a small part of the tensor bytes
    assert 0 < read - _pickle_bytes_read(files, spans) < tensor_bytes * 0.1, (read, tensor_bytes)
    for f in files:
        _assert_no_tensor_bytes_read(f, spans[f.name])
        # the bytes read, each once: validate reads a frozen-param rank's pickle that the open
        # checked whole (1f697ec)
        got = len(set().union(*(range(start, start + n) for start, n in spans[f.name])))
        tensors = sum(s.nbytes for s in c.file(f.name).storages)
        assert got <= f.stat().st_size - tensors, f.name  # at most the non-tensor bytes
        if "optim" in f.name:  # the files that hold the weights: a few % of them is read
            assert got < f.stat().st_size * 0.05, (f.name, got)
    assert on_disk > read


def test_identical_rank_pickles_are_unpickled_once(monkeypatch):
    """ZeRO-3 optimizer files of all ranks hold the same data.pkl: it is unpickled once, and each
    rank's fragments still point into its own file (the merge tests check the bytes). ZeRO-2
    ranks' pickles differ: each is unpickled."""
    calls = []
    real = torchzip._load_pickle
    monkeypatch.setattr(torchzip, "_load_pickle", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    c = open_checkpoint(tag_dir("s3_w4_bf16"))
    optim = [f for f in c.files if f.kind == "optim"]
    assert len(optim) == 4 and sum("optim" in path for path in calls) == 1
    frags = c.params["embed.weight"].fragments  # each rank's part, from that rank's own file
    assert sorted(f.file for f in frags) == sorted(f.name for f in optim)
    assert all(f.offset > 0 for f in frags)

    calls.clear()
    c = open_checkpoint(tag_dir("s2_w4_fp16"))
    assert sum("optim" in path for path in calls) == 4


def test_a_large_tensor_is_not_read(tmp_path, count_reads):
    path = tmp_path / "big.pt"
    big = torch.arange(4_000_000, dtype=torch.float32)
    small = torch.tensor([1.5, 2.5], dtype=torch.bfloat16)
    torch.save({"big": big, "small": small, "view": big[1000:1010], "n": 7}, path)
    count_reads.reset()
    tf = read_torch_file(path)
    read = count_reads()
    spans = _CountingRaw.spans["big.pt"]
    size = path.stat().st_size
    assert tf.format == "zip" and size > 16_000_000
    assert 0 < read < size * 0.01, (read, size)
    _assert_no_tensor_bytes_read(path, spans)
    obj = tf.obj
    assert obj["n"] == 7
    assert obj["big"].shape == (4_000_000,) and obj["big"].dtype == "float32"
    assert obj["view"].storage.key == obj["big"].storage.key and obj["view"].offset == 1000
    expect = {"big": big[:1024], "small": small, "view": big[1000:1010]}
    for name, t in expect.items():
        ref = obj[name]
        raw = bytearray(_bytes_at(path, tf.tensor_offset(ref), t.numel() * t.element_size()))
        assert torch.equal(torch.frombuffer(raw, dtype=t.dtype), t.flatten()), name


# ------------------------------------------------------------------------- legacy format
def test_legacy_format_storages_and_offsets(tmp_path, count_reads):
    path = tmp_path / "legacy.pt"
    base = torch.arange(600, dtype=torch.float64)
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "i64": torch.arange(11),
        "slice": base[100:130],  # shares base's storage, offset 100
        "base": base,
        "u8": torch.arange(9, dtype=torch.uint8),
    }
    torch.save({"state": tensors, "step": 3}, path, _use_new_zipfile_serialization=False)
    count_reads.reset()
    tf = read_torch_file(path)
    assert tf.format == "legacy"
    assert tf.obj["step"] == 3
    refs = tf.obj["state"]
    assert set(refs) == set(tensors)
    assert len(tf.storages) == 5  # slice and base share one
    assert refs["slice"].storage.key == refs["base"].storage.key and refs["slice"].offset == 100
    for name, t in tensors.items():
        ref = refs[name]
        assert isinstance(ref, TensorRef)
        assert ref.shape == tuple(t.shape) and ref.dtype == str(t.dtype).removeprefix("torch.")
        raw = bytearray(_bytes_at(path, tf.tensor_offset(ref), ref.nbytes))
        got = torch.frombuffer(raw, dtype=TORCH_DTYPES[ref.dtype]).reshape(t.shape)
        assert torch.equal(got, t), name
    for key, st in tf.storages.items():
        rec = tf.records[key]
        assert rec.size == st.nbytes and rec.present == st.nbytes


def test_legacy_large_tensor_not_read(tmp_path, count_reads):
    path = tmp_path / "legacy_big.pt"
    torch.save({"w": torch.ones(2_000_000), "b": torch.zeros(3)}, path,
               _use_new_zipfile_serialization=False)
    count_reads.reset()
    tf = read_torch_file(path)
    assert tf.format == "legacy" and tf.obj["w"].shape == (2_000_000,)
    assert count_reads() < path.stat().st_size * 0.01


# ------------------------------------------------------------------------- hostile pickles
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_hostile_pickle_never_runs(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Evil(marker), "w": torch.ones(3)}, path,
               _use_new_zipfile_serialization=not legacy)
    tf = read_torch_file(path)
    assert not marker.exists()
    assert {"posix.system", "os.system"} & tf.unknown_globals, tf.unknown_globals
    assert isinstance(tf.obj["w"], TensorRef)
    # positive control: the payload is real, an unsafe load does run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def _inject_payload(path: Path, command: str, then_break: bool = False) -> None:
    """Add `{"evil": os.system(command)}` to the top-level dict of a torch.save zip file by
    patching its data.pkl (the real file's classes need DeepSpeed to be loaded by torch).
    `then_break`: the pickle ends right after the call (unreadable, yet the call would run)."""
    with zipfile.ZipFile(path) as zf:
        entries = [(zi.filename, zf.read(zi)) for zi in zf.infolist()]
    out = []
    for name, data in entries:
        if name.endswith("/data.pkl"):
            assert data.endswith(b".")
            payload = pickle.dumps("evil", protocol=2)[2:-1]  # a BINUNICODE, no PROTO/STOP
            cmd = pickle.dumps(command, protocol=2)[2:-1]
            data = data[:-1] + payload + b"cposix\nsystem\n" + cmd + b"\x85R" + \
                (b"" if then_break else b"s.")
        out.append((name, data))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in out:
            zf.writestr(name, data)


def test_hostile_rank_file_in_a_checkpoint_is_reported(tmp_path):
    marker = tmp_path / "MARKER"
    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _inject_payload(victim, f"touch {marker}")
    c = open_checkpoint(tag)
    assert not marker.exists()
    rf = c.file(victim.name)
    assert rf.unknown_globals == ["posix.system"]
    # reported where it is (an "unsafe-pickle" error, or at least "unknown-classes")
    hits = [f for f in c.findings if "posix.system" in f.message]
    assert [(f.code in ("unsafe-pickle", "unknown-classes"), f.file, f.rank) for f in hits] == \
        [(True, victim.name, 1)]
    # the rest of the file is fine and still read
    assert not [f for f in c.errors if f.code != "unsafe-pickle"]
    assert c.world_size == 2 and len(c.groups) == 3


def test_a_payload_before_the_damage_is_still_named(tmp_path):
    """A pickle that calls os.system and then breaks: unreadable, and unsafe-pickle too."""
    marker = tmp_path / "MARKER"
    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _inject_payload(victim, f"touch {marker}", then_break=True)
    c = open_checkpoint(tag)
    assert not marker.exists()
    codes = {f.code for f in c.errors if f.file == victim.name}
    assert {"unreadable-file", "unsafe-pickle"} <= codes, codes


# ------------------------------------------------------------------------- the stat/open race
_SWAP = """
import os, sys
from pathlib import Path
from zinspect.core import load, open_checkpoint, torchzip
tag = Path(sys.argv[1])
victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
victim.unlink()
os.mkfifo(victim)
for check in (torchzip.zip_is_complete, torchzip.pickle_is_intact):
    print(check.__name__, check(victim))
try:
    torchzip.read_torch_file(victim)
except Exception as e:
    print(type(e).__name__, e.message)
load.file_kind = lambda path: None  # the stat saw a regular file: the FIFO came after it
c = open_checkpoint(tag)
print([f.message for f in c.findings if f.code == "unreadable-file" and f.file == victim.name])
"""


def test_a_fifo_swapped_in_after_the_stat_never_blocks(tmp_path):
    """A rank file replaced by a FIFO between the directory's examination and the open: every
    reader opens without blocking (O_NONBLOCK), sees what it opened (fstat) and refuses it; the
    checkpoint opens with the file named. Without that, open() waits for a writer for ever (the
    timeout here)."""
    import subprocess
    import sys

    from conftest import REPO

    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    r = subprocess.run([sys.executable, "-c", _SWAP, str(tag)], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[:2] == ["zip_is_complete False", "pickle_is_intact False"]
    assert lines[2].startswith("UnreadableFile ") and "is a FIFO (named pipe) now" in lines[2]
    assert "is a FIFO (named pipe) now" in lines[3], lines[3]


def test_a_link_to_a_device_is_refused_and_a_link_to_a_file_followed(tmp_path):
    src = tag_dir("s2_w2_fp32_plain") / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    link = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    link.symlink_to(src)
    assert read_torch_file(link).obj.keys() == read_torch_file(src).obj.keys()
    link.unlink()
    link.symlink_to("/dev/zero")
    with pytest.raises(UnreadableFile, match="is a character device now"):
        read_torch_file(link)
