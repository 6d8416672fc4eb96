"""Compare two tensor sources (`sources.Source`) param by param, streaming both sides.

Names are matched after a prefix map (`base_model.model.=` drops PEFT's prefix from A's names).
Matched tensors of one shape are read in windows of at most WINDOW bytes per side through the
merge's stream engine, each side one stream in its own thread (`diff_windows`), and compared
exactly (the bytes, for bit-identity) and in float64 (max |a-b|, ||a-b|| / ||a||;
`diff_values`), so memory stays bounded whatever the model size. This module says what a diff
is (`ParamDiff`, `DiffResult`) and runs one.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from zinspect.core.diff_values import compare_window, same_bytes, window_facts
from zinspect.core.diff_windows import Side, windows
from zinspect.core.model import Finding
from zinspect.core.plan import OutputTensor
from zinspect.core.stats import Scratch, tensor_nonfinite
from zinspect.core.stream import Progress, ProgressMeter, ShouldStop
from zinspect.errors import MergeCancelled, UsageError


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
    batches = list(windows(pairs))
    meter = ProgressMeter(sum(ta.nbytes + tb.nbytes for _, ta, tb in pairs), progress)
    scratch = Scratch()
    stop = threading.Event()
    sides = [Side([[w[k] for w in batch] for batch in batches], stop, should_stop, facts=k == 1)
             for k in (1, 2)]
    try:
        with ThreadPoolExecutor(2, "zinspect-diff") as pool:  # A's and B's streams
            for side in sides:
                pool.submit(side.run)
            try:
                for batch in batches:
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
                        fb = fa if twin else window_facts(bb, wb.dtype, scratch, 5)
                        p.nan_a, p.inf_a, p.a_sq = p.nan_a + fa[0], p.inf_a + fa[1], p.a_sq + fa[2]
                        p.nan_b, p.inf_b = p.nan_b + fb[0], p.inf_b + fb[1]
                        if not twin:
                            compare_window(p, wa.dtype, wb.dtype, ba, bb, start, exact, atol, rtol, scratch)
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


def unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for d in reversed(shape):
        out.append(index % d if d else 0)
        index = index // d if d else 0
    return tuple(reversed(out))


def _j(v: float) -> float | None:
    return None if math.isnan(v) else (str(v) if math.isinf(v) else v)
