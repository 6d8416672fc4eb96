"""Write `torch.save` zip files without torch: what `torch.load` (and so DeepSpeed's loaders)
reads back as the same objects torch itself would have saved.

- `dumps(obj)`: the data.pkl at protocol 2, as torch writes it. Tensors are `NewTensor`s (a window
  into a `NewStorage`, pickled as `torch._utils._rebuild_tensor_v2` with a persistent id
  `('storage', torch.<Dtype>Storage, key, 'cpu', numel)`), `Size` is `torch.Size`, and what the
  bounded unpickler (zinspect.core.torchzip) read from a source pickle is written back as it was:
  an inert `Opaque` record as its class (by name, never imported) rebuilt with NEWOBJ + BUILD, an
  `EnumInt` as its enum class called with its value, a `DType` as `torch.<dtype>`.
- `ZipWriter`: the zip container, records stored and their data 64-byte aligned (a padding
  extra field, as torch does), CRC32 computed as the bytes stream through, sizes in data
  descriptors and the central directory (zip64 where a size or offset needs it).
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import struct
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from zinspect.core.plan import OutputTensor, Piece
from zinspect.core.torchpickle import (
    _ALLOWED,
    DTYPE_SIZES,
    STORAGE_DTYPES,
    DType,
    EnumInt,
    Opaque,
    TensorRef,
)

#: dtype -> the legacy typed-storage class torch pickles for it
STORAGE_CLASSES = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name != "UntypedStorage"}
ALIGNMENT = 64
#: chunks from this size on have their CRC computed beside their write (both release the GIL;
#: on 2 cores a 700 MB universal conversion took 2.6 s instead of 3.3)
OVERLAP = 256 << 10
#: the enum stand-ins of the unpickler -> the (module, name) they stand for
ENUM_CLASSES = {cls: key for key, cls in _ALLOWED.items()
                if isinstance(cls, type) and issubclass(cls, EnumInt)}
_MARK = 0xFFFFFFFF  # a 32-bit zip field whose value is in the zip64 extra
#: sizes and offsets from this on go to zip64 fields (a test lowers it)
ZIP64_FROM = 0xFFFFFFFF


class Global:
    """A reference to `module.name`, pickled as GLOBAL without importing anything."""

    _interned: dict[tuple[str, str], Global] = {}

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    @classmethod
    def of(cls, module: str, name: str) -> Global:
        key = (module, name)
        if key not in cls._interned:
            cls._interned[key] = cls(module, name)
        return cls._interned[key]

    @classmethod
    def qualified(cls, qualname: str) -> Global:
        module, _, name = qualname.rpartition(".")
        return cls.of(module, name)


class Size(tuple):
    """torch.Size"""


@dataclass(frozen=True, eq=False)
class NewStorage:
    key: str
    dtype: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True, eq=False)
class NewTensor:
    """A tensor of `shape` at element `offset` of `storage` (contiguous unless `strides`)."""

    storage: NewStorage
    shape: tuple[int, ...]
    offset: int = 0
    strides: tuple[int, ...] | None = None

    @property
    def stride(self) -> tuple[int, ...]:
        if self.strides is not None:
            return self.strides
        out, step = [], 1
        for n in reversed(self.shape):
            out.append(step)
            step *= n
        return tuple(reversed(out))


class _Pickler(pickle._Pickler):
    """The pure-Python pickler (its `save` can be extended) with torch's and DeepSpeed's
    globals written by name."""

    def persistent_id(self, obj):
        if isinstance(obj, NewStorage):
            return ("storage", Global.of("torch", STORAGE_CLASSES[obj.dtype]), obj.key, "cpu",
                    obj.numel)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self._save_global_ref(obj)
        elif isinstance(obj, NewTensor):
            self.save_reduce(Global.of("torch._utils", "_rebuild_tensor_v2"),
                             (obj.storage, obj.offset, Size(obj.shape), obj.stride, False,
                              OrderedDict()), obj=obj)
        elif isinstance(obj, Size):
            self.save_reduce(Global.of("torch", "Size"), (tuple(obj),), obj=obj)
        elif isinstance(obj, DType):
            self._save_global_ref(Global.of("torch", obj.name))
        elif isinstance(obj, EnumInt):
            self.save_reduce(Global.of(*ENUM_CLASSES[type(obj)]), (int(obj),), obj=obj)
        elif isinstance(obj, Opaque):
            self._save_opaque(obj)
        elif isinstance(obj, TensorRef):
            raise pickle.PicklingError("a source tensor must be replaced by a NewTensor")
        elif isinstance(obj, dict) and type(obj) not in (dict, OrderedDict):
            # the unpickler's own dict subclasses: written as what they stand for, never by
            # a zinspect class name
            super().save(OrderedDict(obj) if isinstance(obj, OrderedDict) else dict(obj),
                         save_persistent_id)
        else:
            super().save(obj, save_persistent_id)

    def save_reduce(self, func, args, state=None, listitems=None, dictitems=None,
                    state_setter=None, *, obj=None):
        if isinstance(func, Global):  # the stdlib checks `func` is callable: write it here
            x = self.memo.get(id(obj)) if obj is not None else None
            if x is not None:
                self.write(self.get(x[0]))
                return
            self.save(func)
            self.save(args)
            self.write(pickle.REDUCE)
            if obj is not None:
                self.memoize(obj)
            return
        super().save_reduce(func, args, state, listitems, dictitems, state_setter, obj=obj)

    def _save_global_ref(self, ref: Global) -> None:
        x = self.memo.get(id(ref))
        if x is not None:
            self.write(self.get(x[0]))
            return
        self.write(pickle.GLOBAL + f"{ref.module}\n{ref.name}\n".encode())
        self.memoize(ref)

    def _save_opaque(self, obj: Opaque) -> None:
        x = self.memo.get(id(obj))
        if x is not None:
            self.write(self.get(x[0]))
            return
        cls = Global.qualified(obj.qualname)
        if obj.state is None and obj.args:  # a call: cls(*args)
            self.save_reduce(cls, tuple(obj.args), obj=obj)
            return
        self.save(cls)
        self.save(tuple(obj.args))
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)


@functools.cache
def _crc_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, "zinspect-crc")


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def storages_of(obj) -> list[NewStorage]:
    """The NewStorages `obj` refers to, in the order the pickle first reaches them (the order
    torch writes their records in)."""
    seen: dict[int, NewStorage] = {}

    def walk(x) -> None:
        if isinstance(x, NewTensor):
            seen.setdefault(id(x.storage), x.storage)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple, set, frozenset)):
            for v in x:
                walk(v)
        elif isinstance(x, Opaque):
            walk(x.args)
            walk(x.state)

    walk(obj)
    return list(seen.values())


# ------------------------------------------------------------------------------ the zip container
class ZipWriter:
    """Write a torch.save zip to `fd` record by record: `add(name, bytes)`, or `begin(name)`,
    `feed(data)`..., `end()`; then `close()` writes the central directory."""

    def __init__(self, fd: int, prefix: str) -> None:
        self.fd, self.prefix = fd, prefix
        self.pos = 0
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, header offset, size, crc
        self._name: bytes | None = None
        self._header = self._size = self._crc = 0

    def _write(self, data) -> None:
        view = memoryview(data)
        while len(view):
            view = view[os.write(self.fd, view):]
        self.pos += len(data)

    def begin(self, name: str) -> None:
        raw = f"{self.prefix}/{name}".encode()
        self._name, self._header, self._size, self._crc = raw, self.pos, 0, 0
        pad = -(self.pos + 30 + len(raw) + 4) % ALIGNMENT
        extra = struct.pack("<HH", 0x4246, pad) + bytes(pad)  # torch's "FB" padding field
        self._write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 45, 0x08, 0, 0, 0x21, 0, 0, 0,
                                len(raw), len(extra)) + raw + extra)

    def feed(self, data) -> None:
        if len(data) >= OVERLAP:  # the CRC in a helper thread while this one writes
            crc = _crc_thread().submit(zlib.crc32, data, self._crc)
            self._write(data)
            self._crc = crc.result()
        else:
            self._crc = zlib.crc32(data, self._crc)
            self._write(data)
        self._size += len(data)

    def end(self) -> None:
        big = self._size >= ZIP64_FROM or self._header >= ZIP64_FROM
        fmt = "<4sIQQ" if big else "<4sIII"
        self._write(struct.pack(fmt, b"PK\x07\x08", self._crc, self._size, self._size))
        self.entries.append((self._name, self._header, self._size, self._crc))
        self._name = None

    def add(self, name: str, data: bytes) -> None:
        self.begin(name)
        self.feed(data)
        self.end()

    def close(self) -> None:
        start = self.pos
        out = bytearray()
        for name, header, size, crc in self.entries:
            z64 = [v for v in (size, size, header) if v >= ZIP64_FROM]
            extra = struct.pack(f"<HH{len(z64)}Q", 1, 8 * len(z64), *z64) if z64 else b""
            small = [_MARK if v >= ZIP64_FROM else v for v in (size, size, header)]
            out += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 45, 45, 0x08, 0, 0, 0x21, crc,
                               small[0], small[1], len(name), len(extra), 0, 0, 0, 0,
                               small[2]) + name + extra
        self._write(out)
        end, count, cd_size = self.pos, len(self.entries), len(out)
        if count >= 0xFFFF or start >= ZIP64_FROM or cd_size >= ZIP64_FROM:
            self._write(struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                                    cd_size, start))
            self._write(struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1))
            self._write(struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, _MARK, _MARK, 0))
        else:
            self._write(struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, cd_size,
                                    start, 0))


#: the small records torch writes around the storages (before and after them)
HEAD_RECORDS = ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"))
TAIL_RECORDS = (("version", b"3\n"),)


def serialization_id(name: str) -> bytes:
    """torch's `.data/serialization_id`: an opaque string; here a digest of the file name."""
    return str(zlib.crc32(name.encode()) * 10**10 + len(name)).zfill(20).encode()


