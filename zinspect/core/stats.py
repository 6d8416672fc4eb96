"""Per-tensor statistics of a checkpoint (or any `sources.Source`), streamed with bounded memory.

The bytes come from the merge's stream engine (`stream.copy_tensors`: the fp32 masters a merge
would write, in order, a few MiB at a time); each chunk is reduced exactly in float64 by numpy
(sum, sum of squared deviations from the chunk's mean, min, max...) and the chunks are combined
with Chan's parallel formula, so mean and std do not lose precision with size. min/max/mean/std
are over the finite values; NaN and Inf are counted (and reported with validate --deep's codes).
numpy is imported lazily: only stats and diff compute on values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from zinspect.core.codes import finding
from zinspect.core.model import Finding
from zinspect.core.plan import OutputTensor
from zinspect.core.stream import Progress, ProgressMeter, ShouldStop, copy_tensors
from zinspect.core.torchzip import DTYPE_SIZES
from zinspect.errors import MergeCancelled, UsageError

NUMPY_DTYPES = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "int64": "<i8", "int32": "<i4",
                "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?", "uint16": "<u2",
                "uint32": "<u4", "uint64": "<u8"}


class Scratch:
    """Reused buffers (float64 unless asked otherwise), one per slot: a fresh multi-MiB array
    per chunk costs more in page faults than the arithmetic on it (measured: 14 ms vs 0.6 ms
    for x - mean on 512k values)."""

    def __init__(self) -> None:
        self._bufs: dict[object, object] = {}

    def get(self, slot: object, n: int, dtype: str = "<f8"):
        import numpy as np

        buf = self._bufs.get(slot)
        if buf is None or len(buf) < n or buf.dtype != dtype:
            buf = self._bufs[slot] = np.empty(max(n, 1 << 19), dtype)
        return buf[:n]


def as_float64(data, dtype: str, scratch: Scratch | None = None, slot: int = 0):
    """The elements in `data` (bytes of `dtype`) as a float64 numpy array (in `scratch`'s
    buffer `slot` when given: valid until the next call with that slot)."""
    import numpy as np

    if dtype == "bfloat16":  # the high half of an fp32
        bits = np.frombuffer(data, "<u2")
        wide = scratch.get(("bf16", slot), len(bits), "<u4") if scratch is not None else None
        src = np.left_shift(bits, 16, out=wide, dtype=np.uint32).view(np.float32)
    elif dtype in NUMPY_DTYPES:
        src = np.frombuffer(data, NUMPY_DTYPES[dtype])
    else:
        raise UsageError(f"cannot compute on {dtype} values", "only real float, int and bool "
                         "tensors have statistics and diffs")
    if scratch is None:
        return src.astype(np.float64)
    out = scratch.get(slot, len(src))
    out[...] = src
    return out


def values(data, dtype: str, scratch: Scratch, slot: object = 0):
    """The values as numpy reads them without a copy (fp32, fp64, fp16), else as float64."""
    import numpy as np

    if dtype in ("float32", "float64", "float16"):
        return np.frombuffer(data, NUMPY_DTYPES[dtype])
    return as_float64(data, dtype, scratch, slot)


def nonfinite_counts(x, finite) -> tuple[int, int]:
    """(NaN, Inf) counts of `x`, given its isfinite mask."""
    import numpy as np

    bad = len(x) - int(np.count_nonzero(finite))
    if not bad:
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(x)))
    return nan, bad - nan


@dataclass
class TensorStats:
    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int = 0
    finite: int = 0  # how many values min/max/mean/std are over
    min: float = math.nan
    max: float = math.nan
    mean: float = math.nan
    m2: float = 0.0  # sum of squared deviations from the mean (finite values)
    sumsq: float = 0.0
    max_abs: float = math.nan
    zeros: int = 0
    nan: int = 0
    inf: int = 0

    @property
    def std(self) -> float:
        """Population std (numpy's default; torch's `std(unbiased=False)`)."""
        return math.sqrt(self.m2 / self.finite) if self.finite else math.nan

    @property
    def l2(self) -> float:
        return math.sqrt(self.sumsq)

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def add(self, x, scratch: Scratch | None = None) -> None:
        """Fold in a chunk of values (`values()`: float64, or fp32/fp16 as read: min/max on
        those, every sum in float64). The sum of squares comes first: when it is finite every
        value is, and no NaN/Inf mask is made. Sums of squares use einsum, not np.dot:
        BLAS threads spinning beside the stream's readers made a chunk 30x slower here."""
        import numpy as np

        scratch = scratch or Scratch()

        n = len(x)
        if not n:
            return
        self.numel += n
        self.zeros += int(np.count_nonzero(np.equal(x, 0, out=scratch.get(10, n, "?"))))
        wide = x
        if x.dtype != np.float64:  # one widening pass into a reused buffer (min/max need none)
            wide = scratch.get(11, n)
            wide[...] = x
        sumsq = float(np.einsum("i,i->", wide, wide))
        if not math.isfinite(sumsq):  # NaN or Inf in the chunk (or squares beyond float64)
            finite = np.isfinite(x)
            nan, inf = nonfinite_counts(x, finite)
            if nan or inf:
                self.nan += nan
                self.inf += inf
                x = wide = wide[finite]
                n = len(x)
                if not n:
                    return
                sumsq = float(np.einsum("i,i->", x, x))
        lo, hi = float(x.min()), float(x.max())
        mean = float(wide.sum()) / n
        dev = np.subtract(wide, mean, out=scratch.get(9, n))
        m2 = float(np.einsum("i,i->", dev, dev))
        total = self.finite + n
        if self.finite:
            delta = mean - self.mean
            self.m2 += m2 + delta * delta * self.finite * n / total
            self.mean += delta * n / total
            self.min, self.max = min(self.min, lo), max(self.max, hi)
        else:
            self.m2, self.mean, self.min, self.max = m2, mean, lo, hi
        self.finite = total
        self.sumsq += sumsq
        self.max_abs = max(abs(self.min), abs(self.max))

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("m2")
        d.pop("sumsq")
        d.update(shape=list(self.shape), std=self.std, l2=self.l2, zero_fraction=self.zero_fraction)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


