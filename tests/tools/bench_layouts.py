#!/usr/bin/env python3
"""Thread CPU of what opening a checkpoint does after the parse: the layouts (names, Params,
geometry), validate, and `info --json`'s report and writing, with the files' parse done once and
reused (so the numbers are not buried under it). Not a test.

    python tests/tools/bench_layouts.py CKPT [--runs 3]

Prints the best of N of each step; run it from the source tree to measure (PYTHONPATH=TREE for
another). Not included: the parse and what runs with it (load._storages); at 297k names
(tmp/speed/z3_297k) the parse of the rank-0 model states is ~2.6 s more.
"""

from __future__ import annotations

import argparse
import dataclasses
import time


class _Discard:
    def write(self, text: str) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from zinspect.core import gc_paused, load
    from zinspect.core.validate import validate
    from zinspect.report_json import write_info_json

    parsed: dict = {}
    parse_files = load._parse_files  # noqa: SLF001 (reused: the parse is not what is measured)

    def parse_once(named, tick):
        key = tuple(n.path for n in named)
        if key not in parsed:
            parsed[key] = parse_files(named, tick)
        return {path: (dataclasses.replace(rf), tf) for path, (rf, tf) in parsed[key].items()}

    load._parse_files = parse_once  # noqa: SLF001
    best: dict[str, float] = {}
    with gc_paused():  # as open_checkpoint runs them
        load.load_checkpoint(args.ckpt)
        for _ in range(args.runs):
            t0 = time.thread_time()
            ckpt = load.load_checkpoint(args.ckpt)
            t1 = time.thread_time()
            validate(ckpt)
            t2 = time.thread_time()
            write_info_json(ckpt, _Discard())
            t3 = time.thread_time()
            for step, took in (("layouts", t1 - t0), ("validate", t2 - t1), ("info --json", t3 - t2)):
                best[step] = min(best.get(step, float("inf")), took)
            del ckpt
    print(f"{args.ckpt}: best of {args.runs}, thread CPU, the files parsed once")
    for step, took in best.items():
        print(f"  {step:12s} {took:.3f} s")


if __name__ == "__main__":
    main()
