"""Benchmark (not a test): the planning memory and time of `zinspect reshard` on a big (sparse)
checkpoint, without moving its bytes: every unit (one new rank's files) planned, sized and
dropped, as the reshard's first pass does (the second plans each unit again and streams it).

    python tests/tools/bench_reshard_plan.py CKPT --world-size N

Prints the open time, then the planning time, peak RSS (ru_maxrss: the whole run so far),
files, pieces and output size. A sparse 69B-param checkpoint over 512 ranks comes from
tests/tools/make_sparse_ckpt.py (828 GB apparent, ~100 MB on disk).
"""

from __future__ import annotations

import argparse
import resource
import time

from zinspect.core import open_checkpoint
from zinspect.core.reshard_slices import reshape
from zinspect.core.reshard_zero import plan_units
from zinspect.core.torchsave import output_bytes, stream_tensors


def _rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--world-size", type=int, required=True)
    args = ap.parse_args()
    t = time.monotonic()
    ckpt = open_checkpoint(args.ckpt)
    print(f"open {time.monotonic() - t:.1f} s, peak {_rss_mb()} MB")
    t = time.monotonic()
    units, _ = plan_units(ckpt, reshape(ckpt, args.world_size))
    files = pieces = nbytes = 0
    for unit in units:
        planned = unit()
        files += len(planned)
        nbytes += output_bytes(planned)
        pieces += sum(len(x.pieces) for x in stream_tensors(planned))
    print(f"plan {time.monotonic() - t:.1f} s, peak {_rss_mb()} MB: {files} files, {pieces} pieces, "
          f"{nbytes / 2**30:.0f} GiB")


if __name__ == "__main__":
    main()
