"""Hostile zips against the runs of zero-byte records (zipruns): whatever is done to the
directory entries, local headers or pickle keys of a ZeRO-3 model-states file, reading it with
the runs must give what reading it record by record gives (zipcheck.run_at finding no run):
the same refusal word for word, or the same records, storages and validate report.

Every zip here is a copy of torch's own model states of s3_w4_bf16 (its placeholders: data/1
alone, runs data/2-9 and data/10-25, data/29 alone) with bytes rewritten.
"""

from __future__ import annotations

import contextlib
import io
import random
import struct
from pathlib import Path

import damage
import pytest
from conftest import tag_dir

from zinspect import cli
from zinspect.core import zipcheck
from zinspect.core.load import _storages
from zinspect.core.torchzip import open_exact, read_torch_file
from zinspect.errors import UnreadableFile

MODEL = tag_dir("s3_w4_bf16") / damage.z3_model_name(0)
ROOT = b"zero_pp_rank_0_mp_rank_00_model_states/data/"


def _central(data) -> dict[bytes, int]:
    """Leaf name (after ROOT, or the whole name) -> where its central entry starts."""
    end = bytes(data).rfind(b"PK\x05\x06")
    pos, out = struct.unpack_from("<I", data, end + 16)[0], {}
    while data[pos:pos + 4] == b"PK\x01\x02":
        nlen, xlen, clen = struct.unpack_from("<HHH", data, pos + 28)
        out.setdefault(bytes(data[pos + 46:pos + 46 + nlen]).removeprefix(ROOT), pos)
        pos += 46 + nlen + xlen + clen
    return out


def _header(data, leaf: bytes) -> int:
    return struct.unpack_from("<I", data, _central(data)[leaf] + 42)[0]


def _read(path) -> tuple:
    """read_torch_file's records and storages (load's list, less the zero-element storages
    with nothing missing it leaves out for runs), or its refusal."""
    try:
        tf = read_torch_file(path)
    except UnreadableFile as e:
        return ("refused", str(e))
    return ({k: (r.size, r.present, r.data_offset, r.header_offset, r.crc)
             for k, r in tf.records.items()},
            {k: (v.dtype, v.numel) for k, v in tf.storages.items()},
            sorted((s.key, s.nbytes, s.present, s.offset) for s in _storages(tf)
                   if s.numel or s.present < s.nbytes))


def _both(monkeypatch, fn, *args):
    """(with runs, record by record) of fn(*args)."""
    fast = fn(*args)
    with monkeypatch.context() as m:
        m.setattr(zipcheck, "run_at", lambda *_: None)
        slow = fn(*args)
    return fast, slow


def _has_runs(path) -> bool:
    f, size = open_exact(path)
    with f:
        return bool(zipcheck.read_directory(f, size).runs)


def _rewritten(tmp_path, *edits) -> Path:
    """A copy of MODEL with each edit (leaf, 'local'/'central', field offset, struct format,
    value) applied in order."""
    data = bytearray(MODEL.read_bytes())
    for leaf, where, at, fmt, value in edits:
        base = _header(data, leaf) if where == "local" else _central(data)[leaf]
        struct.pack_into(fmt, data, base + at, value)
    path = tmp_path / "m.pt"
    path.write_bytes(bytes(data))
    return path


def _name(leaf: bytes, new: bytes, where=("local", "central")) -> list:
    """Edits renaming `leaf` to `new` (as long) in its local header and/or central entry."""
    at = {"local": 30, "central": 46}
    return [(leaf, w, at[w] + len(ROOT), f"{len(new)}s", new) for w in where]


def test_a_long_local_name_before_a_run_is_quoted_as_record_by_record(tmp_path, monkeypatch):
    """data/1's local header says its name is 10 bytes longer: the message quotes the local
    bytes of the window of headers read; record by record that window reads on over the run,
    with the runs it ended before it (the message differed until refusals were worded by
    the record-by-record check)."""
    path = _rewritten(tmp_path, (b"1", "local", 26, "<H", len(ROOT) + 1 + 10))
    fast, slow = _both(monkeypatch, _read, path)
    assert _has_runs(path) and fast[0] == "refused"
    assert fast == slow and "data/1FB" in fast[1] and "(55 bytes long, the directory's 45)" in fast[1]


