"""Read what a `torch.save` file describes without reading its tensor bytes and without torch.

Two container formats exist:

* zip (torch >= 1.6, DeepSpeed's default): `<root>/data.pkl`, `<root>/data/<key>` records stored
  uncompressed and 64-byte aligned, then the central directory at the end of the file.
* legacy: a run of pickles (magic, protocol, sys info, the object, the storage keys) followed by
  each storage as an 8-byte element count and its raw bytes.

The object pickle is loaded by `MetaUnpickler` (zinspect.core.torchpickle), which never imports
a module or calls anything the pickle names: tensors become `TensorRef` descriptors, a short
allowlist of harmless builtins is honoured, and every other global becomes an inert `Opaque`
record. A hostile pickle therefore cannot run code here; at worst it yields records the caller
ignores. Its time and memory are bounded by its size (zinspect.core.unpickle): past a budget
the file is unreadable. Large ones take the C paths (fastpickle, pickle_runs; pickle_bytes).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field

from zinspect.core import pickle_runs
from zinspect.core.fastpickle import PiecesReader, prepare_chunks_for_c, prepare_for_c
from zinspect.core.pickle_bytes import PICKLE_CHUNK_BYTES, PickleMemo, RecordChunks, read_at
from zinspect.core.readfiles import open_regular

# the descriptors and unpickler rules (torchpickle) and the zip directory (zipcheck) are
# re-exported: `from zinspect.core.torchzip import TensorRef` is what the rest of zinspect uses
from zinspect.core.torchpickle import (  # noqa: F401 - re-exported
    _ALLOWED,
    DTYPE_ALIASES,
    DTYPE_SIZES,
    KNOWN_CLASSES,
    MAX_NUMEL,
    STORAGE_DTYPES,
    DType,
    EnumInt,
    FastMetaUnpickler,
    MetaUnpickler,
    Opaque,
    StorageRef,
    TensorRef,
    ZeroStageEnum,
)
from zinspect.core.unpickle import PickleBudgetExceeded
from zinspect.core.zip_recover import walk_local_headers
from zinspect.core.zipcheck import (  # noqa: F401 - re-exported
    LOCAL_HEADER,
    Directory,
    NoZipDirectory,
    Record,
    Records,
    ZipStructureError,
    _directory_span,
    _tail,
    central_directory,
    check_directory,
    check_records,
    directory_offset,
    local_data_offset,
    read_directory,
)
from zinspect.errors import UnreadableFile

_SCALAR_CODES = {"float32": "f", "float64": "d", "int64": "q", "int32": "i"}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: a data.pkl larger than this is refused rather than parsed (real ones are KB to a few tens of MB)
MAX_PICKLE_BYTES = 1 << 30
#: pickles from this size on are offered to the C unpickler (fastpickle.prepare_for_c); smaller
#: ones are read faster by the bounded reader than the scan's regex is compiled (~0.1 s, once)
FAST_PICKLE_BYTES = 256 << 10


@dataclass
class TorchFile:
    """The metadata of one torch.save file."""

    path: str
    size: int
    format: str  # "zip" or "legacy"
    obj: object
    storages: dict[str, StorageRef]
    records: Records
    unknown_globals: set[str] = field(default_factory=set)
    #: the central directory was missing and the records were found by walking local headers
    recovered: bool = False
    #: a zip's data.pkl: (start, size, CRC-32), where a later file's same pickle is proven
    pickle: tuple[int, int, int] | None = None

    def data_offset(self, key: str) -> int | None:
        rec = self.records.get(key)
        if rec is None:
            return None
        if rec.data_offset is None and rec.header_offset is not None:
            with open_exact(self.path)[0] as f:
                f.seek(rec.header_offset)
                rec.data_offset = local_data_offset(rec.header_offset, f.read(LOCAL_HEADER))
        return rec.data_offset

    def tensor_offset(self, t: TensorRef) -> int | None:
        """Absolute file offset of the tensor's first element (None if its record is missing)."""
        base = self.data_offset(t.storage.key)
        return None if base is None else base + t.offset * t.itemsize

    def read_scalar(self, t: TensorRef) -> float | int | None:
        """The value of a one-element tensor (an optimizer's `step`): one tiny read."""
        code = _SCALAR_CODES.get(t.dtype)
        offset = self.tensor_offset(t)
        if code is None or offset is None or t.numel != 1:
            return None
        try:
            with open_exact(self.path)[0] as f:
                f.seek(offset)
                raw = f.read(t.itemsize)
        except (OSError, UnreadableFile):
            return None
        return struct.unpack("<" + code, raw)[0] if len(raw) == t.itemsize else None

