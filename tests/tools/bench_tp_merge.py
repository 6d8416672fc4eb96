"""Benchmark (not a test): `zinspect merge` of a tensor-parallel checkpoint against the I/O floor,
and DeepSpeed's only route for one (ds_to_universal.py, which writes a universal folder, not a
model file: zero_to_fp32.py fails on TP checkpoints).

Page cache warm, best of N runs; the floor and the in-process engine are bench_merge.py's (read
exactly the planned bytes, then write and fsync the output's size). Make a checkpoint with

    /work/dsvenv/bin/python tests/tools/make_ds_autotp.py --out tmp/tp/big --model llama \\
        --world-size 4 --tp 2 --stage 2 --dtype bf16 --hidden 1024 --head-dim 64 \\
        --intermediate 2816 --layers 4 --vocab 16384 --tied --steps 1 --batch 1 --seq 16

    python tests/tools/bench_tp_merge.py tmp/tp/big --runs 3 [--ds-universal]

A sparse checkpoint (make_sparse_ckpt.py, e.g. the 70B tp 8 x pp 4 x dp 16 pipeline) is too big
to merge whole: `--exclude GLOB` (repeatable, as `zinspect merge --exclude`) merges a part, and
`--sparse` skips warming the page cache (its holes read as zeros from memory anyway). The "open +
plan" column is the whole checkpoint's open_checkpoint + plan_merge in a warm process.

    python tests/tools/bench_tp_merge.py tmp/pptp/sparse70b --sparse --runs 3 \
        --exclude 'tied_modules.*' --exclude '[4-9].*' --exclude '[1-9][0-9].*'   # layer 3 only
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_merge", Path(__file__).with_name("bench_merge.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def ds_universal(ds_python: str, ckpt: Path, out: Path) -> tuple[float, int]:
    tag = (ckpt / "latest").read_text().strip()
    script = Path(ds_python).parent.parent / "lib"
    found = next(script.glob("python*/site-packages/deepspeed/checkpoint/ds_to_universal.py"))
    shutil.rmtree(out, ignore_errors=True)
    return bench.timed([ds_python, str(found), "--input_folder", str(ckpt / tag), "--output_folder",
                        str(out), "--inject_missing_state"], env={"DS_ACCELERATOR": "cpu"})


ENGINE = """
import sys, time
import zinspect.api  # the imports are not timed
t0 = time.monotonic()
zinspect.api.merge(sys.argv[1], sys.argv[2], exclude=sys.argv[3:])
print(time.monotonic() - t0)
"""


def engine(ckpt: Path, out: Path, exclude: list[str]) -> float:
    """bench_merge's in-process engine, with the merge's --exclude."""
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", ENGINE, str(ckpt), str(out), *exclude],
                          capture_output=True, text=True, check=True)
    return float(proc.stdout)


def open_and_plan(ckpt: Path, exclude: list[str]):
    """(seconds of open_checkpoint + plan_merge of the whole checkpoint, the plan of the part
    the merge writes), in this (warm) process."""
    from zinspect.core import open_checkpoint
    from zinspect.core.plan import plan_merge
    from zinspect.core.selection import Selection

    open_checkpoint(ckpt)  # imports and page cache
    t0 = time.monotonic()
    ckpt_model = open_checkpoint(ckpt)
    plan_merge(ckpt_model)
    seconds = time.monotonic() - t0
    return seconds, plan_merge(ckpt_model, Selection(exclude_globs=list(exclude)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=None, help="where outputs go (same disk)")
    ap.add_argument("--ds-universal", action="store_true", help="also time ds_to_universal.py once")
    ap.add_argument("--ds-python", default="/work/dsvenv/bin/python")
    ap.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="leave out params matching GLOB (zinspect merge --exclude), repeatable")
    ap.add_argument("--sparse", action="store_true", help="do not warm the page cache (sparse files)")
    args = ap.parse_args()
    excluded = [x for g in args.exclude for x in ("--exclude", g)]
    print("| checkpoint | files | output | zinspect merge | peak RSS | engine (in-process) | I/O floor "
          "| zinspect / floor | open + plan (whole) | ds_to_universal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ckpt in args.checkpoints:
        scratch = Path(tempfile.mkdtemp(dir=args.scratch, prefix="zbench-tp-"))
        try:
            if not args.sparse:
                bench.warm(ckpt)
            out = scratch / "zinspect"

            def run(ckpt=ckpt, out=out):
                shutil.rmtree(out, ignore_errors=True)
                return bench.timed([sys.executable, "-m", "zinspect", "merge", str(ckpt), str(out),
                                    *excluded])

            wall, rss = bench.best(args.runs, run)
            shutil.rmtree(out, ignore_errors=True)
            planned, plan = open_and_plan(ckpt, args.exclude)
            fl = [bench.floor(ckpt, scratch, plan) for _ in range(args.runs)]
            floor, read_b, out_b = min(f[0] for f in fl), fl[0][1], fl[0][2]
            eng = min(engine(ckpt, scratch / "engine", args.exclude) for _ in range(args.runs))
            shutil.rmtree(scratch / "engine", ignore_errors=True)
            ds = ds_universal(args.ds_python, ckpt, scratch / "universal") if args.ds_universal else None
            size = sum(f.stat().st_size for f in (ckpt / (ckpt / "latest").read_text().strip()).iterdir())
            print(f"| {ckpt.name} | {size / 1e9:.2f} GB | {out_b / 1e9:.2f} GB | {wall:.2f} s | "
                  f"{rss / 2**20:.0f} MiB | {eng:.2f} s | {floor:.2f} s (read {read_b / 1e9:.2f} GB) | "
                  f"{wall / floor:.2f}x (engine {eng / floor:.2f}x) | {planned:.2f} s | "
                  f"{f'{ds[0]:.1f} s, {ds[1] / 2**20:.0f} MiB' if ds else '-'} |")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