FIELDS = [(4, "<H", 20), (6, "<H", 0x808), (6, "<H", 1), (8, "<H", 8), (10, "<H", 7),
          (14, "<I", 1), (18, "<I", 5), (22, "<I", 5), (26, "<H", len(ROOT) - 1),
          (26, "<H", len(ROOT) + 12), (28, "<H", 0), (28, "<H", 200), (0, "<I", 0)]


@pytest.mark.parametrize("leaf", [b"1", b"2", b"9", b"10", b"15", b"25", b"29"])
@pytest.mark.parametrize("at,fmt,value", FIELDS)
def test_a_local_header_field_changed_in_or_beside_a_run(tmp_path, monkeypatch, leaf, at, fmt,
                                                         value):
    """version, flags (a data descriptor, encryption), method, time, crc, sizes, name and
    extra lengths, signature: of the first, a middle or the last record of a run, or of the
    lone empty records just before and after one."""
    path = _rewritten(tmp_path, (leaf, "local", at, fmt, value))
    fast, slow = _both(monkeypatch, _read, path)
    assert _has_runs(path) and fast == slow


@pytest.mark.parametrize("at,fmt,value", [(6, "<H", 20), (8, "<H", 0x808), (10, "<H", 8),
                                          (12, "<H", 7), (16, "<I", 1), (20, "<I", 5),
                                          (24, "<I", 5), (38, "<I", 1), (42, "<I", 0),
                                          (42, "<I", 9024 + 64), (42, "<I", 7232)])
def test_a_central_field_changed_in_the_middle_of_a_run(tmp_path, monkeypatch, at, fmt, value):
    """A directory entry inside data/10-25 differs in one field (its offset: the record
    before it, half a record on, or another run's): the run ends there."""
    path = _rewritten(tmp_path, (b"15", "central", at, fmt, value))
    fast, slow = _both(monkeypatch, _read, path)
    assert _has_runs(path) and fast == slow


@pytest.mark.parametrize("new", [b"+5", b"05", "٣".encode(), b"1 ", b" 1", b"14", b"16",
                                 b"26", b"29"])
@pytest.mark.parametrize("where", [("central",), ("local", "central")])
def test_a_name_in_a_run_spelled_otherwise(tmp_path, monkeypatch, new, where):
    """data/15 renamed: not a number, a leading zero, an Arabic-Indic digit, a space, the
    name of a run's record or of a record read alone (a repeat)."""
    path = _rewritten(tmp_path, *_name(b"15", new, where))
    fast, slow = _both(monkeypatch, _read, path)
    assert _has_runs(path) and fast == slow
    assert fast[0] == "refused" if new.isdigit() and new[:1] != b"0" or len(where) == 1 else \
        fast[0] != "refused"


@pytest.mark.parametrize("leaf,new", [(b"1", b"5"), (b"1", b"0"), (b"29", b"12"),
                                      (b"29", b"09"), (b"26", b"15"), (b"30", b"09"),
                                      (b"5", b"1")])
def test_a_record_read_alone_named_like_one_in_a_run(tmp_path, monkeypatch, leaf, new):
    """The same number twice (refused), or spelled another way (two records)."""
    path = _rewritten(tmp_path, *_name(leaf, new))
    fast, slow = _both(monkeypatch, _read, path)
    assert _has_runs(path) and fast == slow
    assert (fast[0] == "refused") == (new == b"0" or new[:1] != b"0")


def _shifted(leaves, by: int) -> list:
    return [(leaf, "central", 42, "<I", struct.unpack_from(
        "<I", MODEL.read_bytes(), _central(MODEL.read_bytes())[leaf] + 42)[0] + by)
        for leaf in leaves]


RUN10 = [b"%d" % i for i in range(10, 26)]
AFTER = [b"%d" % i for i in range(26, 31)] + [b"zero_pp_rank_0_mp_rank_00_model_states/version",
                                             b"zero_pp_rank_0_mp_rank_00_model_states/.data/"
                                             b"serialization_id"]