def open_exact(path: str | os.PathLike) -> tuple[io.FileIO, int]:
    """The file at `path`, unbuffered for exact spans (no read-ahead), and its size. Only a
    regular file (or a link to one) is opened, and never with a blocking open: a FIFO or
    device put under the name after it was examined is refused (readfiles.open_regular)."""
    f = open(path, "rb", buffering=0, opener=_open_regular)
    try:
        return f, os.fstat(f.fileno()).st_size
    except BaseException:
        f.close()
        raise


def _open_regular(path: str, flags: int) -> int:
    return open_regular(path)


def read_torch_file(path: str | os.PathLike, memo: PickleMemo | None = None) -> TorchFile:
    """Parse the metadata of a torch.save file. Raises `UnreadableFile` with the cause.
    With a `memo`, a data.pkl with the same bytes as one read before is not unpickled again."""
    path = os.fspath(path)
    try:
        f, size = open_exact(path)
        with f:
            head = f.read(4)
            if size == 0:
                raise UnreadableFile(f"{path}: the file is empty (0 bytes)",
                                     "the save was interrupted; restore this file from a copy")
            if head == b"PK\x03\x04":
                return _read_zip(f, path, size, memo)
            if head[:1] == b"\x80":
                return _read_legacy(io.BufferedReader(f), path, size)  # pickle reads bytewise
    except PermissionError as e:
        raise UnreadableFile(f"{path}: permission denied",
                             "check the file's permissions (chmod +r) or run as its owner") from e
    except OSError as e:
        raise UnreadableFile(f"{path}: cannot read ({e.strerror or e})", "check the file") from e
    raise UnreadableFile(f"{path}: not a torch.save file (starts with {head!r})",
                         "its name says it is part of the checkpoint, but its bytes are not a "
                         "torch.save file: restore it from a copy or copy it again")


def zip_is_complete(path: str | os.PathLike) -> bool:
    """True when the file ends with a zip end record whose central directory lies inside it:
    a cheap test that a torch.save zip was not cut short, without parsing anything else."""
    try:
        f, size = open_exact(path)
        with f:
            tail = _tail(f, size)
    except (OSError, UnreadableFile):
        return False
    try:
        _, cd_size, cd_offset, end = _directory_span(tail)
    except NoZipDirectory:
        return False
    return cd_offset + cd_size <= size - (len(tail) - end)


def pickle_is_intact(path: str | os.PathLike) -> bool:
    """True when the file is a whole torch.save zip whose data.pkl passes its CRC check: what
    `read_torch_file` would accept, without unpickling (the slow part)."""
    try:
        f, size = open_exact(path)
        with f:
            entries = read_directory(f, size).entries
            pkl = [e for e in entries if e[0] == "data.pkl" or e[0].endswith("/data.pkl")]
            if len(pkl) != 1 or pkl[0][2] != 0 or pkl[0][3] > MAX_PICKLE_BYTES:
                return False
            start = _record_start(f, pkl[0][1], size)
            return start is not None and RecordChunks(f, start, pkl[0][3]).intact(pkl[0][4])
    except (NoZipDirectory, OSError, UnreadableFile):
        return False


def _load_pickle(data: bytes | io.BufferedIOBase, path: str, legacy: bool = False,
                 budget_bytes: int | None = None):
    """Unpickle `data` (bytes, or a stream positioned at a pickle). The parsing budgets scale
    with `budget_bytes` (default: the length of `data`): what a pickle of that size can need.
    Bytes from FAST_PICKLE_BYTES on go to the C unpickler when `prepare_for_c` proves it safe on
    them (the fast path never reports an error: on any, the bounded reader reads the pickle
    again and says why)."""
    if budget_bytes is None:
        budget_bytes = len(data)
    if isinstance(data, (bytes, bytearray)) and len(data) >= FAST_PICKLE_BYTES:
        pieces = prepare_for_c(bytes(data))
        loaded = None if pieces is None else _fast_load(pieces, legacy, budget_bytes)
        if loaded is not None:
            return loaded
    return _bounded_load(data, path, legacy, budget_bytes)


def _fast_load(pieces: list, legacy: bool, budget_bytes: int, reader=FastMetaUnpickler):
    """The C unpickler on what `prepare_for_c` (or pickle_runs) proved, or None on any error."""
    # buffered: the C unpickler then reads ahead in blocks (peek) instead of asking the
    # stream for each opcode's bytes: 2x faster (1.0 -> 0.5 s bare at 297k names)
    fast = reader(io.BufferedReader(PiecesReader(pieces), 1 << 16), legacy=legacy,
                  budget_bytes=budget_bytes)
    try:
        return fast.load(), fast
    except Exception:  # noqa: BLE001 - any doubt goes to the bounded reader
        return None


