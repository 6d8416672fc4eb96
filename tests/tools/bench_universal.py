"""Benchmark (not a test): the universal writer (`zinspect merge CKPT OUT --format universal`)
beside DeepSpeed's ds_to_universal.py and the I/O floor, in one run on one checkpoint of any
layout the writer takes (plain ZeRO, tensor-parallel, pipeline).

For the checkpoint CKPT (a dir holding `latest`), page cache warm, each contender once unmeasured
then measured (best of --runs); wall time, peak RSS of the whole process tree (ds_to_universal
forks workers), temporary disk (peak bytes under the output dir beyond the final output) and the
output size, measured by bench_reshard.measure:

* floor:           read every byte of the tag dir and write as many (fsync'd)
* universal:       python -m zinspect merge CKPT OUT --format universal
* ds_to_universal: DS_PYTHON -m deepspeed.checkpoint.ds_to_universal --input_folder TAG
                   --output_folder OUT --inject_missing_state (its default workers)

    python tests/tools/bench_universal.py /work/main/tmp/tp/bench_llama_tp2_big \\
        --ds-python /work/dsvenv/bin/python --scratch /work/main/tmp/universal/bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reshard import FLOOR, run_contenders, warm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--ds-python", required=True, help="a python with deepspeed==0.19.8")
    ap.add_argument("--scratch", type=Path, required=True, help="where outputs go (removed)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--skip", action="append", default=[], help="leave out a contender")
    args = ap.parse_args()
    tag = (args.ckpt / "latest").read_text().strip()
    tag_dir = args.ckpt / tag
    src_bytes = sum(p.stat().st_size for p in tag_dir.iterdir())
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    py = sys.executable
    contenders = {
        "floor": ([py, "-c", FLOOR, str(tag_dir), str(args.scratch / "floor")], "floor", {}),
        "universal": ([py, "-m", "zinspect", "merge", str(args.ckpt), str(args.scratch / "universal"),
                       "--format", "universal"], "universal", env),
        "ds_to_universal": ([args.ds_python, "-m", "deepspeed.checkpoint.ds_to_universal",
                             "--input_folder", str(tag_dir), "--output_folder",
                             str(args.scratch / "ds" / f"{tag}_universal"), "--inject_missing_state"],
                            "ds", {"DS_ACCELERATOR": "cpu"}),
    }
    warm(tag_dir)
    print(f"checkpoint {tag_dir} ({src_bytes / 1e6:,.0f} MB)")
    results = run_contenders(contenders, args.scratch, args.runs, args.skip)
    if {"universal", "ds_to_universal"} <= results.keys():
        u, d = results["universal"], results["ds_to_universal"]
        print(f"universal vs ds_to_universal: {d['seconds'] / u['seconds']:.1f}x faster, "
              f"{u['rss'] / d['rss']:.3f} of its peak RSS, {u['temp'] / 2**20:.0f} MB vs "
              f"{d['temp'] / 2**20:.0f} MB temporary disk")
    if {"universal", "floor"} <= results.keys():
        print(f"universal / I/O floor: {results['universal']['seconds'] / results['floor']['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
