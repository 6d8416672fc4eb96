"""A large data.pkl is read, CRC-checked and scanned in chunks (pickle_bytes.RecordChunks,
fastpickle.prepare_chunks_for_c) so that PiecesReader frees its bytes as the C unpickler reads
them. Differential: on every fixture pickle and on forged ones, whatever the chunk sizes (down to
one byte, so every token, long string, EMPTY_DICT and STOP meets a chunk boundary), the chunked
scan gives the verdict of the scan of one piece and, when it accepts, the same bytes and so the
same objects; through `read_torch_file`, a damaged data.pkl is refused with the same words, and
a pickle the scan declines or the C unpickler fails on gets the bounded reader's verdict from
the record read again."""

from __future__ import annotations

import gc
import io
import weakref
import zlib

import damage as D
import pytest
from conftest import FIXTURES
from test_fast_unpickle import AMPLIFIED, FORGED, PICKLES, _key, forged, same

from zinspect.core import torchzip
from zinspect.core.fastpickle import (
    _DICT_CALL,
    _LONGEST_TOKEN,
    _NAME_MAX,
    PiecesReader,
    _opcode_runs,
    prepare_chunks_for_c,
    prepare_for_c,
)
from zinspect.core.pickle_bytes import RecordChunks
from zinspect.core.torchzip import FastMetaUnpickler, read_torch_file
from zinspect.core.unpickle import MAX_STRING
from zinspect.errors import UnreadableFile

pytestmark = pytest.mark.skipif(_opcode_runs(16) is None,
                                reason="the fast path needs Python 3.11 (possessive repeats)")

#: each real pickle once (many ranks' pickles are the same bytes)
DISTINCT = list({raw: name for name, raw in PICKLES}.items())
SIZES = (1, 2, 3, 7, 64)


class Window(bytearray):
    """A chunk the test can watch being freed (bytes cannot be weakly referenced)."""


def chunker(raw: bytes, cuts) -> tuple:
    """A `next_chunk` giving `raw` cut at the offsets `cuts` (with the carry in front), and
    the list of weak references to the chunks it gave."""
    bounds = sorted({0, len(raw), *(c for c in cuts if 0 < c < len(raw))})
    spans, given = iter(zip(bounds, bounds[1:], strict=False)), []

    def next_chunk(carry: bytes) -> Window | None:
        span = next(spans, None)
        if span is None:
            return None
        window = Window(carry + raw[span[0]:span[1]])
        given.append(weakref.ref(window))
        return window
    return next_chunk, given


def every(size: int, raw: bytes) -> range:
    return range(size, len(raw), size)


def scan_in_chunks(raw: bytes, cuts) -> list | None:
    return prepare_chunks_for_c(chunker(raw, cuts)[0], len(raw))


def joined(pieces: list | None) -> bytes | None:
    return None if pieces is None else b"".join(pieces)


def load(pieces: list, nbytes: int):
    up = FastMetaUnpickler(io.BufferedReader(PiecesReader(pieces), 1 << 16), budget_bytes=nbytes)
    return up.load(), up


@pytest.mark.parametrize("size", [*SIZES, None], ids=[*map(str, SIZES), "whole"])
def test_every_fixture_pickle_in_chunks_is_read_as_in_one_piece(size):
    for raw, name in DISTINCT:
        whole = prepare_for_c(raw)
        assert whole is not None, name
        chunked = scan_in_chunks(raw, every(size or len(raw), raw))
        assert joined(chunked) == joined(whole), name
        (a, fast), (b, one) = load(chunked, len(raw)), load(whole, len(raw))
        assert same(a, b), name
        assert fast.storages == one.storages and fast.unknown_globals == one.unknown_globals