@pytest.mark.parametrize("edits", [
    _shifted(RUN10, 1), _shifted(RUN10, 64), _shifted(RUN10, -128), _shifted(RUN10, 2048),
    _shifted(RUN10 + AFTER, 11512 - 10176 - 64),  # the run's end over the directory
    _shifted(RUN10 + AFTER, 15041 - 10176 - 64),  # past the end of the file
    _shifted([b"%d" % i for i in range(2, 10)], 1024),  # onto data/10-25's headers
    [(AFTER[-2], "central", 42, "<I", 9024)],  # version at data/16's header
    [(b"zero_pp_rank_0_mp_rank_00_model_states/data.pkl", "central", 42, "<I", 9024)],
    [(b"26", "central", 42, "<I", 9024 + 40)],  # inside data/16's padding
    [(b"15", "central", 42, "<I", 0)],  # data/15 at data.pkl
    [(b"1", "central", 42, "<I", 7232)], [(b"0", "central", 42, "<I", 7232)],
])
def test_records_moved_over_and_around_runs(tmp_path, monkeypatch, edits):
    path = _rewritten(tmp_path, *edits)
    fast, slow = _both(monkeypatch, _read, path)
    assert _has_runs(path) and fast == slow and fast[0] == "refused"


def test_random_damage_to_headers_around_runs(tmp_path, monkeypatch):
    """800 zips with 1-3 bytes of the local headers and central entries changed (bit flips,
    any byte, small steps): record by record or with runs, the same."""
    data = MODEL.read_bytes()
    central = sorted(_central(data).values())
    local = sorted(struct.unpack_from("<I", data, at + 42)[0] for at in central)
    rng = random.Random(3)
    path = tmp_path / "m.pt"
    refused = 0
    for _ in range(800):
        damaged = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3))):
            if rng.random() < 0.6:
                at = rng.choice(local) + rng.choice((rng.randrange(30), 26, 27, 28, 8, 14, 22,
                                                     rng.randrange(30, 80)))
            else:
                at = rng.choice(central) + rng.choice((rng.randrange(46), 42, 43, 28, 24,
                                                       rng.randrange(46, 90)))
            how = rng.random()
            damaged[at] = damaged[at] ^ 1 << rng.randrange(8) if how < 0.4 else \
                rng.randrange(256) if how < 0.7 else \
                (damaged[at] + rng.choice((1, -1, 10, -10, 64, 128))) % 256
        path.write_bytes(bytes(damaged))
        fast, slow = _both(monkeypatch, _read, path)
        assert fast == slow
        refused += fast[0] == "refused"
    assert 200 < refused < 700  # both kinds of verdict were compared


def _validate(root) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main(["validate", "--json", str(root)])
    return rc, out.getvalue()


@pytest.mark.parametrize("old,new", [(b"15", b"09"), (b"15", b"+9"), (b"15", "٣".encode()),
                                     (b"15", b"99"), (b"15", b"1"), (b"0", b"5"), (b"0", b"05"),
                                     (b"26", b"12")])
def test_pickle_keys_pointing_into_runs(tmp_path, monkeypatch, old, new):
    """A storage key of the pickle renamed: to another spelling of a run's record, to no
    record, to a run's empty record for a storage of 60 bytes (missing bytes), or for a tensor
    reaching past it (refused): validate --json says the same."""
    root = damage.copy_root(tmp_path, "s3_w4_bf16")
    path = root / damage.TAG / damage.z3_model_name(0)
    raw = damage.pickle_of(path)
    key = b"X" + struct.pack("<I", len(old)) + old
    assert key in raw
    damage.rewrite_pickle(path, raw.replace(key, b"X" + struct.pack("<I", len(new)) + new))
    assert _has_runs(path)
    fast, slow = _both(monkeypatch, _read, path)
    assert fast == slow
    fast, slow = _both(monkeypatch, _validate, root)
    assert fast == slow and (fast[0] == 0) == (old != b"0" and new != b"12")
