"""Benchmark (not a test): `merge --dtype bf16/fp16` against the fp32 merge and the I/O floor.

In one warm process, best of N runs each: the engine (`zinspect.core.merge.merge`: plan, read,
convert, write, fsync, rename) for each dtype, and the floor for each dtype: pread exactly the
bytes the merge reads and write (and fsync) as many bytes as it writes, with no conversion.

    python tests/tools/bench_dtype.py /work/scratch/b/s3_w4_122M /work/scratch/h/bench --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from zinspect.core import open_checkpoint  # noqa: E402
from zinspect.core.dtypes import output_dtype  # noqa: E402
from zinspect.core.merge import merge, plan_merge  # noqa: E402


def floor(plan, out: Path) -> float:
    started = time.perf_counter()
    fds: dict[str, int] = {}
    buf = bytearray(2 << 20)
    fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left_out = plan.total_bytes
        for t in plan.tensors:
            for p in t.pieces:
                fd = fds.get(p.path) or fds.setdefault(p.path, os.open(p.path, os.O_RDONLY))
                off, left = p.offset, p.nbytes
                while left:
                    n = os.preadv(fd, [memoryview(buf)[:min(left, len(buf))]], off)
                    off, left = off + n, left - n
        while left_out:  # written separately: the floor overlaps nothing
            left_out -= os.write(fd_out, memoryview(buf)[:min(left_out, len(buf))])
        os.fsync(fd_out)
    finally:
        os.close(fd_out)
        for fd in fds.values():
            os.close(fd)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("scratch")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    a = ap.parse_args()
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    ckpt = open_checkpoint(a.ckpt)
    for name in a.dtypes.split(","):
        plan = plan_merge(ckpt, dtype=output_dtype(name))
        best_engine = best_floor = float("inf")
        for _ in range(a.runs + 1):  # the first run warms the page cache
            out = scratch / f"out_{name}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            merge(ckpt, out, dtype=name, hf_files=False, max_shard_size=None)
            best_engine = min(best_engine, time.perf_counter() - t0)
            shutil.rmtree(out, ignore_errors=True)
            best_floor = min(best_floor, floor(plan, scratch / "floor.bin"))
            (scratch / "floor.bin").unlink()
        mb = plan.total_bytes / 1e6
        print(f"{name}: read {plan.read_bytes / 1e6:.0f} MB, write {mb:.0f} MB: engine "
              f"{best_engine:.2f} s, floor {best_floor:.2f} s "
              f"({best_engine / best_floor:.2f}x the floor)", flush=True)


if __name__ == "__main__":
    main()
