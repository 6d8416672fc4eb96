"""The zip checks answered in bulk against the same checks one by one: stretches of alike
records with data (zipruns.alike / check_alike: a ZeRO-3 model-states file's frozen fragments)
and the names outside runs (Runs.hold_any). Whatever is forged or damaged, reading a zip with
them gives what reading it record by record gives: the same refusal word for word, or the
same records; and never a tensor byte is read.
"""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import pytest
import torch
from test_review_zipruns import _read  # the records, storages and load's list, or the refusal

from zinspect.core import torchzip, zipcheck, zipruns
from zinspect.core.torchzip import read_torch_file
from zinspect.core.zipruns import EmptyRun, Runs

MOE = (Path(__file__).parent / "fixtures/parallel/moe_ep2_w2_s0_bf16/global_step2"
       / "mp_rank_00_model_states.pt")


def _saved(tmp_path):
    """A torch.save zip of 40 tensors of 200 bytes (their local headers' extra fields differ:
    torch aligns each record's data to 64 bytes) and 40 of 256."""
    path = tmp_path / "m.pt"
    torch.save({**{f"a{i}": torch.full((100,), i, dtype=torch.bfloat16) for i in range(40)},
                **{f"b{i}": torch.full((64,), i, dtype=torch.float32) for i in range(40)}}, path)
    return path


def _records(data) -> list[tuple[int, int]]:
    """(central entry, local header) offsets of the zip's data/ records."""
    end = bytes(data).rfind(b"PK\x05\x06")
    pos, out = struct.unpack_from("<I", data, end + 16)[0], []
    while data[pos:pos + 4] == b"PK\x01\x02":
        nlen, xlen, clen = struct.unpack_from("<HHH", data, pos + 28)
        if b"/data/" in data[pos + 46:pos + 46 + nlen]:
            out.append((pos, struct.unpack_from("<I", data, pos + 42)[0]))
        pos += 46 + nlen + xlen + clen
    return out


def _both(monkeypatch, path) -> tuple:
    """(in bulk, record by record) of _read(path), and how many stretches passed in bulk."""
    passed = []

    def counted(*args):
        found = zipruns.check_alike(*args)
        passed.append(found is not None)
        return found

    with monkeypatch.context() as m:
        m.setattr(zipcheck, "check_alike", counted)
        fast = _read(path)
    with monkeypatch.context() as m:
        m.setattr(zipcheck, "alike", lambda _: {})
        slow = _read(path)
    return fast, slow, sum(passed)


@pytest.mark.parametrize("make", [_saved, lambda tmp_path: MOE])
def test_alike_records_checked_whole(tmp_path, monkeypatch, make):
    fast, slow, passed = _both(monkeypatch, make(tmp_path))
    assert fast == slow and fast[0] != "refused" and passed


def _edit(data, at: int, fmt: str, value) -> bytearray:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return out


@pytest.mark.parametrize("k", [1, 5, 39, 40, 79])
@pytest.mark.parametrize("where,at,fmt,value", [
    ("local", 0, "<I", 0x04034B51),  # no signature
    ("local", 6, "<H", 0),  # no data descriptor: the local sizes (0) are compared
    ("local", 8, "<H", 8),  # deflated
    ("local", 22, "<I", 7), ("local", 26, "<H", 99),  # the sizes, the name's length
    ("local", 28, "<H", 0), ("local", 28, "<H", 2000), ("local", 28, "<H", 33),  # extra field
    ("local", -2, "<B", 0x39), ("local", -1, "<B", 0x30),  # the name
    ("central", 42, "<i", 64), ("central", 42, "<i", -64), ("central", 42, "<i", 1),
    ("central", 42, "<i", 300), ("central", 42, "<i", -10 ** 6),  # moved (added)
    ("central", 46 + 13, "<B", 0x5A),  # the directory's name
])
def test_a_forged_record_in_a_stretch(tmp_path, monkeypatch, k, where, at, fmt, value):
    path = _saved(tmp_path)
    data = path.read_bytes()
    central, local = _records(data)[k]
    nlen = struct.unpack_from("<H", data, central + 28)[0]
    if where == "local":
        base = local + (at if at >= 0 else 30 + nlen + at)
        data = _edit(data, base, fmt, value)
    else:
        moved = struct.unpack_from("<I", data, central + 42)[0] + value
        data = _edit(data, central + at, fmt, value) if at != 42 else \
            _edit(data, central + 42, "<I", max(0, moved))
    path.write_bytes(bytes(data))
    fast, slow, _ = _both(monkeypatch, path)
    assert fast == slow