# ------------------------------------------------------------------------------ streamed files
@dataclass
class OutFile:
    """One torch.save file to write: the object `obj` pickled, and each of its storages filled
    from `ops` in order: a `Piece` (bytes of a source file, read verified; of `src_dtype`
    elements, converted to the storage's dtype: bf16/fp16 upcast to fp32) or an int (that many
    zero bytes of output: padding). `name` may hold directories ("zero/w/fp32.pt")."""

    name: str
    obj: object = None
    records: list = field(default_factory=list)  # [(NewStorage, [Piece | int, ...], src_dtype)]
    #: storage key -> (weaves, {tp rank: replica pieces}) of a record planned by shardplan
    #: (pieces only, no zero padding): interleaved into rows / compared, as a merge does
    woven: dict = field(default_factory=dict)

    def tensor(self, dtype: str, shape: tuple[int, ...], ops: list,
               src_dtype: str | None = None, weaves: tuple = (), mirrors: dict | None = None
               ) -> NewTensor:
        """A new contiguous tensor of its own storage, filled by `ops`."""
        st = self.storage(dtype, math.prod(shape), ops, src_dtype)
        if weaves or mirrors:
            self.woven[st.key] = (weaves, mirrors or {})
        return NewTensor(st, Size(shape))

    def storage(self, dtype: str, numel: int, ops: list, src_dtype: str | None = None) -> NewStorage:
        st = NewStorage(str(len(self.records)), dtype, numel)
        self.records.append((st, ops, src_dtype or dtype))
        return st


