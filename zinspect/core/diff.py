"""Compare two tensor sources (`sources.Source`) param by param, streaming both sides.

Names are matched after a prefix map (`base_model.model.=` drops PEFT's prefix from A's names).
Matched tensors of one shape are read in windows of at most WINDOW bytes per side through the
merge's stream engine (`copy_tensors`), compared exactly (the bytes, for bit-identity) and in
float64 (max |a-b|, ||a-b|| / ||a||), so memory stays bounded whatever the model size.
"""

from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from zinspect.core.plan import OutputTensor, Piece
from zinspect.core.model import Finding
from zinspect.core.stats import Scratch, as_float64, tensor_nonfinite, values
from zinspect.core.stream import Progress, ProgressMeter, ShouldStop, copy_tensors
from zinspect.core.torchzip import DTYPE_SIZES
from zinspect.errors import MergeCancelled, UsageError

WINDOW = 8 << 20  # bytes per side compared at a time


@dataclass
class ParamDiff:
    name: str  # B's name (A's after the prefix map)
    name_a: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    identical: bool = True  # same dtype and the same bytes
    #: the values: |a-b| <= atol + rtol*|b| everywhere (NaN where the other is NaN), or with no
    #: tolerance the same bits (values, when the dtypes differ: the dtype difference is its own)
    within: bool = True
    max_abs: float = 0.0
    diff_sq: float = 0.0
    a_sq: float = 0.0
    differing: int = 0  # elements not within tolerance
    first_index: int | None = None  # flat index of the first such element
    nan_a: int = 0  # NaN / Inf values on each side (counted as stats and deep check count them)
    inf_a: int = 0
    nan_b: int = 0
    inf_b: int = 0

    @property
    def comparable(self) -> bool:
        return self.shape_a == self.shape_b

    @property
    def rel_l2(self) -> float:
        if not self.diff_sq:
            return 0.0
        return math.sqrt(self.diff_sq / self.a_sq) if self.a_sq else math.inf

    def to_json(self) -> dict:
        return {"name": self.name, "name_a": self.name_a, "shape_a": list(self.shape_a),
                "shape_b": list(self.shape_b), "dtype_a": self.dtype_a, "dtype_b": self.dtype_b,
                "identical": self.identical, "within_tolerance": self.within,
                "max_abs_diff": _j(self.max_abs), "rel_l2": _j(self.rel_l2),
                "differing": self.differing, "first_index": self.first_index,
                "nan_a": self.nan_a, "inf_a": self.inf_a, "nan_b": self.nan_b, "inf_b": self.inf_b,
                "first_position": list(unravel(self.first_index, self.shape_b))
                if self.first_index is not None else None}


@dataclass
class DiffResult:
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    params: list[ParamDiff] = field(default_factory=list)  # sorted: most changed first
    #: no tolerance: equal means the same bits, so a dtype difference is a difference; with a
    #: tolerance it is the values that count (a bf16 output against its fp32 masters)
    exact: bool = True

    @property
    def equal(self) -> bool:
        """No name or shape differences, every value within tolerance, and (when exact) no
        dtype differences."""
        return not self.only_a and not self.only_b and all(
            p.comparable and p.within and (p.dtype_a == p.dtype_b or not self.exact)
            for p in self.params)

    def findings(self) -> list[Finding]:
        """NaN/Inf on either side (nan-values / inf-values, as stats and validate --deep say
        them): counted in the compared params, whatever the verdict."""
        out = []
        for p in self.params:
            out += tensor_nonfinite(p.name_a, math.prod(p.shape_a), p.nan_a, p.inf_a, "A")
            out += tensor_nonfinite(p.name, math.prod(p.shape_b), p.nan_b, p.inf_b, "B")
        return out

    def to_json(self) -> dict:
        return {"equal": self.equal, "only_a": self.only_a, "only_b": self.only_b,
                "shape_mismatch": [p.name for p in self.params if not p.comparable],
                "dtype_mismatch": [p.name for p in self.params if p.dtype_a != p.dtype_b],
                "params": [p.to_json() for p in self.params],
                "findings": [f.to_json() for f in self.findings()]}