class TensorSplitter:
    """A copy_tensors sink that cuts the stream back into its tensors: calls
    `on_data(index, chunk)` with whole elements of tensor `index`, in order."""

    def __init__(self, tensors: list[OutputTensor], on_data: Callable[[int, memoryview], None]):
        self.sizes = [t.nbytes for t in tensors]
        self.items = [DTYPE_SIZES[t.dtype] for t in tensors]
        self.on_data = on_data
        self._i, self._pos = 0, 0
        self._carry = b""  # a partial element at a chunk's end

    def __call__(self, data: memoryview) -> None:
        while len(data):
            while self._pos == self.sizes[self._i]:
                self._i, self._pos = self._i + 1, 0
            n = min(len(data), self.sizes[self._i] - self._pos)
            part, data = data[:n], data[n:]
            self._pos += n
            if self._carry:
                part = memoryview(self._carry + bytes(part))
            cut = len(part) - len(part) % self.items[self._i]
            self._carry = bytes(part[cut:])
            if cut:
                self.on_data(self._i, part[:cut])


def compute_stats(tensors: list[OutputTensor], progress: Progress | None = None,
                  should_stop: ShouldStop | None = None) -> list[TensorStats]:
    """Statistics of every tensor but tied aliases (they are their owner's bytes), in order.
    Raises MergeCancelled (nothing to undo) when `should_stop()` turns true."""
    tensors = [t for t in tensors if t.tied_to is None]
    stats = [TensorStats(t.name, t.dtype, tuple(t.shape)) for t in tensors]
    meter = ProgressMeter(sum(t.nbytes for t in tensors), progress)

    scratch = Scratch()

    def fold(i: int, data: memoryview) -> None:
        stats[i].add(values(data, tensors[i].dtype, scratch), scratch)

    try:
        copy_tensors(tensors, TensorSplitter(tensors, fold), meter, should_stop)
    except MergeCancelled as e:
        raise MergeCancelled("statistics cancelled", "nothing was changed") from e
    return stats


def nonfinite_findings(stats: list[TensorStats]) -> list[Finding]:
    """NaN/Inf in the values, with validate --deep's codes (nan-values, inf-values)."""
    return [f for s in stats for f in tensor_nonfinite(s.name, s.numel, s.nan, s.inf)]


NONFINITE_HINT = ("training diverged before this save (or the bytes are corrupt: see `zinspect "
                  "validate --deep`); use an earlier checkpoint")


def tensor_nonfinite(name: str, numel: int, nan: int, inf: int, source: str = "") -> list[Finding]:
    """One tensor's NaN/Inf counts as findings, worded as validate --deep words them:
    `NAME: n of N values are NaN [in SOURCE]` (stats, and each side of a diff)."""
    out = []
    for count, code, what in ((nan, "nan-values", "NaN"), (inf, "inf-values", "Inf")):
        if count:
            out.append(finding(code, f"{name}: {count:,} of {numel:,} values are {what}"
                               + (f" in {source}" if source else ""), NONFINITE_HINT, param=name))
    return out