def test_the_file_reader_gives_the_same_chunks_and_crc():
    """RecordChunks itself (anonymous maps, the CRC as it goes), in 64-byte chunks."""
    for raw, name in DISTINCT:
        chunks = RecordChunks(io.BytesIO(b"head" + raw + b"tail"), 4, len(raw), 64)
        assert joined(prepare_chunks_for_c(chunks, len(raw))) == joined(prepare_for_c(raw))
        assert chunks.intact(zlib.crc32(raw)), name
        assert not RecordChunks(io.BytesIO(raw), 0, len(raw), 64).intact(
            zlib.crc32(raw) ^ 1)
    short = RecordChunks(io.BytesIO(raw), 0, len(raw) + 1, 64)
    assert prepare_chunks_for_c(short, len(raw) + 1) is None
    assert not short.intact(zlib.crc32(raw)) and short.short


def _global(module: int, name: int) -> bytes:
    return b"c" + b"m" * module + b"\n" + b"n" * name + b"\n0"


SMALL = {  # (pickle, accepted by the scan)
    "dicts and STOP": (b"\x80\x02}(" + _key("a") + b"}" + _key("b") + b"}}u.", True),
    "the longest GLOBAL": (b"\x80\x02" + _global(_NAME_MAX, _NAME_MAX) + b"}.", True),
    "a GLOBAL one too long": (b"\x80\x02" + _global(_NAME_MAX + 1, 1) + b"}.", False),
    "a long string": (b"\x80\x02}(" + _key("s") + _key("x" * 700) + b"u.", True),
    "long bytes": (b"\x80\x02}(" + _key("b") + b"B" + (900).to_bytes(4, "little") +
                   b"\x00" * 900 + b"u.", True),
    "short strings": (b"\x80\x02(" + b"".join(_key("k" * i) for i in range(0, 300, 37)) +
                      b"t.", True),
    "a bad opcode past a long token": (b"\x80\x02" + _global(200, 200) + b"\xff" * 600 + b".",
                                       False),
    "a bad opcode at the end": (b"\x80\x02}N\xff", False),
    "no STOP": (b"\x80\x02}(" + _key("a") + b"}u", False),
    "a string past the end": (b"\x80\x02X" + (50).to_bytes(4, "little") + b"abc", False),
    "a cut string header": (b"\x80\x02}X\x05\x00", False),
    "a string over MAX_STRING": (b"\x80\x02X" + (MAX_STRING + 1).to_bytes(4, "little") +
                                 b"x" * (MAX_STRING + 1) + b".", False),
    "a huge memo index": (b"\x80\x02Nr\xfe\xff\xff\xff.", False),
}


@pytest.mark.parametrize("what", list(SMALL))
def test_a_pickle_cut_anywhere_gets_the_same_verdict_and_bytes(what):
    """Cut at every offset (so each token, EMPTY_DICT and STOP meets a boundary), into every
    small size, and for the long strings across many chunks."""
    raw, accepted = SMALL[what]
    whole = joined(prepare_for_c(raw))
    assert (whole is not None) == accepted
    if accepted:
        assert whole == raw.replace(b"}", _DICT_CALL)
    cuts = [[i] for i in range(len(raw) + 1)] if len(raw) < 5000 else []
    for size in SIZES:
        cuts.append(every(size, raw))
    for cut in cuts:
        assert joined(scan_in_chunks(raw, cut)) == whole, (what, cut)


@pytest.mark.parametrize("what", [*FORGED, *AMPLIFIED])
def test_forged_pickles_get_the_same_verdict_in_chunks(what):
    """The forged pickles of test_fast_unpickle (scanned, not loaded: the subprocess tests
    load them): declined or accepted alike, with the same bytes."""
    raw = FORGED[what][0] if what in FORGED else AMPLIFIED[what]
    whole = joined(prepare_for_c(raw))
    for size in (7, 64, 4096, len(raw)):
        assert joined(scan_in_chunks(raw, every(size, raw))) == whole, (what, size)


def test_a_long_string_is_skipped_across_chunks_and_the_chunks_are_views():
    """A 1 MiB string spans many chunks; each piece is a view of one chunk, never a copy."""
    raw = forged(_key("s") + _key("x" * MAX_STRING))
    next_chunk, given = chunker(raw, every(4096, raw))
    pieces = prepare_chunks_for_c(next_chunk, len(raw))
    assert joined(pieces) == joined(prepare_for_c(raw))
    views = [p for p in pieces if isinstance(p, memoryview)]
    assert views and all(type(p.obj) is Window for p in views)
    assert all(len(p) <= 4096 + _LONGEST_TOKEN for p in pieces)


