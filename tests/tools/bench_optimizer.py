#!/usr/bin/env python3
"""Benchmark the optimizer facts and the optimizer view's per-param numbers on a checkpoint.

Not a test: for each PATH it prints the time to open the checkpoint, to read the optimizer's
facts (`read_optimizer`, what `zinspect info` adds) and to stream every trainable param's master,
exp_avg and exp_avg_sq through `optimizer_stats` (what `p` in the app computes), with the bytes
read, the rate and the process's peak RSS. Best of --runs (warm page cache after the first).

    .venv/bin/python tests/tools/bench_optimizer.py /path/to/checkpoint [--runs 3]
"""

from __future__ import annotations

import argparse
import resource
import time

from zinspect.core import open_checkpoint
from zinspect.core.optimizer import read_optimizer, summary_line
from zinspect.core.optimizer_stats import optimizer_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print("| checkpoint | open | read_optimizer | optimizer_stats | read | rate | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for path in args.paths:
        best = None
        for _ in range(args.runs):
            t0 = time.perf_counter()
            ckpt = open_checkpoint(path)
            t1 = time.perf_counter()
            opt = read_optimizer(ckpt)
            t2 = time.perf_counter()
            result = optimizer_stats(ckpt, opt)
            t3 = time.perf_counter()
            times = (t1 - t0, t2 - t1, t3 - t2)
            best = times if best is None or times[2] < best[2] else best
        nbytes = sum(p.numel * (12 if p.update is not None else 4) for p in result.params)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {path} | {best[0]:.3f} s | {best[1] * 1000:.1f} ms | {best[2]:.2f} s | "
              f"{nbytes / 2**30:.2f} GiB | {nbytes / 2**20 / best[2]:.0f} MiB/s | {rss:.0f} MiB |")
        print(f"<!-- {summary_line(opt)} -->")


if __name__ == "__main__":
    main()
