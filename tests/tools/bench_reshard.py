"""Benchmark (not a test): `zinspect reshard` and the universal writer beside DeepSpeed's
ds_to_universal.py, and the I/O floor, in one run on one checkpoint.

For the checkpoint CKPT (a dir holding `latest`), page cache warm, each contender once unmeasured
then measured (best of --runs):

* floor:         read every byte of the tag dir and write as many (fsync'd): what any tool that
                 moves every byte once must pay (reshard reads and writes each byte once)
* reshard:       python -m zinspect reshard CKPT OUT --world-size N
* universal:     zinspect.core.universal.write_universal(CKPT, OUT)
* ds_to_universal: DS_PYTHON -m deepspeed.checkpoint.ds_to_universal --input_folder TAG
                 --output_folder OUT [--inject_missing_state] (its default workers)

Wall time; peak RSS summed over the whole process tree (ds_to_universal forks workers), sampled
every 50 ms from /proc; temporary disk = the peak bytes under the output dir beyond the final
output (ds_to_universal's tmp/ of one file per fragment; zinspect writes the output once).

    python tests/tools/bench_reshard.py /work/main/tmp/reshard/bench/src --world-size 3 \\
        --ds-python /work/dsvenv/bin/python --scratch /work/main/tmp/reshard/bench/out
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def measure(cmd: list[str], out: Path, env: dict | None = None) -> dict:
    """Run `cmd`; wall seconds, peak tree RSS, peak and final bytes under `out`."""
    shutil.rmtree(out, ignore_errors=True)
    peak = {"rss": 0, "disk": 0}
    done = threading.Event()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})

    def sample() -> None:
        last_du = 0.0
        while not done.is_set():
            peak["rss"] = max(peak["rss"], _tree_rss(proc.pid))
            if time.monotonic() - last_du > 0.25:
                peak["disk"] = max(peak["disk"], _du(out) if out.exists() else 0)
                last_du = time.monotonic()
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{stdout[-2000:]}\n{stderr[-3000:]}")
    final = _du(out) if out.exists() else 0
    return {"seconds": wall, "rss": peak["rss"], "final": final,
            "temp": max(0, peak["disk"] - final)}


FLOOR = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
buf = bytearray(8 << 20)
for name in sorted(os.listdir(src)):
    fi = os.open(os.path.join(src, name), os.O_RDONLY)
    fo = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT, 0o644)
    while True:
        n = os.readv(fi, [buf])
        if not n:
            break
        mv = memoryview(buf)[:n]
        while len(mv):
            mv = mv[os.write(fo, mv):]
    os.fsync(fo)
    os.close(fi)
    os.close(fo)
"""
UNIVERSAL = ("import sys; from zinspect.core import open_checkpoint; "
             "from zinspect.core.universal import write_universal; "
             "write_universal(open_checkpoint(sys.argv[1]), sys.argv[2])")


def warm(tag_dir: Path) -> None:
    """Read every file of the tag dir once: the page cache warm for every contender."""
    for p in tag_dir.iterdir():
        with open(p, "rb") as f:
            while f.read(8 << 20):
                pass


def run_contenders(contenders: dict, scratch: Path, runs: int, skip) -> dict:
    """{name: (cmd, output dir name, env)} each run once unmeasured (bytecode, page cache),
    then best of `runs`, printed as a table row; {name: best measure}."""
    print(f"{'contender':16} {'seconds':>8} {'peak RSS':>10} {'temp disk':>10} {'output':>10}")
    results = {}
    for name, (cmd, out, extra) in contenders.items():
        if name in skip:
            continue
        measure(cmd, scratch / out, extra)
        best = min((measure(cmd, scratch / out, extra) for _ in range(runs)),
                   key=lambda r: r["seconds"])
        results[name] = best
        print(f"{name:16} {best['seconds']:8.2f} {best['rss'] / 2**20:8.0f} MB "
              f"{best['temp'] / 2**20:8.0f} MB {best['final'] / 2**20:8.0f} MB", flush=True)
        shutil.rmtree(scratch / out, ignore_errors=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--ds-python", required=True, help="a python with deepspeed==0.19.8")
    ap.add_argument("--scratch", type=Path, required=True, help="where outputs go (removed)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--skip", action="append", default=[], help="leave out a contender")
    args = ap.parse_args()
    tag_dir = args.ckpt / (args.ckpt / "latest").read_text().strip()
    src_bytes = sum(p.stat().st_size for p in tag_dir.iterdir())
    here = Path(__file__).resolve().parents[2]
    py = sys.executable
    env = {"PYTHONPATH": str(here)}
    inject = ["--inject_missing_state"]
    contenders = {
        "floor": ([py, "-c", FLOOR, str(tag_dir), str(args.scratch / "floor")], "floor", {}),
        "reshard": ([py, "-m", "zinspect", "reshard", str(args.ckpt), str(args.scratch / "reshard"),
                     "--world-size", str(args.world_size)], "reshard", env),
        "universal": ([py, "-c", UNIVERSAL, str(args.ckpt), str(args.scratch / "universal")],
                      "universal", env),
        "ds_to_universal": ([args.ds_python, "-m", "deepspeed.checkpoint.ds_to_universal",
                             "--input_folder", str(tag_dir), "--output_folder",
                             str(args.scratch / "ds_universal")] + inject, "ds_universal",
                            {"DS_ACCELERATOR": "cpu"}),
    }
    warm(tag_dir)
    print(f"checkpoint {tag_dir} ({src_bytes / 1e6:,.0f} MB), reshard to {args.world_size} ranks")
    results = run_contenders(contenders, args.scratch, args.runs, args.skip)
    if {"universal", "ds_to_universal"} <= results.keys():
        u, d = results["universal"], results["ds_to_universal"]
        print(f"universal vs ds_to_universal: {d['seconds'] / u['seconds']:.1f}x faster, "
              f"{u['rss'] / d['rss']:.3f} of its peak RSS")
    if {"reshard", "floor"} <= results.keys():
        print(f"reshard / I/O floor: {results['reshard']['seconds'] / results['floor']['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
