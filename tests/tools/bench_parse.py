#!/usr/bin/env python3
"""Where the time goes when zinspect reads one torch.save zip (a large model-states file).

Not a test: prints the thread CPU of each step of `torchzip.read_torch_file` (best of N, the
garbage collector paused as zinspect pauses it): the usual path (chunks, scan, C unpickler) and,
for a pickle with runs of alike entries (a ZeRO-3 model states'), the one read_torch_file takes
(`pickle_runs`); the bare C unpickler on the same bytes for scale, and the peak RSS of one whole
`read_torch_file` in a fresh child process.

    python tests/tools/bench_parse.py CKPT/global_stepN/zero_pp_rank_0_mp_rank_00_model_states.pt
        [--runs 3]
"""

from __future__ import annotations

import argparse
import gc
import io
import pickle
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from zinspect.core import fastpickle, pickle_runs, torchzip  # noqa: E402
from zinspect.core.bounded_unpickler import plain  # noqa: E402
from zinspect.core.load import _storages  # noqa: E402
from zinspect.core.pickle_bytes import RecordChunks, read_at  # noqa: E402
from zinspect.core.unpickle import check_tree, work_budget  # noqa: E402

# VmHWM, not ru_maxrss: Linux carries the parent's high-water mark over fork + exec into the
# child's ru_maxrss
_PEAK = """
import sys
from zinspect.core import torchzip
from zinspect.core.gcpause import gc_paused
with gc_paused():
    torchzip.read_torch_file(sys.argv[1])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) // 1024)
"""


class _Bare(pickle.Unpickler):
    """The C unpickler with trivial hooks: its own floor on these bytes."""

    def persistent_load(self, pid):
        return pid

    def find_class(self, module, name):
        return dict if name == "OrderedDict" else (lambda *args: args)


def steps(path: str) -> dict[str, float]:
    out: dict[str, float] = {}

    def timed(what, fn, *args):
        start = time.thread_time()
        result = fn(*args)
        out[what] = time.thread_time() - start
        return result

    f, size = torchzip.open_exact(path)
    with f:
        directory = timed("zip central directory", torchzip.read_directory, f, size)
        timed("local headers (check_directory)", torchzip.check_directory, f, size, directory,
              torchzip.directory_offset(f, size))
        name, header, _, nbytes, crc = next(e for e in directory.entries
                                            if e[0].endswith("data.pkl"))
        del directory
        start = torchzip._record_start(f, header, size)
        chunks = RecordChunks(f, start, nbytes)
        # as torchzip._load_chunked reads a large pickle: read, crc32 and scanned chunk by chunk
        pieces = timed("read + crc32 + scan, in chunks (prepare_chunks_for_c)",
                       fastpickle.prepare_chunks_for_c, chunks, nbytes)
        assert chunks.intact(crc), "data.pkl fails its CRC check"
        raw = read_at(f, start, nbytes)  # whole, for the bare unpickler below
    if pieces is None:
        print("the scan declines this pickle: the bounded reader reads it", file=sys.stderr)
        return out
    up = torchzip.FastMetaUnpickler(io.BufferedReader(fastpickle.PiecesReader(pieces), 1 << 16),
                                    budget_bytes=nbytes)
    with work_budget(up.max_nodes):
        obj = timed("C unpickler with zinspect's rules", pickle.Unpickler.load, up)
    up.memo.clear()
    leaves = frozenset(up.leaf_types) | {str, int, float, bytes, bool, type(None), complex}
    timed("tree check", check_tree, obj, up.max_nodes, 100, "the pickle", leaves)
    timed("plain", plain, obj, leaves)
    del obj, up
    if pickle_runs.may_hold_run(raw[:pickle_runs.SEARCH_BYTES], nbytes):  # as _load_chunked
        runs = timed("runs: prepare_with_runs (proofs, columns, stubs)",
                     pickle_runs.prepare_with_runs, raw)
        if runs is not None:
            up = pickle_runs.RunUnpickler(io.BufferedReader(fastpickle.PiecesReader(runs),
                                                            1 << 16), budget_bytes=nbytes)
            timed("runs: RunUnpickler's load, tree check and plain", up.load)
            del up, runs
    timed("bare C unpickler (for scale)",
          lambda: _Bare(io.BufferedReader(io.BytesIO(raw), 1 << 16)).load())
    whole = time.thread_time()
    tf = torchzip.read_torch_file(path)
    out["read_torch_file, whole"] = time.thread_time() - whole
    timed("storages (load._storages)", _storages, tf)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    best: dict[str, float] = {}
    gc.disable()
    for _ in range(args.runs):
        for what, cpu in steps(args.file).items():
            best[what] = min(best.get(what, cpu), cpu)
        gc.collect()
    gc.enable()
    for what, cpu in best.items():
        print(f"| {what} | {cpu:.3f} s |")
    peak = subprocess.run([sys.executable, "-c", _PEAK, args.file], capture_output=True,
                          text=True, cwd=REPO, check=True).stdout.strip()
    print(f"| peak RSS of read_torch_file (fresh process) | {peak} MiB |")


if __name__ == "__main__":
    main()
