"""`zinspect diff`'s comparison of one window of a param: the bytes of A and B, read by
`diff_windows`, folded into the param's `ParamDiff` (max |a-b|, ||a-b||^2, the elements not within
tolerance and the first of them) and A's NaN/Inf and ||a||^2 (`Facts`), all in numpy, in float64.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from zinspect.core.stats import Scratch, as_float64, nonfinite_counts, values
from zinspect.core.torchzip import DTYPE_SIZES

if TYPE_CHECKING:
    from zinspect.core.diff import ParamDiff

#: what is counted of each tensor of a window: (NaN count, Inf count, sum of squares of the
#: finite values)
Facts = tuple[int, int, float]


def same_bytes(a: memoryview, b: memoryview, scratch: Scratch) -> bool:
    """memcmp of two byte views, without copies (memoryviews compare element by element:
    16 ms for 8 MiB; this takes under 1 ms)."""
    import numpy as np

    if len(a) != len(b):
        return False
    w = 4 if len(a) % 4 == 0 else 1
    x, y = np.frombuffer(a, f"u{w}"), np.frombuffer(b, f"u{w}")
    return not np.not_equal(x, y, out=scratch.get(8, len(x), "?")).any()


def window_facts(data: memoryview, dtype: str, scratch: Scratch, slot: int = 0) -> Facts:
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
    nan, inf = nonfinite_counts(x, finite)
    x = x[finite]
    return nan, inf, float(np.einsum("i,i->", x, x, dtype=np.float64))


def compare_window(p: ParamDiff, dtype_a: str, dtype_b: str, ba: memoryview, bb: memoryview,
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