def test_pieces_reader_frees_each_chunk_once_read():
    raw = max(DISTINCT, key=lambda r: len(r[0]))[0]
    next_chunk, given = chunker(raw, every(512, raw))
    stream = io.BufferedReader(PiecesReader(prepare_chunks_for_c(next_chunk, len(raw))), 1024)
    gc.collect()
    assert len(given) > 20 and all(ref() is not None for ref in given)
    stream.read(len(raw) // 2)
    gc.collect()
    alive = [ref() is not None for ref in given]
    assert not any(alive[:len(given) // 3]) and all(alive[-len(given) // 3:])
    stream.read()
    gc.collect()
    assert not any(ref() is not None for ref in given)


# ----------------------------------------------------------------- through read_torch_file
def _rank_files() -> list:
    return sorted(p for p in FIXTURES.rglob("*.pt") if "model_states" in p.name)[::4]


def test_read_torch_file_in_chunks_reads_the_same_objects(monkeypatch):
    """Every 4th fixture model-states file read with 64-byte chunks: the C unpickler reads all
    of them (the bounded reader is never asked) and builds what the whole read builds."""
    files = _rank_files()
    assert len(files) > 20
    wholes = [read_torch_file(p) for p in files]
    monkeypatch.setattr(torchzip, "PICKLE_CHUNK_BYTES", 64)
    monkeypatch.setattr(torchzip, "_bounded_load", None)
    for path, whole in zip(files, wholes, strict=True):
        chunked = read_torch_file(path)
        assert same(chunked.obj, whole.obj), path
        assert chunked.storages == whole.storages, path
        assert chunked.unknown_globals == whole.unknown_globals, path


def _verdict(path) -> str:
    try:
        tf = read_torch_file(path)
    except UnreadableFile as e:
        return f"unreadable {e.message} / {e.hint}"
    return f"ok {sorted(tf.storages.values())} {tf.obj!r}"


def _model_file(tmp_path):
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    return next((root / D.TAG).glob("*model_states.pt"))


def test_a_damaged_pickle_is_refused_with_the_same_message_in_chunks(tmp_path, monkeypatch):
    """A name changed by one letter: still a pickle both readers would take, but not the one
    the CRC was computed on."""
    path = _model_file(tmp_path)
    off, size = D.zip_entry(path, "data.pkl")
    at = D.pickle_of(path).index(b"optimizer")
    with open(path, "r+b") as f:
        f.seek(off + at)
        f.write(b"O")
    whole = _verdict(path)
    assert "data.pkl fails its CRC check" in whole
    for chunk in (7, 64, size - 1):
        monkeypatch.setattr(torchzip, "PICKLE_CHUNK_BYTES", chunk)
        assert _verdict(path) == whole


@pytest.mark.parametrize("what,reaches_c", [("SETITEMS on a list", True),
                                            ("huge memo index", False)])
def test_a_pickle_the_fast_path_cannot_read_is_read_again_by_the_bounded_reader(
        tmp_path, monkeypatch, what, reaches_c):
    """After chunks were freed by a failing C load (or the scan declined), the record is read
    again, whole, and the bounded reader gives its verdict: the one of a whole read."""
    path = _model_file(tmp_path)
    D.rewrite_pickle(path, FORGED[what][0])
    whole = _verdict(path)
    assert whole.startswith("unreadable" if reaches_c else "ok")
    calls = []
    fast_load, read_at = torchzip._fast_load, torchzip.read_at
    monkeypatch.setattr(torchzip, "PICKLE_CHUNK_BYTES", 64)
    monkeypatch.setattr(torchzip, "_fast_load",
                        lambda *a: calls.append("C") or fast_load(*a))
    monkeypatch.setattr(torchzip, "read_at",
                        lambda *a: calls.append("read again") or read_at(*a))
    assert _verdict(path) == whole
    assert calls == (["C", "read again"] if reaches_c else ["read again"])
