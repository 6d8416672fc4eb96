#!/usr/bin/env python3
"""Real DeepSpeed checkpoints of an optimizer that is not Adam, for tests/test_optimizer.py:
make_ds_checkpoints.py's toy run with torch.optim.SGD (momentum 0.9) as the client optimizer,
so each rank's optimizer state holds `momentum_buffer` instead of exp_avg / exp_avg_sq.

    /work/dsvenv/bin/python tests/tools/make_optim_fixtures.py tests/fixtures/optim

writes tests/fixtures/optim/sgd_s2_w2_fp32 (ZeRO-2, 2 ranks). The patch (after deepspeed is
imported: it subclasses AdamW) sits at the top level of this script: the rank processes
(spawned) import it again as __mp_main__ and get it too.
DeepSpeed's zero_to_fp32.py / zero_to_torch.py copies are deleted (we do not commit them).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402, F401  (first: its classes derive from the real AdamW)
import make_ds_checkpoints  # noqa: E402
import torch  # noqa: E402


def _sgd(groups, betas=None, **kwargs):
    return torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True)


torch.optim.AdamW = _sgd

FIXTURES = {"sgd_s2_w2_fp32": ["--stage", "2", "--world-size", "2", "--dtype", "fp32", "--steps", "2"]}


def main() -> None:
    out_root = sys.argv[1]
    for name, args in FIXTURES.items():
        out = os.path.join(out_root, name)
        make_ds_checkpoints.main(["--out", out, *args])
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            if os.path.exists(os.path.join(out, script)):
                os.remove(os.path.join(out, script))
        path = os.path.join(out, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        manifest["generator"] = "make_optim_fixtures.py (make_ds_checkpoints.py with SGD momentum)"
        manifest["optimizer"] = "torch.optim.SGD(momentum=0.9, nesterov=True)"
        manifest["files"] = {k: v for k, v in manifest["files"].items()
                             if not k.startswith("zero_to_")}
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
