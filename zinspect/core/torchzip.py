"""Read what a `torch.save` file describes without reading its tensor bytes and without torch.

Two container formats exist:

* zip (torch >= 1.6, DeepSpeed's default): `<root>/data.pkl`, `<root>/data/<key>` records stored
  uncompressed and 64-byte aligned, then the central directory at the end of the file.
* legacy: a run of pickles (magic, protocol, sys info, the object, the storage keys) followed by
  each storage as an 8-byte element count and its raw bytes.

The object pickle is loaded by `MetaUnpickler`, which never imports a module or calls anything the
pickle names: tensors become `TensorRef` descriptors, a short allowlist of harmless builtins is
honoured, and every other global becomes an inert `Opaque` record. A hostile pickle therefore
cannot run code here; at worst it yields records the caller ignores. Its time and memory are
bounded by the pickle's size (zinspect.core.unpickle): past a budget the file is unreadable.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import operator
import os
import pickle
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from zinspect.core.readfiles import open_regular
from zinspect.core.unpickle import (
    BoundedUnpickler,
    FastUnpickler,
    PickleBudgetExceeded,
    PickledOrderedDict,
    charge,
    checked_set,
    prepare_for_c,
)
from zinspect.core.zipcheck import LOCAL_HEADER, ZipStructureError, check_records
from zinspect.errors import UnreadableFile

#: torch dtype name -> bytes per element
DTYPE_SIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
    "uint16": 2, "uint32": 4, "uint64": 8,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "qint8": 1, "qint32": 4, "quint8": 1, "quint4x2": 1, "quint2x4": 1,
}
#: aliases under which torch pickles some dtypes (`torch.float` is `torch.float32`)
DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                 "int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128"}
#: legacy typed-storage class -> dtype of its elements
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8", "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4", "UntypedStorage": "uint8",
}
_SCALAR_CODES = {"float32": "f", "float64": "d", "int64": "q", "int32": "i"}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: a data.pkl larger than this is refused rather than parsed (real ones are KB to a few tens of MB)
MAX_PICKLE_BYTES = 1 << 30
#: pickles from this size on are offered to the C unpickler (unpickle.prepare_for_c); smaller
#: ones are read faster by the bounded reader than the scan's regex is compiled (~0.1 s, once)
FAST_PICKLE_BYTES = 256 << 10
#: PickleMemo keeps pickles up to this size
MEMO_PICKLE_BYTES = 4 << 20
#: largest storage element count accepted (2**48: 1 PB of bytes at most)
MAX_NUMEL = 1 << 48
_DESCRIPTOR = b"PK\x07\x08"


class PickleMemo:
    """Pickles already read, by their bytes: the optimizer files of all ZeRO-3 ranks hold the
    very same data.pkl (their bytes differ only in the tensor records), so a 512-rank checkpoint
    unpickles it once, not 512 times. The results are shared read-only. Only small pickles are
    kept, and only the first few distinct ones, so what it holds stays bounded (ZeRO-1/2 ranks'
    pickles all differ: those simply miss)."""

    def __init__(self, entries: int = 8, max_bytes: int = MEMO_PICKLE_BYTES) -> None:
        self.entries, self.max_bytes = entries, max_bytes
        self._seen: dict[bytes, tuple] = {}
        self._lock = threading.Lock()

    def get(self, raw: bytes) -> tuple | None:
        return self._seen.get(raw) if len(raw) <= self.max_bytes else None

    def put(self, raw: bytes, parsed: tuple) -> None:
        with self._lock:
            if len(raw) <= self.max_bytes and len(self._seen) < self.entries:
                self._seen[raw] = parsed


class StorageRef(NamedTuple):
    """One storage record of the file: `numel` elements of `dtype` under record `key`. (A
    named tuple: made once per storage, 300k times in a large model-states file, where a
    frozen dataclass's __init__ costs 3x more.)"""

    key: str
    dtype: str
    numel: int
    location: str = "cpu"

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(slots=True)
class TensorRef:
    """A tensor as the pickle describes it: a window of `shape`/`stride` into a storage."""

    storage: StorageRef
    offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, st in zip(reversed(self.shape), reversed(self.stride), strict=False):
            if size != 1 and st != expected:
                return False
            expected *= size
        return True


class Opaque:
    """Inert stand-in for a class or function the pickle names and we do not allow.

    Calling it, building it or setting its state only records the arguments."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        charge(len(args) + len(kwargs))  # *args copied: see unpickle.charge
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"

    def get(self, name, default=None):
        """Attribute from the pickled state dict (e.g. `fragment_address.numel`)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        return state.get(name, default) if isinstance(state, dict) else default


class EnumInt(int):
    """int stand-in for `int, Enum` members such as DeepSpeed's `ZeroStageEnum`."""

    qualname = "?"
    names: dict[int, str] = {}

    def __repr__(self) -> str:
        return f"{self.qualname}.{self.names.get(int(self), int(self))}"


ZeroStageEnum = type("ZeroStageEnum", (EnumInt,), {
    "qualname": "ZeroStageEnum",
    "names": {0: "disabled", 1: "optimizer_states", 2: "gradients", 3: "weights"},
})


@dataclass(frozen=True, slots=True)  # slots: a BUILD cannot write into a shared instance
class DType:
    name: str


@dataclass(frozen=True, slots=True)
class _StorageClass:
    dtype: str


def _window(storage: StorageRef, offset, size, stride) -> tuple[int, tuple, tuple]:
    """A tensor's (offset, shape, stride), refused unless every element lies inside its
    storage: a negative offset would read the record before, a huge shape walk forever.
    (Once per tensor: 300k times in a large model-states file, so the checks run in C.)"""
    if type(size) not in (tuple, list) or type(stride) not in (tuple, list) or len(size) > 64:
        raise pickle.UnpicklingError(f"storage {storage.key}: a tensor with a malformed shape")
    size, stride = tuple(size), tuple(stride)
    dims = size + stride
    if type(offset) is not int or offset < 0 or len(size) != len(stride) or len(size) > 64 or \
            not set(map(type, dims)) <= _INT or dims and min(dims) < 0:
        raise pickle.UnpicklingError(f"storage {storage.key}: a tensor with a malformed "
                                     "offset, shape or stride")
    if 0 not in size:
        last = offset + sum(map(operator.mul, size, stride)) - sum(stride)
        if last >= storage.numel:
            raise pickle.UnpicklingError(f"storage {storage.key}: a tensor reaches element "
                                         f"{last:,}, past the {storage.numel:,} of its storage")
    return offset, size, stride


_INT = frozenset({int})


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("a tensor without a storage")
    offset, size, stride = _window(storage, storage_offset, size, stride)
    return TensorRef(storage, offset, size, stride, storage.dtype, bool(requires_grad))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
    if not isinstance(storage, StorageRef) or not isinstance(dtype, DType):
        raise pickle.UnpicklingError("a tensor without a storage or dtype")
    typed = StorageRef(storage.key, dtype.name, storage.nbytes // DTYPE_SIZES[dtype.name],
                       storage.location)
    offset, size, stride = _window(typed, storage_offset, size, stride)
    return TensorRef(typed, offset, size, stride, dtype.name, bool(requires_grad))


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if isinstance(data, TensorRef):
        data.requires_grad = bool(requires_grad)
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if type(args) not in (tuple, list):
        raise pickle.UnpicklingError("a tensor subclass without arguments")
    charge(len(args))  # func(*args) copies them: see unpickle.charge
    return func(*args)  # func came through find_class: allowlisted or inert


def _size(dims=()) -> tuple:
    """torch.Size(dims): a tuple of at most 64 dims (a tuple() of any size, the same large list
    passed again and again, was the pickle's to ask for)."""
    if type(dims) not in (tuple, list) or len(dims) > 64:
        raise pickle.UnpicklingError("a malformed torch.Size")
    return tuple(dims)


def _device(kind, index=None) -> str:
    """`torch.device("cuda", 0)` as "cuda:0"; only short strings and ints are accepted (str()
    of a pickled memo bomb would never end)."""
    if type(kind) is not str or len(kind) > 64 or index is not None and type(index) is not int:
        raise pickle.UnpicklingError("a malformed torch.device")
    return kind if index is None else f"{kind}:{index}"


def _codecs_encode(text, encoding="latin1"):
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({encoding!r})")
    charge(len(text))  # a copy: see unpickle.charge
    return text.encode("latin1")


def _bytearray(source=b"", encoding=None):
    """bytearray from pickled contents only: `bytearray(10**12)` (a size) is refused."""
    if isinstance(source, str):
        return bytearray(_codecs_encode(source, encoding or "latin1"))
    if isinstance(source, (bytes, bytearray)):
        charge(len(source))
        return bytearray(source)
    raise pickle.UnpicklingError(f"unexpected bytearray({type(source).__name__})")


def _complex(real=0.0, imag=0.0) -> complex:
    """complex() of numbers only (parsing a long string, again and again, is not free)."""
    if type(real) not in (int, float, complex) or type(imag) not in (int, float, complex):
        raise pickle.UnpicklingError("a malformed complex number")
    return complex(real, imag)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("collections", "OrderedDict"): PickledOrderedDict,
    ("builtins", "set"): checked_set(set),
    ("builtins", "frozenset"): checked_set(frozenset),
    ("builtins", "slice"): slice,
    ("builtins", "complex"): _complex,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _codecs_encode,
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): ZeroStageEnum,
}
_ALLOWED.update({("torch", name): _StorageClass(dt) for name, dt in STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", name): DType(name) for name in DTYPE_SIZES})
_ALLOWED.update({("torch", a): DType(n) for a, n in DTYPE_ALIASES.items()})

#: classes that real DeepSpeed / Megatron checkpoints contain; kept as inert records, not reported
KNOWN_CLASSES = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "argparse.Namespace",
    "torch.Tensor",  # the `new_type` of _rebuild_from_type_v2
    "torch.nn.parameter.Parameter",
})