def add_piece(ops: list, piece: Piece) -> None:
    """Append `piece`, merged into the previous one when it continues it in the same file."""
    last = ops[-1] if ops else None
    if isinstance(last, Piece) and last.path == piece.path and \
            last.offset + last.nbytes == piece.offset:
        ops[-1] = Piece(last.path, last.offset, last.nbytes + piece.nbytes)
    elif piece.nbytes:
        ops.append(piece)


def add_zeros(ops: list, nbytes: int) -> None:
    if nbytes and ops and type(ops[-1]) is int:
        ops[-1] += nbytes
    elif nbytes:
        ops.append(nbytes)


def stream_tensors(files: list[OutFile]) -> list[OutputTensor]:
    """The source bytes of `files`, in the order they are written: one tensor per run of pieces
    (what zinspect.core.stream reads and zinspect.core.verify checks)."""
    out = []
    for f in files:
        for st, ops, src in f.records:
            run: list[Piece] = []
            weaves, mirrors = f.woven.get(st.key, ((), {}))
            for op in [*ops, 0]:
                if isinstance(op, Piece):
                    run.append(op)
                elif run:
                    raw = src == st.dtype  # bytes copied as they are: no NaN/Inf count
                    dtype, src_dtype = ("uint8", "uint8") if raw else (st.dtype, src)
                    n = sum(p.nbytes for p in run) // DTYPE_SIZES[src_dtype]
                    name = f"{f.name}:{st.key}"
                    numel = sum(p.nbytes for p in run) // DTYPE_SIZES[src]  # replicas: as values
                    out.append(OutputTensor(name, (n,), dtype, src_dtype, run, weaves=weaves, mirrors=[
                        OutputTensor(name, (numel,), src, src, m, replica=t)
                        for t, m in sorted(mirrors.items())]))
                    run = []
    return out


