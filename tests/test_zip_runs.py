"""Runs of zero-byte records (zipruns.EmptyRun): a ZeRO-3 model-states file has one empty
placeholder record per param, and they are read and checked as a few runs, not one by one.

The runs must change nothing but the time: every zip below, whole or damaged, gets the
same directory, the same data offsets and the same refusal, word for word, as the
record-by-record check (`check_records` over every entry, read by a plain loop here).
"""

from __future__ import annotations

import random
import shutil
import struct
import zipfile

import pytest
from conftest import tag_dir
from sparse_zip import Record, write_zip

from zinspect.core import zipcheck, zipruns
from zinspect.core.load import _storages
from zinspect.core.torchzip import open_exact, read_torch_file
from zinspect.errors import UnreadableFile

MODEL = tag_dir("s3_w4_bf16") / "zero_pp_rank_0_mp_rank_00_model_states.pt"  # torch's own


def _reference_entries(f, size: int) -> list[tuple[str, int, int, int, int]]:
    """The central directory entry by entry, as zinspect read it before the runs."""
    count, cd_size, cd_offset, _ = zipcheck._directory_span(zipcheck._tail(f, size))
    f.seek(cd_offset)
    cd, out, pos = f.read(cd_size), [], 0
    while pos <= len(cd) - 46:
        sig, comp, crc, csize, usize, nlen, xlen, clen, offset = zipcheck._CENTRAL.unpack_from(
            cd, pos)
        if sig != b"PK\x01\x02" or cd_offset + cd_size > size:
            raise zipcheck.NoZipDirectory
        name = cd[pos + 46:pos + 46 + nlen].decode("utf-8", "replace")
        if 0xFFFFFFFF in (csize, usize, offset):
            usize, offset = zipcheck._zip64_extra(cd[pos + 46 + nlen:pos + 46 + nlen + xlen],
                                                  usize, csize, offset)
        out.append((name, offset, comp, usize, crc))
        pos += 46 + nlen + xlen + clen
    if len(out) != count:
        raise zipcheck.NoZipDirectory
    return out


def _verdicts(path) -> tuple[object, object]:
    """(record by record, with runs): each the name -> data offset of every record, or the
    ZipStructureError's message."""
    f, size = open_exact(path)
    with f:
        try:
            entries = _reference_entries(f, size)
        except (zipcheck.NoZipDirectory, struct.error, StopIteration):
            with pytest.raises(zipcheck.NoZipDirectory):
                zipcheck.read_directory(f, size)
            return None, None
        start = zipcheck.directory_offset(f, size)
        assert zipcheck.central_directory(f, size) == entries
        try:
            old = zipcheck.check_records(f, size, entries, start)
        except zipcheck.ZipStructureError as e:
            old = str(e)
        try:
            _, runs, new = zipcheck.check_directory(f, size, zipcheck.read_directory(f, size),
                                                    start)
            new = dict(new)
            for r in runs:
                new.update((r.name(i), r.header + (i + 1) * r.stride) for i in range(r.count))
        except zipcheck.ZipStructureError as e:
            new = str(e)
    return old, new


def _runs(path) -> list[zipcheck.EmptyRun]:
    f, size = open_exact(path)
    with f:
        return zipcheck.read_directory(f, size).runs


def _empties(path, n: int, first: int = 0, names=None, full=()) -> list[Record]:
    """A torch-like zip: data.pkl, then n records (empty unless their index is in `full`)."""
    names = names or [f"archive/data/{first + i}".encode() for i in range(n)]
    records = [Record(b"archive/data.pkl", b"\x80\x02}q\x00.")]
    records += [Record(name, b"x" * 8 if i in full else b"") for i, name in enumerate(names)]
    records.append(Record(b"archive/version", b"3\n"))
    write_zip(path, records)
    return records


def _local_header(path, name: bytes) -> int:
    with zipfile.ZipFile(path) as zf:
        return zf.getinfo(name.decode()).header_offset


# ------------------------------------------------------------------------- whole files
def test_torch_files_are_read_as_runs_with_the_same_offsets():
    """torch pads each empty record to 64 bytes with an extra field: still one run per name
    length, and every offset as before."""
    runs = _runs(MODEL)
    assert runs and all(r.stride == 128 for r in runs)
    old, new = _verdicts(MODEL)
    assert isinstance(old, dict) and new == old