def _bounded_load(data: bytes | io.BufferedIOBase, path: str, legacy: bool, budget_bytes: int):
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    up = MetaUnpickler(stream, legacy=legacy, budget_bytes=budget_bytes)
    try:
        return up.load(), up
    except (RecursionError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError, UnicodeDecodeError, struct.error, OverflowError,
            MemoryError) as e:
        what = ("the pickle nests too deeply to read" if isinstance(e, RecursionError) else
                f"its pickle exceeds a parsing budget: {e}" if isinstance(e, PickleBudgetExceeded)
                else f"its pickle is corrupt ({type(e).__name__}: {str(e)[:200]})")
        error = UnreadableFile(f"{path}: {what}"[:400], _CORRUPT)
        error.unknown_globals = frozenset(up.unknown_globals)  # a payload before the damage
        raise error from e


def _load_chunked(f, path: str, start: int, nbytes: int, crc: int):
    """A large data.pkl read, CRC-checked and scanned in chunks (pickle_bytes), freed as the C
    unpickler reads them; read again whole for the bounded reader if either fails. One that
    holds a run of ZeRO-3 placeholders is read whole first, for pickle_runs."""
    chunks = RecordChunks(f, start, nbytes, PICKLE_CHUNK_BYTES)
    first = chunks.peek()
    runs = first is not None and pickle_runs.may_hold_run(first, nbytes)
    del first
    if runs:
        loaded = _load_runs(f, path, start, nbytes, crc)
        if loaded is not None:
            return loaded
        chunks = RecordChunks(f, start, nbytes, PICKLE_CHUNK_BYTES)  # (read from the start)
    pieces = prepare_chunks_for_c(chunks, nbytes)
    if not chunks.intact(crc):
        raise _damaged(path)
    loaded = None if pieces is None else _fast_load(pieces, False, nbytes)
    if loaded is not None:
        return loaded
    del pieces
    return _bounded_load(_read_intact(f, path, start, nbytes, crc), path, False, nbytes)


def _load_runs(f, path: str, start: int, nbytes: int, crc: int):
    """`_load_chunked`'s first try where the first chunk holds a run's first entry: read whole
    for pickle_runs (no run found: the bytes go the usual way, `_load_pickle`); None when the
    C unpickler fails on its stubs (the file is read again in chunks then)."""
    raw = _read_intact(f, path, start, nbytes, crc)
    try:
        pieces = pickle_runs.prepare_with_runs(raw)
    except Exception:  # noqa: BLE001 - any doubt goes to the usual path
        pieces = None
    if pieces is None:
        return _load_pickle(raw, path)
    del raw  # (the pieces are copies: the C unpickler does not keep the 47 MB alive)
    return _fast_load(pieces, False, nbytes, reader=pickle_runs.RunUnpickler)


def _read_intact(f, path: str, start: int, nbytes: int, crc: int) -> bytes:
    """A data.pkl's `nbytes` from `start`, all there and with the CRC-32 `crc`, or raise."""
    raw = read_at(f, start, nbytes)
    if raw is None or zlib.crc32(raw) != crc:
        raise _damaged(path)
    return raw


def _damaged(path: str) -> UnreadableFile:
    return UnreadableFile(f"{path}: data.pkl fails its CRC check (the bytes are damaged)",
                          _CORRUPT)


_CORRUPT = "the file is damaged; restore it from a copy or re-save the checkpoint"


def _read_zip(f, path: str, size: int, memo: PickleMemo | None = None) -> TorchFile:
    try:
        directory = read_directory(f, size)
    except (NoZipDirectory, OSError):
        return _recover(f, path, size)
    records, (header, comp, pkl_size, pkl_crc) = _zip_records(f, path, size, directory)
    del directory  # not kept while the pickle is read
    if comp != 0 or pkl_size > MAX_PICKLE_BYTES:
        raise UnreadableFile(f"{path}: data.pkl is {'compressed' if comp else 'too large'}",
                             _CORRUPT)
    start = _record_start(f, header, size)
    kept = 0 if memo is None else memo.max_bytes  # a memo keeps pickles up to this size
    if start is not None and pkl_size > max(PICKLE_CHUNK_BYTES, kept):
        obj, up = _load_chunked(f, path, start, pkl_size, pkl_crc)
        return TorchFile(path, size, "zip", obj, up.storages, records, up.unknown_globals,
                         pickle=(start, pkl_size, pkl_crc))
    if start is None:
        raise _damaged(path)
    raw = _read_intact(f, path, start, pkl_size, pkl_crc)
    parsed = memo.get(raw) if memo is not None else None
    if parsed is None:
        obj, up = _load_pickle(raw, path)
        parsed = (obj, up.storages, up.unknown_globals)
        if memo is not None:
            memo.put(raw, parsed)
    obj, storages, unknown_globals = parsed
    return TorchFile(path, size, "zip", obj, storages, records, unknown_globals,
                     pickle=(start, pkl_size, pkl_crc))


