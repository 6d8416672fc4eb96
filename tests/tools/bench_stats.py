"""Benchmark (not a test): `zinspect stats` and `zinspect diff CKPT MERGED` against the I/O floor.

For each checkpoint (a dir holding `latest`), page cache warm, best of N runs, in one process:

* floor:  copy_tensors of exactly the bytes the merge reads into a sink that drops them
          (for diff: the checkpoint's bytes plus the merged output's)
* stats:  compute_stats over the checkpoint (float64 per chunk, numpy)
* diff:   diff_tensors(checkpoint, its merged safetensors output), bit-identity path

The merged output is written once under --scratch (default /work/scratch/g/bench).
Peak RSS is the process's (ru_maxrss) after each phase. `--before FILE` also times the
diff_tensors of another diff.py (e.g. `git show bd7f209:zinspect/core/diff.py > /tmp/d.py`:
the diff that waited on each window's reads), after the current one, for a before/after.
CPU times are all threads' (process_time) of the best run: steadier than wall time when the
machine is shared.

    python tests/tools/bench_stats.py /work/scratch/b/s3_w4_60M /work/scratch/b/s3_w4_122M --runs 2
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time
from pathlib import Path

from zinspect.cli import main as cli
from zinspect.core.diff import diff_tensors
from zinspect.core.sources import open_source
from zinspect.core.stats import compute_stats
from zinspect.core.stream import ProgressMeter, copy_tensors

CPU: dict[str, float] = {}  # the CPU seconds (all threads) of the last best() run


def best(fn, runs: int) -> float:
    """Best wall time of `runs`; CPU["last"] is that run's CPU time, less noisy than wall time
    on a loaded machine."""
    times = []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, CPU["last"] = min(times)
    return wall


def floor(*tensor_lists) -> None:
    for tensors in tensor_lists:
        copy_tensors(tensors, lambda data: None, ProgressMeter(0, None))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpts", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=Path("/work/scratch/g/bench"))
    ap.add_argument("--before", type=Path, help="a diff.py to time as well (its diff_tensors)")
    args = ap.parse_args()
    before = None
    if args.before:
        spec = importlib.util.spec_from_file_location("diff_before", args.before)
        module = sys.modules["diff_before"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        before = module.diff_tensors
    for ckpt in args.ckpts:
        out = args.scratch / ckpt.name
        if not out.exists():
            assert cli(["merge", str(ckpt), str(out)]) == 0
        bench(ckpt, out, args.runs, before)


def bench(ckpt: Path, out: Path, runs: int, before=None) -> None:
    a = open_source(ckpt).tensors
    b = open_source(out).tensors
    na = sum(t.src_nbytes for t in a if t.tied_to is None)
    nb = sum(t.nbytes for t in b)
    floor(a, b)  # warm the cache
    f1 = best(lambda: floor([t for t in a if t.tied_to is None]), runs)
    f2 = best(lambda: floor(a, b), runs)
    cpu_f2 = CPU["last"]
    ts = best(lambda: compute_stats(a), runs)
    r1 = rss_mib()
    td = best(lambda: diff_tensors(a, b), runs)
    cpu_d = CPU["last"]
    r2 = rss_mib()
    mib = 1 << 20
    print(f"{ckpt.name}: {na / mib:,.0f} MiB read for stats, {(na + nb) / mib:,.0f} MiB for diff")
    print(f"  stats  {ts:6.2f} s  floor {f1:6.2f} s  ({ts / f1:4.1f}x, {na / mib / ts:,.0f} MiB/s)"
          f"  peak RSS {r1:,.0f} MiB")
    print(f"  diff   {td:6.2f} s  floor {f2:6.2f} s  ({td / f2:4.1f}x, {(na + nb) / mib / td:,.0f}"
          f" MiB/s)  peak RSS {r2:,.0f} MiB  CPU {cpu_d:.2f} s (floor's {cpu_f2:.2f} s)")
    if before is not None:
        tb = best(lambda: before(a, b), runs)
        print(f"  before {tb:6.2f} s  floor {f2:6.2f} s  ({tb / f2:4.1f}x)  peak RSS {rss_mib():,.0f} MiB"
              f"  CPU {CPU['last']:.2f} s")


if __name__ == "__main__":
    main()