@pytest.mark.parametrize("n,first", [(2, 0), (9, 1), (11, 0), (250, 0), (1200, 95), (5, 99)])
def test_numbered_empty_records_across_name_lengths(tmp_path, n, first):
    path = tmp_path / "m.pt"
    _empties(path, n, first)
    old, new = _verdicts(path)
    assert isinstance(old, dict) and new == old
    # a run per name length of MIN_ROWS records or more, the first few of it perhaps read
    # alone (after records that made no run, zipcheck looks again 1, 2, 4, ... records later)
    widths = [len(str(first + i)) for i in range(n)]
    groups = {w: widths.count(w) for w in widths}
    runs = {len(str(r.first)): r.count for r in _runs(path)}
    assert len(runs) == len(_runs(path)) and all(groups[w] >= zipruns.MIN_ROWS for w in runs)
    assert all(runs.get(w, 0) > g - 16 for w, g in groups.items() if g >= zipruns.MIN_ROWS + 16)


@pytest.mark.parametrize("full", [{0}, {1}, {3, 4}, {9}, {20}, {59}, set(range(0, 60, 2)),
                                  set(range(1, 60, 3)), set(range(2, 60, 3)), set(range(7, 60, 8))])
def test_empty_records_between_full_ones(tmp_path, full):
    path = tmp_path / "m.pt"
    _empties(path, 60, full=full)
    old, new = _verdicts(path)
    assert isinstance(old, dict) and new == old


@pytest.mark.parametrize("names", [
    [b"archive/data/%02d" % i for i in range(30)],  # leading zeros: not a canonical number
    [b"archive/data/x%d" % i for i in range(30)],
    [b"archive/data/%d" % (10 ** 19 + i) for i in range(30)],  # past 18 digits
    ["archive/data/é%d".encode() % i for i in range(30)],
    [b"archive/data/\xff%d" % i for i in range(30)],  # not UTF-8
    [b"archive/data/%d" % i for i in range(30, 0, -1)],  # counting down
    [b"archive/data/%d" % i for i in random.Random(3).sample(range(30), 30)],
    [b"archive/data/%d" % i for i in (*range(10), 11, 12, *range(14, 30))],  # gaps
])
def test_other_names_read_alone_the_same(tmp_path, names):
    path = tmp_path / "m.pt"
    _empties(path, len(names), names=names)
    old, new = _verdicts(path)
    assert new == old and isinstance(old, dict) != (b"\xff" in names[0])  # refused either way


def test_records_and_storages_of_a_run(tmp_path):
    """TorchFile.records makes a run's Records when asked, the same as listed ones would be;
    load lists no Storage for a zero-element storage with an empty record (none of its bytes
    can be missing)."""
    tf = read_torch_file(MODEL)
    assert not tf.records.listed.keys() & {r.name(0).rsplit("/", 1)[1] for r in _runs(MODEL)}
    f, size = open_exact(MODEL)
    with f:
        entries = _reference_entries(f, size)
        starts = zipcheck.check_records(f, size, entries, zipcheck.directory_offset(f, size))
    cut = entries[0][0].rsplit("/", 1)[0] + "/data/"
    want = {name[len(cut):]: (usize, offset, starts[name], crc)
            for name, offset, _, usize, crc in entries if name.startswith(cut)}
    got = {key: (r.size, r.header_offset, r.data_offset, r.crc) for key, r in tf.records.items()}
    assert got == want and len(tf.records) == len(want)
    assert all(tf.records[k].present == 0 for k in want if want[k][0] == 0)
    with pytest.raises(KeyError):
        tf.records["999"]
    assert tf.records.get("01") is None and tf.records.get("x") is None
    in_runs = {k for k, st in tf.storages.items() if st.numel == 0} - tf.records.listed.keys()
    assert len(in_runs) > 20 and {s.key for s in _storages(tf)} == set(tf.storages) - in_runs


# ------------------------------------------------------------------------- damage
@pytest.mark.parametrize("field,value", [
    (0, b"PK\x03\x05"),  # no local header
    (8, b"\x08\x00"),  # method deflate
    (22, b"\x05\x00\x00\x00"),  # size 5
    (26, b"\x10\x00"),  # name length
    (12, b"\x21\x00"),  # a date: stricter than the check, so read record by record
])
@pytest.mark.parametrize("which", [0, 1, 7, 59])
def test_a_damaged_local_header_of_an_empty_record_is_found(tmp_path, field, value, which):
    path = tmp_path / "m.pt"
    _empties(path, 60)
    at = _local_header(path, b"archive/data/%d" % which) + field
    data = bytearray(path.read_bytes())
    data[at:at + len(value)] = value
    path.write_bytes(bytes(data))
    old, new = _verdicts(path)
    assert new == old and _runs(path)
    if field != 12:
        assert isinstance(old, str) and f"archive/data/{which}" in old
        with pytest.raises(UnreadableFile, match="zip structure is forged or damaged"):
            read_torch_file(path)


