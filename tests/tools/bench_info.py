#!/usr/bin/env python3
"""Benchmark `zinspect info --json` and `zinspect validate` against a plain `torch.load` of the
same files.

Not a test: it prints a markdown table of wall time (best of N, and median), CPU time (user +
sys of the best run: on a shared machine the fairer number), bytes read and peak RSS, for each
checkpoint given, warm (page cache filled by a first unmeasured run) and, with --cold, cold
(`sync; echo 3 > /proc/sys/vm/drop_caches` before every run; needs root).

    python tests/tools/bench_info.py /work/bench/s3_w4_large [--runs 5] [--cold]
        [--torch-python /path/to/python]   # an interpreter with torch (and ideally DeepSpeed)
        [--before /tmp/zinspect-before]    # the source tree of an older zinspect, side by side

Every command runs in a child process. Its bytes read come from the child's own
/proc/self/io, written at exit by a tiny wrapper (`read_bytes`: what came from the block
device, meaningful for cold runs; `rchar`: every byte returned by read(), page cache included),
and its peak RSS from wait4's rusage. Both numbers include the interpreter's own start-up
reads (.pyc files, and torch's shared libraries for the baseline), so startup rows run
`zinspect --version` (interpreter + the CLI module, no checkpoint) and `import torch`, and the
"beyond startup" columns subtract them.

The baseline is `torch.load(f, weights_only=False, map_location="cpu")` of every .pt file of
the tag dir, all kept in memory, as DeepSpeed's zero_to_fp32.py does. Unpickling real
DeepSpeed files with weights_only=False imports DeepSpeed classes; when the interpreter has
no DeepSpeed, the missing classes are replaced by stubs (the tensors are read all the same).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WRAPPER = r"""
import atexit, os, sys
_out = os.environ.pop("ZBENCH_IO")
def _dump():
    with open("/proc/self/io") as f:
        data = f.read()
    with open(_out, "w") as g:
        g.write(data)
atexit.register(_dump)
"""

TORCH_LOAD = r"""
import pickle, sys, torch

class _Stub:
    def __init__(self, *a, **k): pass
    def __setstate__(self, state): self.state = state

class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {})

class _PickleModule:
    Unpickler = _Unpickler
    load = staticmethod(lambda f, **kw: _Unpickler(f, **kw).load())
    def __getattr__(self, name): return getattr(pickle, name)

loaded = []
for path in sys.argv[1:]:
    try:
        loaded.append(torch.load(path, weights_only=False, map_location="cpu"))
    except ModuleNotFoundError:
        loaded.append(torch.load(path, weights_only=False, map_location="cpu",
                                 pickle_module=_PickleModule()))
"""


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_once(argv: list[str], cold: bool, cwd: Path = REPO) -> dict:
    """Run a wrapped python child; its wall time, /proc/self/io at exit and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        io_file = Path(tmp) / "io"
        out_file = Path(tmp) / "out"
        if cold:
            drop_caches()
        # bytecode cached, as an installed zinspect has it (pip compiles it): a shell that sets
        # PYTHONDONTWRITEBYTECODE would recompile every module on every run (~0.13 s)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["ZBENCH_IO"] = str(io_file)
        with open(out_file, "wb") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, env=env, cwd=cwd)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.returncode not in (0, 1):  # 1: validate found something
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{err}")
        io = dict(line.split(": ") for line in io_file.read_text().splitlines())
        return {"wall": wall, "read_bytes": int(io["read_bytes"]), "rchar": int(io["rchar"]),
                "rss": usage.ru_maxrss * 1024, "cpu": usage.ru_utime + usage.ru_stime}


def measure(argv: list[str], runs: int, cold: bool, cwd: Path = REPO) -> dict:
    if not cold:
        run_once(argv, cold=False, cwd=cwd)  # fill the page cache
    samples = [run_once(argv, cold, cwd) for _ in range(runs)]
    best = min(samples, key=lambda s: s["wall"])
    return {**best, "median": statistics.median(s["wall"] for s in samples),
            "rss": max(s["rss"] for s in samples)}


def zinspect_argv(python: str, *args: str) -> list[str]:
    code = WRAPPER + ("import runpy; sys.argv = ['zinspect', *sys.argv[1:]]; "
                      "runpy.run_module('zinspect', run_name='__main__', alter_sys=True)")
    return [python, "-c", code, *args]


def torch_argv(python: str, files: list[Path]) -> list[str]:
    return [python, "-c", WRAPPER + TORCH_LOAD, *map(str, files)]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="checkpoint dirs (root or tag dir)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    ap.add_argument("--cold", action="store_true",
                    help="also measure with the page cache dropped before every run (root)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter with zinspect installed (default: this one)")
    ap.add_argument("--torch-python", default=sys.executable,
                    help="interpreter for the torch.load baseline (default: this one)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.load baseline")
    ap.add_argument("--before", type=Path, default=None,
                    help="source tree of an older zinspect: its rows are measured beside these")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from zinspect.core.discover import locate

    modes = [False, True] if args.cold else [False]
    rows = []
    for path in args.paths:
        tag_dir = locate(path).tag_dir
        files = sorted(tag_dir.glob("*.pt"))
        total = sum(f.stat().st_size for f in files)
        label = f"{path.name or path} ({human(total)}, {len(files)} files)"
        jobs = []
        for tree, suffix in [(REPO, "")] + ([(args.before, " (before)")] if args.before else []):
            jobs += [(f"python startup (`zinspect --version`){suffix}",
                      zinspect_argv(args.python, "--version"), tree),
                     (f"`zinspect info --json`{suffix}",
                      zinspect_argv(args.python, "info", "--json", str(path.resolve())), tree),
                     (f"`zinspect validate`{suffix}",
                      zinspect_argv(args.python, "validate", str(path.resolve())), tree)]
        if not args.no_torch:
            jobs.append(("torch startup (`import torch`)",
                         [args.torch_python, "-c", WRAPPER + "import torch"], REPO))
            jobs.append(("`torch.load` of every file", torch_argv(args.torch_python, files), REPO))
        for cold in modes:
            for what, argv, tree in jobs:
                print(f"... {path} {what} {'cold' if cold else 'warm'}", file=sys.stderr)
                r = measure(argv, args.runs, cold, tree)
                rows.append((label, what, "cold" if cold else "warm", r, total))

    print(f"\nbest of {args.runs} runs (median in brackets). read_bytes: from disk (cold runs); "
          "rchar: all read() bytes. Beyond startup: minus the matching startup row (same "
          "interpreter, checkpoint and cache state), as % of the checkpoint's bytes.\n")
    print("| checkpoint | command | cache | wall time | CPU time | read_bytes | rchar "
          "| read_bytes beyond startup | rchar beyond startup | peak RSS |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for label, what, cache, r, total in rows:
        family = "torch" if "torch" in what else "before" if "(before)" in what else "zinspect"
        if "startup" in what:
            base[label, cache, family] = r
        b = base.get((label, cache, family))
        extra = ("| - | - " if r is b else
                 f"| {human(r['read_bytes'] - b['read_bytes'])} "
                 f"({100 * (r['read_bytes'] - b['read_bytes']) / total:.2f} %) "
                 f"| {human(r['rchar'] - b['rchar'])} "
                 f"({100 * (r['rchar'] - b['rchar']) / total:.2f} %) ")
        print(f"| {label} | {what} | {cache} | {r['wall']:.3f} s ({r['median']:.3f}) "
              f"| {r['cpu']:.3f} s "
              f"| {human(r['read_bytes'])} | {human(r['rchar'])} {extra}| {human(r['rss'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