def parse_prefix_map(items: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or ():
        if "=" not in item:
            raise UsageError(f"bad --map-prefix {item!r:.80}: expected OLD=NEW",
                             "e.g. --map-prefix base_model.model.= (NEW may be empty)")
        old, new = item.split("=", 1)
        out.append((old, new))
    return out


def mapped(name: str, prefix_map: list[tuple[str, str]]) -> str:
    for old, new in prefix_map:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def diff_tensors(a: list[OutputTensor], b: list[OutputTensor],
                 prefix_map: list[tuple[str, str]] | None = None, atol: float = 0.0,
                 rtol: float = 0.0, progress: Progress | None = None,
                 should_stop: ShouldStop | None = None) -> DiffResult:
    """With atol = rtol = 0 (the default) `within` means bit-identical."""
    by_a = {mapped(t.name, prefix_map or []): t for t in a}
    by_b = {t.name: t for t in b}
    result = DiffResult(only_a=[t.name for n, t in by_a.items() if n not in by_b],
                        only_b=[n for n in by_b if n not in by_a])
    pairs = []
    for name, tb in by_b.items():
        ta = by_a.get(name)
        if ta is None:
            continue
        p = ParamDiff(name, ta.name, tuple(ta.shape), tuple(tb.shape), ta.dtype, tb.dtype)
        p.identical = p.comparable and ta.dtype == tb.dtype
        p.within = p.comparable
        if p.comparable:
            pairs.append((p, ta, tb))
        result.params.append(p)
    exact = result.exact = atol == 0 and rtol == 0
    windows = list(_windows(pairs))
    meter = ProgressMeter(sum(ta.nbytes + tb.nbytes for _, ta, tb in pairs), progress)
    scratch = Scratch()
    stop = threading.Event()
    sides = [_Side([[w[k] for w in batch] for batch in windows], stop, should_stop, facts=k == 1)
             for k in (1, 2)]
    try:
        with ThreadPoolExecutor(2, "zinspect-diff") as pool:  # A's and B's streams
            for side in sides:
                pool.submit(side.run)
            try:
                for batch in windows:
                    (va, facts_a), (vb, _) = sides[0].get(), sides[1].get()
                    # one memcmp says a whole window is bit-identical (the usual verdict)
                    same = all(wa.dtype == wb.dtype for _, wa, wb, _ in batch) and \
                        same_bytes(va, vb, scratch)
                    pa = pb = 0
                    for (p, wa, wb, start), fa in zip(batch, facts_a, strict=True):
                        ba, bb = va[pa:pa + wa.nbytes], vb[pb:pb + wb.nbytes]
                        pa, pb = pa + wa.nbytes, pb + wb.nbytes
                        twin = same or (len(batch) > 1 and wa.dtype == wb.dtype
                                        and same_bytes(ba, bb, scratch))
                        # B's NaN/Inf: A's when the bytes are A's (computed once), else counted here
                        fb = fa if twin else _facts(bb, wb.dtype, scratch, 5)
                        p.nan_a, p.inf_a, p.a_sq = p.nan_a + fa[0], p.inf_a + fa[1], p.a_sq + fa[2]
                        p.nan_b, p.inf_b = p.nan_b + fb[0], p.inf_b + fb[1]
                        if not twin:
                            _compare(p, wa.dtype, wb.dtype, ba, bb, start, exact, atol, rtol, scratch)
                    meter.add(len(va) + len(vb), batch[-1][0].name)
                    sides[0].release(va)
                    sides[1].release(vb)
                    if should_stop is not None and should_stop():
                        raise MergeCancelled("the diff was cancelled")
            finally:
                stop.set()  # the streams stop at their next chunk or queue slot
    except MergeCancelled as e:
        raise MergeCancelled("the diff was cancelled", "nothing was changed") from e
    result.params.sort(key=lambda p: (p.comparable and p.dtype_a == p.dtype_b, p.within,
                                      -p.rel_l2, -p.max_abs, p.name))
    return result


#: finished windows each side may hold ahead of the comparison (memory: about
#: (QUEUED + 2) * WINDOW per side, the window being filled and the one being compared included)
QUEUED = 1

#: what is counted of each tensor of a window: (NaN count, Inf count, sum of squares of the
#: finite values)
Facts = tuple[int, int, float]


class _Side:
    """One side's windows as one stream: `copy_tensors` over all of them in a thread, each
    finished window handed to the comparison through a small queue, so the next windows are
    read while this one is compared (a diff costs about one read of A and B). A's thread also
    counts NaN/Inf and the squares ||a||^2 needs in each window it hands over (numpy runs
    without the GIL, beside the comparison, on the second core); B's are A's where the bytes
    are the same (the usual case), so B's thread only reads. The QUEUED + 2 window buffers are
    reused (`release`): a fresh 8 MiB buffer a window cost more in page faults than the copy."""

    def __init__(self, windows: list[list[OutputTensor]], stop: threading.Event,
                 should_stop: ShouldStop | None, facts: bool) -> None:
        self.windows = windows
        self.sizes = [sum(t.nbytes for t in w) for w in windows]
        self.stop, self.should_stop, self.facts = stop, should_stop, facts
        self.queue: queue.Queue = queue.Queue(QUEUED)
        self.free: queue.Queue = queue.Queue()  # buffers the comparison is done with
        self._made = 0
        self.scratch = Scratch()  # this thread's own
        self._buf, self._pos, self._i = None, 0, 0

    def run(self) -> None:
        try:
            copy_tensors([t for w in self.windows for t in w], self._sink,
                         ProgressMeter(0, None), self._stopping)
        except BaseException as e:  # handed to the comparison, which raises it
            self._put(e)

    def _stopping(self) -> bool:
        return self.stop.is_set() or (self.should_stop is not None and self.should_stop())

    def _sink(self, data: memoryview) -> None:
        while len(data):
            if self._buf is None:
                self._buf, self._pos = self._take()[:self.sizes[self._i]], 0
            n = min(len(data), len(self._buf) - self._pos)
            self._buf[self._pos:self._pos + n] = data[:n]
            self._pos += n
            data = data[n:]
            if self._pos == len(self._buf):
                facts = None
                if self.facts:
                    facts, pos = [], 0
                    for t in self.windows[self._i]:
                        facts.append(_facts(self._buf[pos:pos + t.nbytes], t.dtype, self.scratch))
                        pos += t.nbytes
                self._put((self._buf, facts))
                self._buf, self._i = None, self._i + 1

    def _take(self) -> memoryview:
        if self._made < QUEUED + 2:  # filled, queued, compared
            self._made += 1
            return memoryview(bytearray(max(self.sizes)))
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.05)
            except queue.Empty:
                pass
        raise MergeCancelled("the diff was cancelled")

    def release(self, buf: memoryview) -> None:
        """The comparison is done with `buf` (a window `get` returned): it may be filled again."""
        self.free.put(memoryview(buf.obj))

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                pass
        raise MergeCancelled("the diff was cancelled")

    def get(self) -> tuple[memoryview, list[Facts] | None]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