def _zip_records(f, path: str, size: int, directory: Directory) -> tuple[Records, tuple]:
    """The Record of each tensor record, checked (`check_directory`), and the data.pkl entry's
    (header offset, compression, size, crc)."""
    pkl = [e for e in directory.entries if e[0] == "data.pkl" or e[0].endswith("/data.pkl")]
    if len(pkl) != 1:
        raise UnreadableFile(f"{path}: a zip file but not a torch.save file (no data.pkl)",
                             _CORRUPT)
    name = pkl[0][0]
    try:
        entries, runs, starts = check_directory(f, size, directory, directory_offset(f, size))
    except ZipStructureError as e:
        raise UnreadableFile(f"{path}: its zip structure is forged or damaged: {e}",
                             _CORRUPT) from e
    data_prefix = name[: -len("data.pkl")] + "data/"
    cut = len(data_prefix)
    tensors = [e for e in entries if e[0].startswith(data_prefix)]  # 300k at 300k names
    compressed = next((e[0] for e in tensors if e[2] != 0), None)
    if compressed is not None:
        raise UnreadableFile(f"{path}: record {compressed[-120:]!r} is compressed",
                             "re-save the checkpoint with torch.save")
    records = {name[cut:]: Record(usize, 0 if start is None else usize if start + usize <= size
                                  else max(0, size - start), start, offset, crc)
               for name, offset, _, usize, crc in tensors
               for start in (starts[name],)}  # what of it lies inside the file
    return Records(records, data_prefix, [r for r in runs if r.prefix.startswith(data_prefix)]), \
        pkl[0][1:]


def _record_start(f, header: int, size: int) -> int | None:
    """Where the data of the record whose local header is at `header` starts."""
    if header + LOCAL_HEADER > size:
        return None
    f.seek(header)
    return local_data_offset(header, f.read(LOCAL_HEADER))


def _recover(f, path: str, size: int) -> TorchFile:
    """A zip cut short: its records found by their local headers (zip_recover)."""
    def pickle_at(f, at: int):
        f.seek(at)
        stream = io.BytesIO(f.read(min(size - at, MAX_PICKLE_BYTES)))
        return (*_load_pickle(stream, path, budget_bytes=size), stream.tell())

    obj, up, records = walk_local_headers(f, size, pickle_at)
    if up is None:
        raise UnreadableFile(f"{path}: truncated before its data.pkl could be read ({size} bytes)",
                             _CORRUPT)
    return TorchFile(path, size, "zip", obj, up.storages, records, up.unknown_globals,
                     recovered=True)


def _read_legacy(f, path: str, size: int) -> TorchFile:
    f.seek(0)
    magic, _ = _load_pickle(f, path, budget_bytes=size)
    if magic != LEGACY_MAGIC:
        raise UnreadableFile(f"{path}: a pickle, but not a torch.save file", _CORRUPT)
    _load_pickle(f, path, budget_bytes=size)  # protocol version
    _load_pickle(f, path, budget_bytes=size)  # sys info
    obj, up = _load_pickle(f, path, legacy=True, budget_bytes=size)
    keys, _ = _load_pickle(f, path, budget_bytes=size)
    if not isinstance(keys, list):
        raise UnreadableFile(f"{path}: legacy storage list is malformed", _CORRUPT)
    records: dict[str, Record] = {}
    off = f.tell()
    for key in keys:
        key = str(key)
        st = up.storages.get(key)
        if st is None or off + 8 > size:
            break
        f.seek(off)
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * DTYPE_SIZES[st.dtype]
        records[key] = Record(nbytes, max(0, min(nbytes, size - off - 8)), data_offset=off + 8)
        off += 8 + nbytes
    return TorchFile(path, size, "legacy", obj, up.storages, Records(records),
                     up.unknown_globals)
