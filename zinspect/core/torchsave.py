"""Write `torch.save` zip files without torch: what `torch.load` (and so DeepSpeed's loaders)
reads back as the same objects torch itself would have saved.

- `dumps(obj)`: the data.pkl at protocol 2, as torch writes it. Tensors are `NewTensor`s (a window
  into a `NewStorage`, pickled as `torch._utils._rebuild_tensor_v2` with a persistent id
  `('storage', torch.<Dtype>Storage, key, 'cpu', numel)`), `Size` is `torch.Size`, and what the
  bounded unpickler (zinspect.core.torchzip) read from a source pickle is written back as it was:
  an inert `Opaque` record as its class (by name, never imported) rebuilt with NEWOBJ + BUILD, an
  `EnumInt` as its enum class called with its value, a `DType` as `torch.<dtype>`.
- `OutFile` / `FilesSink`: the files to write, each storage filled from source byte ranges
  (read verified by `zinspect.core.stream`) and zero padding, streamed into the zip container
  of `zinspect.core.zipwrite`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections import OrderedDict
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
from zinspect.core.zipwrite import HEAD_RECORDS, TAIL_RECORDS, ZipWriter, serialization_id

#: dtype -> the legacy typed-storage class torch pickles for it
STORAGE_CLASSES = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name != "UntypedStorage"}
#: the enum stand-ins of the unpickler -> the (module, name) they stand for
ENUM_CLASSES = {cls: key for key, cls in _ALLOWED.items()
                if isinstance(cls, type) and issubclass(cls, EnumInt)}


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


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


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
    #: a source file copied byte for byte: `records` are its byte ranges in order (cut at its
    #: zip records' data, so that each is CRC-checked as it streams); no pickle, no zip written
    copied: bool = False

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
                    nbytes = sum(p.nbytes for p in run)
                    n = nbytes // DTYPE_SIZES[src_dtype]
                    name = f"{f.name}:{st.key}"
                    numel = nbytes // DTYPE_SIZES[src]  # replicas: as values
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
            if f.copied:
                self.zip = _Copy(fd)
                for st, _, _ in f.records:
                    yield st.nbytes
                done(f.name, fd)
                continue
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


class _Copy:
    """The sink of a file copied byte for byte: what is fed is written as it is."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def feed(self, data) -> None:
        view = memoryview(data)
        while len(view):
            view = view[os.write(self.fd, view):]
