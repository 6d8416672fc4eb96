"""Byte work the stream's reader threads do on a batch before it is written: interleave the rows
of tensor-parallel shards (`weave`), and compare a replica with the copy written
(`max_abs_diff`). Stdlib only: a safetensors merge imports neither numpy nor torch.
"""

from __future__ import annotations

import math

from zinspect.core.plan import Weave

#: memoryview formats of the dtypes a replica may hold (bf16 is widened to fp32 first)
_FORMATS = {"float32": "f", "float64": "d", "float16": "e", "bfloat16": "f", "int64": "q",
            "int32": "i", "int16": "h", "int8": "b", "uint8": "B", "bool": "?"}


def weave(data: memoryview, w: Weave, out: bytearray) -> int:
    """Interleave `data` (each part's rows, part after part) into `out` as `w.rows` output rows;
    returns the bytes written. Per part, the cheaper of one slice copy per row or one strided
    copy per byte of the run (tall, narrow runs: a few strided copies instead of many rows)."""
    row = sum(take for _, take in w.parts)
    rows, base, col, src = w.rows, 0, 0, data
    for stride, take in w.parts:
        if rows <= take:
            for i in range(rows):
                at = base + i * stride
                out[i * row + col:i * row + col + take] = src[at:at + take]
        else:
            end = base + (rows - 1) * stride + 1
            for b in range(take):
                out[col + b:rows * row:row] = src[base + b:end + b:stride]
        base += (rows - 1) * stride + take
        col += take
    return rows * row


def max_abs_diff(a, b, dtype: str) -> float:
    """The largest |a - b| over the elements of two equally long byte strings of `dtype`
    (inf where one is NaN and the other is not; two NaNs count as equal)."""
    if dtype == "bfloat16":
        a, b = _bf16_as_fp32(a), _bf16_as_fp32(b)
    fmt = _FORMATS.get(dtype)
    if fmt is None:  # an unknown dtype: differing bytes are all that can be said
        return math.inf
    worst = 0.0
    for x, y in zip(memoryview(a).cast("B").cast(fmt), memoryview(b).cast("B").cast(fmt),
                    strict=True):
        if x != y:
            if x != x or y != y:  # NaN
                if x == x or y == y:
                    return math.inf
                continue
            worst = max(worst, abs(float(x) - float(y)))
    return worst


def _bf16_as_fp32(data) -> bytearray:
    data = memoryview(data).cast("B")
    out = bytearray(2 * len(data))
    out[2::4] = data[0::2]
    out[3::4] = data[1::2]
    return out