def same_bytes(a: memoryview, b: memoryview, scratch: Scratch) -> bool:
    """memcmp of two byte views, without copies (memoryviews compare element by element:
    16 ms for 8 MiB; this takes under 1 ms)."""
    import numpy as np

    if len(a) != len(b):
        return False
    w = 4 if len(a) % 4 == 0 else 1
    x, y = np.frombuffer(a, f"u{w}"), np.frombuffer(b, f"u{w}")
    return not np.not_equal(x, y, out=scratch.get(8, len(x), "?")).any()


def _facts(data: memoryview, dtype: str, scratch: Scratch, slot: int = 0) -> Facts:
    """NaN count, Inf count and the float64 sum of squares of the finite values. The squares
    are exact (products of fp32/fp16/bf16 values in float64) and summed in float64; a finite
    sum proves every value finite (NaN and Inf survive squaring and summing), so the NaN/Inf
    count costs nothing unless there are some (or squares overflow float64)."""
    import numpy as np

    x = values(data, dtype, scratch, slot)
    sq = float(np.einsum("i,i->", x, x, dtype=np.float64))
    if math.isfinite(sq):
        return 0, 0, sq
    finite = np.isfinite(x)
    nan, inf = _nonfinite(x, finite)
    x = x[finite]
    return nan, inf, float(np.einsum("i,i->", x, x, dtype=np.float64))