def output_bytes(files: list[OutFile]) -> int:
    return sum(rec[0].nbytes for f in files for rec in f.records)


class FilesSink:
    """The stream's sink for `files`: routes each source byte to its record, writes the zero
    padding, the pickles and the small records between them, and the zip directories. `open`
    gives a new file's fd; `done(name, fd)` is called once a file is complete."""

    ZEROS = bytes(1 << 20)

    def __init__(self, files: list[OutFile], open_fd, done) -> None:
        self._steps = self._walk(files, open_fd, done)
        self._need = 0  # source bytes the current piece still wants
        self.zip: ZipWriter | None = None

    def _walk(self, files, open_fd, done):
        for f in files:
            fd = open_fd(f.name)
            self.zip = z = ZipWriter(fd, os.path.basename(f.name).removesuffix(".pt"))
            z.add("data.pkl", dumps(f.obj))
            for name, data in HEAD_RECORDS:
                z.add(name, data)
            for st, ops, src in f.records:
                z.begin(f"data/{st.key}")
                for op in ops:
                    if isinstance(op, Piece):
                        yield op.nbytes * DTYPE_SIZES[st.dtype] // DTYPE_SIZES[src]
                    else:
                        for i in range(0, op, len(self.ZEROS)):
                            z.feed(memoryview(self.ZEROS)[:min(len(self.ZEROS), op - i)])
                z.end()
            for name, data in TAIL_RECORDS:
                z.add(name, data)
            z.add(".data/serialization_id", serialization_id(f.name))
            z.close()
            done(f.name, fd)

    def __call__(self, data: memoryview) -> None:
        while len(data):
            if not self._need:
                self._need = next(self._steps)
            n = min(self._need, len(data))
            self.zip.feed(data[:n])
            self._need -= n
            data = data[n:]

    def finish(self) -> None:
        """Write what follows the last source byte (padding, small records, directories)."""
        if self._need:
            raise RuntimeError("the stream ended before every planned byte was read")
        for _ in self._steps:
            raise RuntimeError("the stream ended before every planned byte was read")