@pytest.mark.parametrize("cut", [1, 17, 200, 1000, 4000, 9000])
def test_a_stretch_cut_short(tmp_path, monkeypatch, cut):
    """The file truncated inside or after a stretch (its directory appended again, so the
    records past the end are named)."""
    path = _saved(tmp_path)
    data = path.read_bytes()
    records = _records(data)
    start = struct.unpack_from("<I", data, bytes(data).rfind(b"PK\x05\x06") + 16)[0]
    head = records[20][1] + cut
    directory = data[start:]
    # the directory's offset, now where the copy starts
    end = directory.rfind(b"PK\x05\x06")
    directory = _edit(directory, end + 16, "<I", head)
    path.write_bytes(data[:head] + bytes(directory))
    fast, slow, _ = _both(monkeypatch, path)
    assert fast == slow


def test_random_damage_to_alike_records(tmp_path, monkeypatch):
    """400 zips with 1-3 bytes of the data records' local headers and central entries changed:
    in bulk or record by record, the same."""
    path = _saved(tmp_path)
    data = path.read_bytes()
    records = _records(data)
    rng = random.Random(5)
    refused = 0
    for _ in range(400):
        damaged = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3))):
            central, local = rng.choice(records)
            at = local + rng.choice((rng.randrange(80), 6, 8, 22, 26, 28, 29)) \
                if rng.random() < 0.6 else central + rng.choice((rng.randrange(80), 42, 43))
            damaged[at] = damaged[at] ^ 1 << rng.randrange(8) if rng.random() < 0.5 else \
                rng.randrange(256)
        path.write_bytes(bytes(damaged))
        fast, slow, _ = _both(monkeypatch, path)
        assert fast == slow
        refused += fast[0] == "refused"
    assert 50 < refused < 350  # both kinds of verdict were compared


class _Spy(io.FileIO):
    spans: list[tuple[int, int]] = []

    def read(self, size=-1):
        start = self.tell()
        data = super().read(size)
        _Spy.spans.append((start, len(data)))
        return data


def test_no_tensor_byte_is_read(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    _Spy.spans = []
    monkeypatch.setattr(torchzip, "open_exact",
                        lambda p: (_Spy(p), path.stat().st_size))
    tf = read_torch_file(path)
    monkeypatch.undo()
    assert len(_Spy.spans) > 80  # each of the 80 local headers, at least
    for rec in tf.records.values():
        for start, n in _Spy.spans:
            assert start + n <= rec.data_offset or start >= rec.data_offset + rec.size


def _names(rng, prefixes) -> list[str]:
    digits = ["0", "7", "07", "00", "10", "٣", "1" * 19, "9" * 5000, "", "12\n13", "+5"]
    out = []
    for _ in range(300):
        n = rng.choice((str(rng.randrange(60)), rng.choice(digits)))
        out.append(rng.choice(prefixes) + n + rng.choice(("", "", "", "x", "\n", "\n7")))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_names_held_by_runs_in_bulk(seed):
    """Runs.hold_any is any(map(Runs.find, names)), but that a name holding a newline may
    make it doubt (True) where no name is a run's."""
    rng = random.Random(seed)
    runs = Runs([EmptyRun(p, first, count, 0, 64, bytes(42)) for p, first, count in
                 [("r/data/", 0, 9), ("r/data/", 20, 8), ("r/data/a", 30, 10), ("x\n", 3, 9)]])
    prefixes = ["r/data/", "r/data/a", "r/data/b", "r/", "x\n", "q", "r/data/\n", ""]
    answers = set()
    for _ in range(20):
        names = _names(rng, prefixes)[:rng.randrange(1, 40)]
        want = any(map(runs.find, names))
        got = runs.hold_any(names)
        assert got == want or got and any("\n" in n for n in names), names
        answers.add(want)
    assert answers == {True, False}