def _compare(p: ParamDiff, dtype_a: str, dtype_b: str, ba: memoryview, bb: memoryview,
             start: int, exact: bool, atol: float, rtol: float, scratch: Scratch) -> None:
    """Fold one window of a param whose bytes are not A's into `p` (its NaN/Inf and ||a||^2
    are counted by the caller)."""
    import numpy as np

    p.identical = False
    x, y = as_float64(ba, dtype_a, scratch, 0), as_float64(bb, dtype_b, scratch, 1)
    n = len(x)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(np.subtract(x, y, out=scratch.get(2, n)), out=scratch.get(2, n))
        sq = float(np.einsum("i,i->", d, d))
        if math.isfinite(sq):  # every |a-b| finite: no NaN or Inf on either side here
            p.diff_sq += sq
            if n:
                p.max_abs = max(p.max_abs, float(d.max()))
            if exact and dtype_a == dtype_b:  # bit-identity: -0 vs 0 differ too
                bad = _unequal_elements(ba, bb, dtype_a)
            else:  # x == y means d == 0 <= the tolerance: the same test as below
                tol = np.multiply(np.abs(y, out=scratch.get(3, n)), rtol, out=scratch.get(3, n))
                bad = np.greater(d, np.add(tol, atol, out=tol), out=scratch.get(4, n, "?"))
        else:
            both_nan = np.isnan(x) & np.isnan(y)
            same_values = x == y  # equal infinities too
            if exact and dtype_a == dtype_b:  # bit-identity: NaN payloads differ too
                bad = _unequal_elements(ba, bb, dtype_a)
            else:
                bad = ~((d <= atol + rtol * np.abs(y)) | both_nan | same_values)
            fin = np.where(np.isfinite(d), d, 0.0)
            p.diff_sq += float(np.einsum("i,i->", fin, fin))
            if (~np.isfinite(d) & ~both_nan & ~same_values).any():
                p.max_abs = math.inf
            elif len(fin):
                p.max_abs = max(p.max_abs, float(fin.max()))
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        p.within = False
        p.differing += n_bad
        if p.first_index is None:
            p.first_index = start + int(np.argmax(bad))


def _unequal_elements(ba: memoryview, bb: memoryview, dtype: str):
    """Per element of `dtype`: do its bytes differ? (compared as unsigned ints of its width)"""
    import numpy as np

    w = DTYPE_SIZES[dtype]
    return np.frombuffer(ba, f"u{w}") != np.frombuffer(bb, f"u{w}")


def _nonfinite(x, finite) -> tuple[int, int]:
    """(NaN, Inf) counts of `x`, given its isfinite mask."""
    import numpy as np

    bad = len(x) - int(np.count_nonzero(finite))
    if not bad:
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(x)))
    return nan, bad - nan


def _windows(pairs):
    """Batches of (ParamDiff, A window, B window, first element) of at most WINDOW bytes a side."""
    batch, size = [], 0
    for p, ta, tb in pairs:
        item = max(DTYPE_SIZES[ta.dtype], DTYPE_SIZES[tb.dtype])
        step = max(1, WINDOW // item)
        for start in range(0, ta.numel, step):
            stop = min(ta.numel, start + step)
            if batch and size + (stop - start) * item > WINDOW:
                yield batch
                batch, size = [], 0
            batch.append((p, _window(ta, start, stop), _window(tb, start, stop), start))
            size += (stop - start) * item
    if batch:
        yield batch


def _window(t: OutputTensor, start: int, stop: int) -> OutputTensor:
    """Elements [start, stop) of `t`, as a flat tensor with the pieces that hold them."""
    item = DTYPE_SIZES[t.src_dtype]
    lo, hi = start * item, stop * item
    pieces, pos = [], 0
    for piece in t.pieces:
        a, b = max(lo, pos), min(hi, pos + piece.nbytes)
        if a < b:
            pieces.append(Piece(piece.path, piece.offset + a - pos, b - a))
        pos += piece.nbytes
    return replace(t, shape=(stop - start,), pieces=pieces, tied_to=None)


def unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for d in reversed(shape):
        out.append(index % d if d else 0)
        index = index // d if d else 0
    return tuple(reversed(out))


def _j(v: float) -> float | None:
    return None if math.isnan(v) else (str(v) if math.isinf(v) else v)
