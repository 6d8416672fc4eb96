"""16-bit output: fp32 (or 16-bit) values narrowed to bf16 / fp16, bit-identical to torch's
`.to(torch.bfloat16)` / `.to(torch.float16)` on CPU.

Both round to nearest, ties to even. NaNs follow what torch 2.x writes on x86 CPUs (measured):
every NaN becomes 0xFFFF in bf16; in fp16 a NaN keeps its sign and the top 10 bits of its
payload with the quiet bit set (the F16C instruction's rule; numpy's own cast leaves a
signalling NaN signalling, so those lanes are fixed up). numpy is imported here only, lazily:
an fp32 merge never needs it.
"""

from __future__ import annotations

#: output dtypes by the name users give (`--dtype`) -> the dtype name the plan uses
OUTPUT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NARROW = ("bfloat16", "float16")
#: what every NaN becomes in bf16 (torch's vectorised CPU cast)
BF16_NAN = 0xFFFF


def output_dtype(name: str) -> str:
    """'bf16' (or 'bfloat16') -> 'bfloat16'; raises ValueError for anything else."""
    if name in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[name]
    if name in OUTPUT_DTYPES.values():
        return name
    raise ValueError(f"unknown output dtype {name!r}; use one of: {', '.join(OUTPUT_DTYPES)}")


def narrow(src: str, dst: str, data: memoryview, scratch: bytearray) -> tuple[memoryview, int]:
    """`data` (elements of `src`) as `dst` (bf16 or fp16), written into `scratch`. Returns the
    converted bytes and how many finite values overflowed to +-inf."""
    import numpy as np

    width = 4 if src == "float32" else 2
    n = len(data) // width
    if src == "float32":
        f32 = np.frombuffer(data, dtype=np.float32, count=n)
    elif src == "bfloat16":
        f32 = (np.frombuffer(data, dtype=np.uint16, count=n).astype(np.uint32) << 16).view(np.float32)
    elif src == "float16":
        f32 = np.frombuffer(data, dtype=np.float16, count=n).astype(np.float32)
    else:
        raise ValueError(f"no conversion from {src} to {dst}")
    out = np.frombuffer(scratch, dtype=np.uint16, count=n)
    with np.errstate(over="ignore", invalid="ignore"):
        if dst == "bfloat16":
            _to_bf16(np, f32, out)
        elif dst == "float16":
            _to_fp16(np, f32, out)
        else:
            raise ValueError(f"no conversion from {src} to {dst}")
    infs = np.count_nonzero((out & 0x7FFF) == (0x7F80 if dst == "bfloat16" else 0x7C00))
    overflow = int(infs - np.count_nonzero(np.isinf(f32))) if infs else 0
    return memoryview(scratch)[: 2 * n], overflow


def _to_bf16(np, f32, out) -> None:
    u = f32.view(np.uint32)
    t = u >> 16  # in place from here: one temporary for the whole batch
    t &= 1
    t += 0x7FFF
    t += u  # wraps only for NaNs (0xFFFF8000...), replaced below
    t >>= 16
    out[:] = t
    nan = np.isnan(f32)
    if nan.any():
        out[nan] = BF16_NAN


def _to_fp16(np, f32, out) -> None:
    out[:] = f32.astype(np.float16).view(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        u = f32.view(np.uint32)[nan]
        out[nan] = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)
