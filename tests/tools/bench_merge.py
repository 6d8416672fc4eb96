"""Benchmark (not a test): `zinspect merge` against DeepSpeed's zero_to_fp32.py, and the I/O floor.

For each checkpoint (a dir holding `latest` and DeepSpeed's own zero_to_fp32.py copy), with the
page cache warm, best of N runs, each tool's default output:

* zinspect:     python -m zinspect merge CKPT OUT            (safetensors, fsync'd)
* zero_to_fp32: DS_PYTHON CKPT/zero_to_fp32.py CKPT OUT       (pytorch_model.bin)
* engine:       zinspect.merge(CKPT, OUT) timed inside a warm process (parse, plan, read, write,
                fsync, rename: the run without interpreter start and imports)
* floor:        pread exactly the bytes the merge needs + write (and fsync) the output's size
* before:       with --before SRC (a source tree of an older zinspect, e.g. a `git worktree` of
                the commit before the verifying merge), its CLI and engine too, side by side

Wall time and peak RSS come from /usr/bin/time -v. Each tool runs once unmeasured first, and
the children may write bytecode caches (PYTHONDONTWRITEBYTECODE is dropped), as an installed
tool would have them: otherwise an editable zinspect compiles its modules on every run.
DS_PYTHON is a venv with deepspeed installed (see make_fixtures.py for how to set one up).

    python tests/tools/bench_merge.py /work/bench/s3_w4_fp32_60M /work/bench/s3_w4_large \\
        --ds-python /work/dsvenv/bin/python --runs 3 --before /work/scratch/before
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command under /usr/bin/time -v."""
    env = {**os.environ, **(env or {})}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1]) * 1024
    return wall, rss


def warm(path: Path) -> None:
    for f in path.rglob("*.pt"):
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass


def floor(ckpt: Path, scratch: Path, plan=None) -> tuple[float, int, int]:
    """Read exactly the planned bytes (of `plan`, default the whole merge's), then write and
    fsync as many bytes as the output holds."""
    from zinspect.core import open_checkpoint
    from zinspect.core.plan import plan_merge

    plan = plan or plan_merge(open_checkpoint(ckpt))
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    fds: dict[str, int] = {}
    t0 = time.monotonic()
    for t in plan.tensors:
        for p in t.pieces:
            fd = fds.get(p.path) or fds.setdefault(p.path, os.open(p.path, os.O_RDONLY))
            off, left = p.offset, p.nbytes
            while left:
                n = os.preadv(fd, [view[: min(left, len(buf))]], off)
                off += n
                left -= n
    out = os.open(scratch / "floor.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = plan.total_bytes
    while left:
        left -= os.write(out, view[: min(left, len(buf))])
    os.fsync(out)
    os.close(out)
    wall = time.monotonic() - t0
    for fd in fds.values():
        os.close(fd)
    (scratch / "floor.bin").unlink()
    return wall, plan.read_bytes, plan.total_bytes


ENGINE = """
import sys, time
import zinspect.api  # the imports are not timed
t0 = time.monotonic()
zinspect.api.merge(sys.argv[1], sys.argv[2])
print(time.monotonic() - t0)
"""


def src_env(src: Path | None) -> dict | None:
    """The environment that imports zinspect from `src` (None: the installed one)."""
    return None if src is None else {"PYTHONPATH": str(src)}


def engine(ckpt: Path, out: Path, src: Path | None = None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", ENGINE, str(ckpt), str(out)],
                          capture_output=True, text=True,
                          env={**os.environ, **(src_env(src) or {})})
    if proc.returncode != 0:
        sys.exit(f"the engine run failed on {ckpt}:\n{proc.stderr[-3000:]}")
    return float(proc.stdout)


def best(runs: int, fn) -> tuple[float, int]:
    fn()  # unmeasured: bytecode caches, page cache
    results = [fn() for _ in range(runs)]
    return min(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--ds-python", default="/work/dsvenv/bin/python",
                    help="python of a venv with deepspeed installed")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=None, help="where outputs go (same disk)")
    ap.add_argument("--before", type=Path, default=None,
                    help="source tree of an older zinspect to measure beside this one")
    args = ap.parse_args()
    rows = []
    for ckpt in args.checkpoints:
        scratch = Path(tempfile.mkdtemp(dir=args.scratch, prefix="zbench-"))
        try:
            warm(ckpt)

            def run_zinspect(ckpt=ckpt, scratch=scratch, src=None):
                out = scratch / "zinspect"
                shutil.rmtree(out, ignore_errors=True)
                return timed([sys.executable, "-m", "zinspect", "merge", str(ckpt), str(out)],
                             env=src_env(src))

            def run_ds(ckpt=ckpt, scratch=scratch):
                out = scratch / "ds"
                shutil.rmtree(out, ignore_errors=True)
                return timed([args.ds_python, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out)],
                             env={"DS_ACCELERATOR": "cpu"})

            ds = best(args.runs, run_ds)
            fl_runs = [floor(ckpt, scratch) for _ in range(args.runs)]
            fl = min(r[0] for r in fl_runs)
            read_b, out_b = fl_runs[0][1], fl_runs[0][2]
            for label, src in [("", None)] + ([(" (before)", args.before)] if args.before else []):
                zi = best(args.runs, lambda src=src: run_zinspect(src=src))
                eng = min(engine(ckpt, scratch / "engine", src) for _ in range(args.runs))
                rows.append((ckpt.name + label, out_b, read_b, zi, ds, eng, fl))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    gb = 1e9
    print("| checkpoint | output | zinspect time | zinspect peak RSS | zero_to_fp32 time | "
          "zero_to_fp32 peak RSS | I/O floor | speed-up | RSS ratio | zinspect / floor | "
          "engine (in-process) / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, out_b, read_b, zi, ds, eng, fl in rows:
        print(f"| {name} | {out_b / gb:.2f} GB | {zi[0]:.2f} s | {zi[1] / 2**20:.0f} MiB | "
              f"{ds[0]:.2f} s | {ds[1] / 2**20:.0f} MiB | {fl:.2f} s (read {read_b / gb:.2f} GB) | "
              f"{ds[0] / zi[0]:.1f}x | {ds[1] / zi[1]:.1f}x | {zi[0] / fl:.2f}x | "
              f"{eng:.2f} s, {eng / fl:.2f}x |")


if __name__ == "__main__":
    main()