def test_a_damaged_name_in_a_local_header_of_torch_padding(tmp_path):
    path = tmp_path / "m.pt"
    shutil.copy(MODEL, path)
    run = _runs(path)[1]
    data = bytearray(path.read_bytes())
    data[run.header + 5 * run.stride + 30 + len(run.prefix)] ^= 0x01  # a digit of a name
    path.write_bytes(bytes(data))
    old, new = _verdicts(path)
    assert new == old and "its local header at offset" in old


def test_duplicate_names_with_a_run(tmp_path):
    path = tmp_path / "m.pt"
    names = [b"archive/data/%d" % i for i in range(40)] + [b"archive/data/7"]
    _empties(path, len(names), names=names)
    old, new = _verdicts(path)
    assert new == old == "two zip records are named 'archive/data/7'" and _runs(path)
    names = [b"archive/data/%d" % i for i in range(40)] + [b"archive/data/%d" % i for i in
                                                          range(30, 45)]
    _empties(path, len(names), names=names)
    old, new = _verdicts(path)
    assert new == old == "two zip records are named 'archive/data/30'" and len(_runs(path)) > 2


def _set_offset(path, name, offset: int | None, shift: int = 0) -> None:
    """Make the directory entry named `name` (each of a set of names) point at `offset` (or
    `shift` bytes further)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        pos = zf.start_dir
    while data[pos:pos + 4] == b"PK\x01\x02":
        nlen, xlen, clen = struct.unpack_from("<HHH", data, pos + 28)
        if bytes(data[pos + 46:pos + 46 + nlen]) in (name if isinstance(name, set) else {name}):
            was = struct.unpack_from("<I", data, pos + 42)[0]
            data[pos + 42:pos + 46] = struct.pack("<I", was + shift if offset is None else offset)
        pos += 46 + nlen + xlen + clen
    path.write_bytes(bytes(data))


def test_a_record_pointed_into_a_run_overlaps(tmp_path):
    path = tmp_path / "m.pt"
    _empties(path, 60, full={30})
    _set_offset(path, b"archive/version", _local_header(path, b"archive/data/12"))
    old, new = _verdicts(path)
    assert new == old and isinstance(old, str)
    _empties(path, 60, full={30})
    _set_offset(path, b"archive/data/30", _local_header(path, b"archive/data.pkl"))
    old, new = _verdicts(path)
    assert new == old and isinstance(old, str)


def test_a_run_cut_by_the_end_of_the_file(tmp_path):
    """Local headers past the end of the file (a truncated copy), or where the directory is."""
    path = tmp_path / "m.pt"
    tail = {b"archive/data/%d" % i for i in range(50, 60)} | {b"archive/version"}
    _empties(path, 60)
    size = path.stat().st_size
    _set_offset(path, tail, None, shift=size - _local_header(path, b"archive/data/50"))
    old, new = _verdicts(path)
    assert new == old and isinstance(old, dict) and _runs(path)[-1].end > size
    assert [n for n, at in old.items() if at is None][:1] == ["archive/data/50"]
    _empties(path, 60)
    with zipfile.ZipFile(path) as zf:
        start = zf.start_dir
    _set_offset(path, tail, None, shift=start - _local_header(path, b"archive/data/50"))
    old, new = _verdicts(path)
    assert new == old and "no local header" in old


def test_random_damage_gives_the_same_verdict(tmp_path):
    """Bytes flipped anywhere in the local headers or the directory of torch's own file."""
    data = MODEL.read_bytes()
    with zipfile.ZipFile(MODEL) as zf:
        start = zf.start_dir
    runs = _runs(MODEL)
    lo = runs[0].header
    rng = random.Random(9)
    path = tmp_path / "m.pt"
    for _ in range(150):
        damaged = bytearray(data)
        for _ in range(rng.choice((1, 1, 2))):
            at = rng.choice((rng.randrange(lo, runs[-1].end), rng.randrange(start, len(data))))
            damaged[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        old, new = _verdicts(path)
        assert new == old
