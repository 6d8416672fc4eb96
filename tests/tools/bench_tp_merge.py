"""Benchmark (not a test): `zinspect merge` of a tensor-parallel checkpoint against the I/O floor,
and DeepSpeed's only route for one (ds_to_universal.py, which writes a universal folder, not a
model file: zero_to_fp32.py fails on TP checkpoints).

Page cache warm, best of N runs; the floor and the in-process engine are bench_merge.py's (read
exactly the planned bytes, then write and fsync the output's size). Make a checkpoint with

    /work/dsvenv/bin/python tests/tools/make_ds_autotp.py --out tmp/tp/big --model llama \\
        --world-size 4 --tp 2 --stage 2 --dtype bf16 --hidden 1024 --head-dim 64 \\
        --intermediate 2816 --layers 4 --vocab 16384 --tied --steps 1 --batch 1 --seq 16

    python tests/tools/bench_tp_merge.py tmp/tp/big --runs 3 [--ds-universal]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=None, help="where outputs go (same disk)")
    ap.add_argument("--ds-universal", action="store_true", help="also time ds_to_universal.py once")
    ap.add_argument("--ds-python", default="/work/dsvenv/bin/python")
    args = ap.parse_args()
    print("| checkpoint | files | output | zinspect merge | peak RSS | engine (in-process) | I/O floor "
          "| zinspect / floor | ds_to_universal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ckpt in args.checkpoints:
        scratch = Path(tempfile.mkdtemp(dir=args.scratch, prefix="zbench-tp-"))
        try:
            bench.warm(ckpt)
            out = scratch / "zinspect"

            def run():
                shutil.rmtree(out, ignore_errors=True)
                return bench.timed([sys.executable, "-m", "zinspect", "merge", str(ckpt), str(out)])

            wall, rss = bench.best(args.runs, run)
            fl = [bench.floor(ckpt, scratch) for _ in range(args.runs)]
            floor, read_b, out_b = min(f[0] for f in fl), fl[0][1], fl[0][2]
            eng = min(bench.engine(ckpt, scratch / "engine") for _ in range(args.runs))
            ds = ds_universal(args.ds_python, ckpt, scratch / "universal") if args.ds_universal else None
            size = sum(f.stat().st_size for f in (ckpt / (ckpt / "latest").read_text().strip()).iterdir())
            print(f"| {ckpt.name} | {size / 1e9:.2f} GB | {out_b / 1e9:.2f} GB | {wall:.2f} s | "
                  f"{rss / 2**20:.0f} MiB | {eng:.2f} s | {floor:.2f} s (read {read_b / 1e9:.2f} GB) | "
                  f"{wall / floor:.2f}x (engine {eng / floor:.2f}x) | "
                  f"{f'{ds[0]:.1f} s, {ds[1] / 2**20:.0f} MiB' if ds else '-'} |")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
