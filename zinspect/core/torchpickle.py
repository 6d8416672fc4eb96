"""What a torch.save pickle may name, and what it becomes: the tensor and storage descriptors
(`TensorRef`, `StorageRef`), the allowlist of harmless globals (`_ALLOWED`), inert records for
everything else (`Opaque`), and the rules both unpicklers share (`_Rules`: nothing is imported or
called that is not on the allowlist; every tensor window is checked against its storage).
`MetaUnpickler` is the bounded pure-Python reader, `FastMetaUnpickler` the same rules on the C
unpickler (zinspect.core.fastpickle says when it may be used). `torchzip` reads the files.
"""

from __future__ import annotations

import _compat_pickle
import math
import operator
import pickle
import types
from dataclasses import dataclass
from typing import NamedTuple

from zinspect.core.bounded_unpickler import BoundedUnpickler, checked_set
from zinspect.core.fastpickle import FastUnpickler
from zinspect.core.unpickle import (
    PickledOrderedDict,
    charge,
    refuse_build,
)

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
#: largest storage element count accepted (2**48: 1 PB of bytes at most)
MAX_NUMEL = 1 << 48


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

    __setstate__ = refuse_build  # checked against its storage once: a BUILD may not change it

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
    __setstate__ = refuse_build  # (the class is shared by every pickle read)

    def __repr__(self) -> str:
        return f"{self.qualname}.{self.names.get(int(self), int(self))}"


ZeroStageEnum = type("ZeroStageEnum", (EnumInt,), {
    "qualname": "ZeroStageEnum",
    "names": {0: "disabled", 1: "optimizer_states", 2: "gradients", 3: "weights"},
})


# shared by every pickle read (one per name in `_ALLOWED`): a BUILD may not change them (a
# frozen dataclass with slots gets a __setstate__ that writes its fields otherwise)
@dataclass(frozen=True, slots=True)
class DType:
    name: str
    __setstate__ = refuse_build


@dataclass(frozen=True, slots=True)
class _StorageClass:
    dtype: str
    __setstate__ = refuse_build


_INT = frozenset({int})


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


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None, *, _int=_INT, _mul=operator.mul, _empty=(0,), _unit=(1,)):
    # the usual tensor (300k times in a large model-states file): `_window`'s checks inline,
    # in C calls; any other takes `_window`, which says what is off. First the empty 1-D one
    # (a ZeRO-3 placeholder): it holds no element, so only its offset has a rule to pass; all
    # of them share one shape and one stride tuple (2 x 48 bytes less each, 300k of them)
    if type(storage) is StorageRef and type(storage_offset) is int and storage_offset >= 0 and \
            type(size) is tuple and size == _empty and type(size[0]) is int and \
            type(stride) is tuple and stride == _unit and type(stride[0]) is int:
        return TensorRef(storage, storage_offset, _empty, _unit, storage.dtype,
                         bool(requires_grad))
    if type(storage) is StorageRef and type(size) is tuple and type(stride) is tuple and \
            type(storage_offset) is int and storage_offset >= 0 and len(size) == len(stride) and \
            len(size) <= 64:
        dims = size + stride
        if set(map(type, dims)) <= _int and (not dims or min(dims) >= 0) and (
                0 in size or storage_offset + sum(map(_mul, size, stride)) - sum(stride) <
                storage.numel):
            return TensorRef(storage, storage_offset, size, stride, storage.dtype,
                             bool(requires_grad))
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


def _slice(*args) -> slice:
    """slice() of ints and None only: the tree check does not walk a slice's members, so a
    dict in one stayed the fast path's PickledDict and a memo bomb in one was repr'd forever."""
    if not set(map(type, args)) <= {int, type(None)}:
        raise pickle.UnpicklingError("a malformed slice")
    return slice(*args)


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
    ("builtins", "slice"): _slice,
    ("builtins", "complex"): _complex,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _codecs_encode,
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): ZeroStageEnum,
}
_ALLOWED.update({("torch", name): _StorageClass(dt) for name, dt in STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", name): DType(name) for name in DTYPE_SIZES})
_ALLOWED.update({("torch", a): DType(n) for a, n in DTYPE_ALIASES.items()})
for _call in _ALLOWED.values():  # a BUILD of a function sets its attributes (its defaults)
    if isinstance(_call, types.FunctionType):
        _call.__setstate__ = refuse_build
del _call

#: classes that real DeepSpeed / Megatron checkpoints contain; kept as inert records, not reported
KNOWN_CLASSES = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "argparse.Namespace",
    "torch.Tensor",  # the `new_type` of _rebuild_from_type_v2
    "torch.nn.parameter.Parameter",
})


class _Rules:
    """What the unpicklers below allow: globals only from `_ALLOWED` (nothing is ever imported),
    unknown ones as inert `Opaque` classes, and storages as `StorageRef` descriptors."""

    def __init__(self, file, legacy: bool = False, budget_bytes: int = 0) -> None:
        super().__init__(file, encoding="utf-8", budget_bytes=budget_bytes)
        self.legacy = legacy
        self.storages: dict[str, StorageRef] = {}
        self._keep, self._zip_pids = self.storages.setdefault, not legacy
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

    def persistent_load(self, pid, _new=tuple.__new__, _ref=StorageRef, _class=_StorageClass,
                        _tuple=tuple, _str=str, _int=int, _most=MAX_NUMEL):
        # a torch storage reference as torch writes it (zip format: 5 fields), checked field by
        # field (300k times in a large model-states file; the unpickler passes only `pid`, the
        # defaults save global lookups); anything else takes the long way, which says what is
        # off. `setdefault`: the first reference to a key makes its StorageRef, later ones share
        # it (as `_storage_ref` does). Unpacked, then type-checked: 2x faster than indexing.
        if type(pid) is _tuple and len(pid) == 5 and self._zip_pids:
            tag, cls, key, location, numel = pid
            if type(cls) is _class and type(key) is _str and type(location) is _str and \
                    type(numel) is _int and tag == "storage" and len(key) <= 64 and \
                    len(location) <= 64 and 0 <= numel <= _most:
                return self._keep(key, _new(_ref, (key, cls.dtype, numel, location)))
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
