"""Compare two tensor sources (`sources.Source`) param by param, streaming both sides.

Names are matched after a prefix map (`base_model.model.=` drops PEFT's prefix from A's names).
Matched tensors of one shape are read in windows of at most WINDOW bytes per side through the
merge's stream engine (`copy_tensors`), compared exactly (the bytes, for bit-identity) and in
float64 (max |a-b|, ||a-b|| / ||a||), so memory stays bounded whatever the model size.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from zinspect.core.plan import OutputTensor, Piece
from zinspect.core.stats import Scratch, as_float64
from zinspect.core.stream import BufferSink, Progress, ProgressMeter, ShouldStop, copy_tensors
from zinspect.core.torchzip import DTYPE_SIZES
from zinspect.errors import MergeCancelled, UsageError

WINDOW = 16 << 20  # bytes per side compared at a time


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
                "first_position": list(unravel(self.first_index, self.shape_b))
                if self.first_index is not None else None}


@dataclass
class DiffResult:
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    params: list[ParamDiff] = field(default_factory=list)  # sorted: most changed first

    @property
    def equal(self) -> bool:
        """No name, shape or dtype differences, and every value within tolerance."""
        return not self.only_a and not self.only_b and all(
            p.comparable and p.dtype_a == p.dtype_b and p.within for p in self.params)

    def to_json(self) -> dict:
        return {"equal": self.equal, "only_a": self.only_a, "only_b": self.only_b,
                "shape_mismatch": [p.name for p in self.params if not p.comparable],
                "dtype_mismatch": [p.name for p in self.params if p.dtype_a != p.dtype_b],
                "params": [p.to_json() for p in self.params]}


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
    exact = atol == 0 and rtol == 0
    total = sum(ta.nbytes + tb.nbytes for _, ta, tb in pairs)
    meter = ProgressMeter(total, progress)
    scratch = Scratch()
    try:
        with ThreadPoolExecutor(1, "zinspect-diff") as pool:  # A's window read beside B's
            for batch in _windows(pairs):
                wa = [w for _, w, _, _ in batch]
                wb = [w for _, _, w, _ in batch]
                sa, sb = BufferSink(wa), BufferSink(wb)
                side_a = pool.submit(copy_tensors, wa, sa, ProgressMeter(0, None), should_stop)
                copy_tensors(wb, sb, ProgressMeter(0, None), should_stop)
                side_a.result()
                for (p, ta, tb, start), ba, bb in zip(batch, sa.buffers, sb.buffers, strict=True):
                    _compare(p, ta.dtype, tb.dtype, ba, bb, start, exact, atol, rtol, scratch)
                meter.add(sum(len(x) for x in sa.buffers + sb.buffers), batch[-1][0].name)
                if should_stop is not None and should_stop():
                    raise MergeCancelled("the diff was cancelled")
    except MergeCancelled as e:
        raise MergeCancelled("the diff was cancelled", "nothing was changed") from e
    result.params.sort(key=lambda p: (p.comparable and p.dtype_a == p.dtype_b, p.within,
                                      -p.rel_l2, -p.max_abs, p.name))
    return result


def _compare(p: ParamDiff, dtype_a: str, dtype_b: str, ba: bytearray, bb: bytearray,
             start: int, exact: bool, atol: float, rtol: float, scratch: Scratch) -> None:
    import numpy as np

    if p.identical and ba == bb:
        x = as_float64(ba, dtype_a, scratch)
        x = x if np.isfinite(x).all() else np.where(np.isfinite(x), x, 0.0)
        p.a_sq += float(np.einsum("i,i->", x, x))
        return
    p.identical = False
    x, y = as_float64(ba, dtype_a, scratch, 0), as_float64(bb, dtype_b, scratch, 1)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(x - y)
        both_nan = np.isnan(x) & np.isnan(y)
        same = x == y  # equal infinities too
        if exact and dtype_a == dtype_b:  # bit-identity: -0 vs 0, NaN payloads differ too
            w = DTYPE_SIZES[dtype_a]
            bad = (np.frombuffer(ba, "u1").reshape(-1, w) != np.frombuffer(bb, "u1").reshape(-1, w)
                   ).any(axis=1)
        else:
            bad = ~((d <= atol + rtol * np.abs(y)) | both_nan | same)
        fin = np.where(np.isfinite(d), d, 0.0)
        p.diff_sq += float(np.einsum("i,i->", fin, fin))
        xf = np.where(np.isfinite(x), x, 0.0)
        p.a_sq += float(np.einsum("i,i->", xf, xf))
        if (~np.isfinite(d) & ~both_nan & ~same).any():
            p.max_abs = math.inf
        elif len(fin):
            p.max_abs = max(p.max_abs, float(fin.max()))
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        p.within = False
        p.differing += n_bad
        if p.first_index is None:
            p.first_index = start + int(np.argmax(bad))


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