#: the field types of a storage's persistent id (zip, legacy: with a view field)
_PID_TYPES = {False: (str, _StorageClass, str, str, int),
              True: (str, _StorageClass, str, str, int, type(None))}


class _Rules:
    """What the unpicklers below allow: globals only from `_ALLOWED` (nothing is ever imported),
    unknown ones as inert `Opaque` classes, and storages as `StorageRef` descriptors."""

    def __init__(self, file, legacy: bool = False, budget_bytes: int = 0) -> None:
        super().__init__(file, encoding="utf-8", budget_bytes=budget_bytes)
        self.legacy = legacy
        self.storages: dict[str, StorageRef] = {}
        self.unknown_globals: set[str] = set()
        self._opaque: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        pair = _compat_pickle.NAME_MAPPING.get((module, name))
        module, name = pair if pair else (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        hit = self.special_globals.get((module, name)) or _ALLOWED.get((module, name))
        if hit is not None:
            return hit
        qualname = f"{module}.{name}"
        if qualname not in KNOWN_CLASSES:
            self.unknown_globals.add(qualname)
        cls = self._opaque.get(qualname)
        if cls is None:
            cls = self._opaque[qualname] = type(name, (Opaque,), {"qualname": qualname})
        return cls

    def persistent_load(self, pid, _types=_PID_TYPES, _new=tuple.__new__, _ref=StorageRef):
        # a torch storage reference as torch writes it, checked in a few C calls (300k times in
        # a large model-states file; the unpickler passes only `pid`, the defaults save global
        # lookups); anything else takes the long way, which says what is off
        if type(pid) is tuple and tuple(map(type, pid)) == _types[self.legacy] and \
                pid[0] == "storage" and len(pid[2]) <= 64 and len(pid[3]) <= 64 and \
                0 <= pid[4] <= MAX_NUMEL and (not self.legacy or pid[5] is None):
            ref = self.storages.get(pid[2])
            if ref is None:
                ref = self.storages[pid[2]] = _new(_ref, (pid[2], pid[1].dtype, pid[4], pid[3]))
            return ref
        return self._storage_ref(pid)

    def _storage_ref(self, pid):
        # nothing from the pickle is formatted here: a memo bomb's repr never ends
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id (a {type(pid).__name__})")
        want = 6 if self.legacy else 5
        if len(pid) != want or not isinstance(pid[1], _StorageClass) or \
                not isinstance(pid[2], (str, int)) or not isinstance(pid[3], str) or \
                len(str(pid[2])) > 64 or len(pid[3]) > 64:
            raise pickle.UnpicklingError(f"malformed storage reference ({len(pid)} fields)")
        key, location, numel = str(pid[2]), pid[3], pid[4]
        if type(numel) is not int or not 0 <= numel <= MAX_NUMEL:
            raise pickle.UnpicklingError(f"storage {key}: bad element count "
                                         f"{numel if type(numel) is int else type(numel).__name__}"
                                         [:120])
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = StorageRef(key, pid[1].dtype, numel, location)
        if self.legacy and pid[5] is not None:
            raise pickle.UnpicklingError("legacy storage views are not supported")
        return ref


class MetaUnpickler(_Rules, BoundedUnpickler):
    """The restricted, bounded unpickler: reads any pickle, in time and memory bounded by its
    size, and says which budget a hostile one passed."""

    leaf_types = frozenset({TensorRef, StorageRef, DType, _StorageClass})


class FastMetaUnpickler(_Rules, FastUnpickler):
    """The same rules on the C unpickler, for pickles `prepare_for_c` proved safe for it (7x
    faster: 1.6 s instead of 13 s for a 300k-name model-states pickle)."""

    leaf_types = MetaUnpickler.leaf_types


@dataclass(slots=True)
class Record:
    """Where a storage's bytes are: `data_offset` in the file and `size` bytes, of which
    `present` are actually inside the file (less when the file is truncated)."""

    size: int
    present: int
    data_offset: int | None = None  # resolved lazily for zip records (one 30-byte read)
    header_offset: int | None = None
    crc: int | None = None


@dataclass
class TorchFile:
    """The metadata of one torch.save file."""

    path: str
    size: int
    format: str  # "zip" or "legacy"
    obj: object
    storages: dict[str, StorageRef]
    records: dict[str, Record]
    unknown_globals: set[str] = field(default_factory=set)
    #: the central directory was missing and the records were found by walking local headers
    recovered: bool = False

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
            entries = central_directory(f, size)
            pkl = [e for e in entries if e[0] == "data.pkl" or e[0].endswith("/data.pkl")]
            if len(pkl) != 1 or pkl[0][2] != 0 or pkl[0][3] > MAX_PICKLE_BYTES:
                return False
            raw = _read_record(f, pkl[0][1], pkl[0][3], size)
    except (NoZipDirectory, OSError, UnreadableFile):
        return False
    return raw is not None and zlib.crc32(raw) == pkl[0][4]


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
        prepared = prepare_for_c(bytes(data))
        if prepared is not None:
            fast = FastMetaUnpickler(io.BytesIO(prepared), legacy=legacy, budget_bytes=budget_bytes)
            try:
                return fast.load(), fast
            except Exception:  # noqa: BLE001 - any doubt goes to the bounded reader
                pass
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


_CORRUPT = "the file is damaged; restore it from a copy or re-save the checkpoint"


def _tail(f, size: int) -> bytes:
    """The end of a zip: its end record (22 bytes, more with a comment) and, for zip64, the
    locator and record before it. torch writes no comment, so 98 bytes nearly always do."""
    for want in (22 + 20 + 56, 22 + 20 + 56 + 65535):
        n = min(size, want)
        f.seek(size - n)
        tail = f.read(n)
        if tail.rfind(b"PK\x05\x06") >= 0 or n == size:
            return tail
    return tail


class NoZipDirectory(Exception):
    """The zip's end record or central directory is missing or malformed."""


def central_directory(f, size: int) -> list[tuple[str, int, int, int, int]]:
    """(name, local header offset, compression, size, crc) of every record, read straight from
    the central directory: zipfile builds an object per record, too slow at 300k records.
    Raises NoZipDirectory when the end record or an entry is missing or malformed, OSError."""
    try:
        return _parse_central_directory(f, size)
    except (struct.error, StopIteration) as e:
        raise NoZipDirectory from e


def directory_offset(f, size: int) -> int:
    """Where the central directory starts (raises NoZipDirectory like central_directory)."""
    try:
        return _directory_span(_tail(f, size))[2]
    except struct.error as e:
        raise NoZipDirectory from e


def _parse_central_directory(f, size: int) -> list[tuple[str, int, int, int, int]]:
    count, cd_size, cd_offset, _ = _directory_span(_tail(f, size))
    if cd_offset + cd_size > size:
        raise NoZipDirectory
    f.seek(cd_offset)
    cd = f.read(cd_size)
    out, pos, last = [], 0, len(cd) - 46
    unpack, append = _CENTRAL.unpack_from, out.append
    while pos <= last:  # one entry per loop: 300k in a ZeRO-3 model-states file, so kept tight
        sig, comp, crc, csize, usize, nlen, xlen, clen, offset = unpack(cd, pos)
        if sig != b"PK\x01\x02":
            raise NoZipDirectory
        pos += 46
        name = cd[pos:pos + nlen].decode("utf-8", "replace")
        if 0xFFFFFFFF in (csize, usize, offset):
            usize, offset = _zip64_extra(cd[pos + nlen:pos + nlen + xlen], usize, csize, offset)
        append((name, offset, comp, usize, crc))
        pos += nlen + xlen + clen
    if len(out) != count:
        raise NoZipDirectory
    return out


#: a central-directory entry: signature, method, crc, sizes, name/extra/comment lengths, offset
_CENTRAL = struct.Struct("<4s6xH4xIIIHHH8xI")


def _directory_span(tail: bytes) -> tuple[int, int, int, int]:
    """From a zip's last bytes: (record count, directory size, directory offset, where the end
    record starts in `tail`), from the zip64 records when the end record defers to them."""
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        raise NoZipDirectory
    count, cd_size, cd_offset = struct.unpack_from("<HII", tail, i + 10)
    if count == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
        j = tail.rfind(b"PK\x06\x06", 0, i)
        if j < 0 or len(tail) - j < 56:
            raise NoZipDirectory
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", tail, j + 32)
    return count, cd_size, cd_offset, i


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            usize = next(values) if usize == 0xFFFFFFFF else usize
            if csize == 0xFFFFFFFF:
                next(values)
            offset = next(values) if offset == 0xFFFFFFFF else offset
            return usize, offset
        pos += 4 + length
    raise NoZipDirectory


def _read_zip(f, path: str, size: int, memo: PickleMemo | None = None) -> TorchFile:
    try:
        entries = central_directory(f, size)
    except (NoZipDirectory, OSError):
        return _walk_local_headers(f, path, size)
    pkl = [e for e in entries if e[0] == "data.pkl" or e[0].endswith("/data.pkl")]
    if len(pkl) != 1:
        raise UnreadableFile(f"{path}: a zip file but not a torch.save file (no data.pkl)",
                             _CORRUPT)
    name, header, comp, pkl_size, pkl_crc = pkl[0]
    prefix = name[: -len("data.pkl")]
    try:
        starts = check_records(f, size, entries, directory_offset(f, size))
    except ZipStructureError as e:
        raise UnreadableFile(f"{path}: its zip structure is forged or damaged: {e}",
                             _CORRUPT) from e
    data_prefix = prefix + "data/"
    cut = len(data_prefix)
    tensors = [e for e in entries if e[0].startswith(data_prefix)]  # 300k at 300k names
    compressed = next((e[0] for e in tensors if e[2] != 0), None)
    if compressed is not None:
        raise UnreadableFile(f"{path}: record {compressed[-120:]!r} is compressed",
                             "re-save the checkpoint with torch.save")
    records = {name[cut:]: Record(usize, _present(starts[name], usize, size), starts[name],
                                  offset, crc) for name, offset, _, usize, crc in tensors}
    if comp != 0 or pkl_size > MAX_PICKLE_BYTES:
        raise UnreadableFile(f"{path}: data.pkl is {'compressed' if comp else 'too large'}",
                             _CORRUPT)
    raw = _read_record(f, header, pkl_size, size)
    if raw is None or zlib.crc32(raw) != pkl_crc:
        raise UnreadableFile(f"{path}: data.pkl fails its CRC check (the bytes are damaged)",
                             _CORRUPT)
    parsed = memo.get(raw) if memo is not None else None
    if parsed is None:
        obj, up = _load_pickle(raw, path)
        parsed = (obj, up.storages, up.unknown_globals)
        if memo is not None:
            memo.put(raw, parsed)
    obj, storages, unknown_globals = parsed
    return TorchFile(path, size, "zip", obj, storages, records, unknown_globals)


def _present(start: int | None, nbytes: int, size: int) -> int:
    """How many of a record's `nbytes` from `start` lie inside a file of `size` bytes."""
    return 0 if start is None else nbytes if start + nbytes <= size else max(0, size - start)


def local_data_offset(header_offset: int, head: bytes) -> int | None:
    """Where a zip record's data starts, from the LOCAL_HEADER bytes at `header_offset` (None
    when they are not a local header)."""
    if len(head) < LOCAL_HEADER or head[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return header_offset + LOCAL_HEADER + name_len + extra_len


def _read_record(f, header: int, nbytes: int, size: int) -> bytes | None:
    if header + LOCAL_HEADER > size:
        return None
    f.seek(header)
    start = local_data_offset(header, f.read(LOCAL_HEADER))
    if start is None:
        return None
    f.seek(start)
    data = f.read(nbytes)
    return data if len(data) == nbytes else None


def _walk_local_headers(f, path: str, size: int) -> TorchFile:
    """Recover records of a zip whose central directory is gone (a truncated copy).

    torch writes records in order, with sizes in data descriptors, so walk the local headers:
    data.pkl ends itself with STOP, storages' sizes come from the pickle, and the small records
    end at their data descriptor."""
    off, obj, up, records = 0, None, None, {}
    while off + 30 <= size:
        f.seek(off)
        head = f.read(30)
        if head[:4] != b"PK\x03\x04":
            break
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        name = f.read(name_len).decode("utf-8", "replace")
        data = off + 30 + name_len + extra_len
        if data > size:  # cut inside the local header itself
            break
        leaf = name.rsplit("/", 1)[-1]
        if name.endswith("data.pkl"):
            f.seek(data)
            stream = io.BytesIO(f.read(min(size - data, MAX_PICKLE_BYTES)))
            obj, up = _load_pickle(stream, path, budget_bytes=size)
            length = stream.tell()
        elif up is not None and "/data/" in name and leaf in up.storages:
            length = up.storages[leaf].nbytes
            records[leaf] = Record(length, max(0, min(length, size - data)), data_offset=data)
        else:
            f.seek(data)
            window = f.read(4096)
            j = window.find(_DESCRIPTOR)
            if j < 0:
                break
            length = j
        off = data + length + (24 if length >= 0xFFFFFFFF or off >= 0xFFFFFFFF else 16)
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
    return TorchFile(path, size, "legacy", obj, up.storages, records, up.unknown_globals)
