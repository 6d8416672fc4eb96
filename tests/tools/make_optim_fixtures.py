#!/usr/bin/env python3
"""Real DeepSpeed checkpoints of optimizers that are not Adam, for tests/test_optimizer.py and
test_state_merge.py: the toy runs of make_ds_checkpoints.py (ZeRO-1/2) and make_ds_variants.py
(ZeRO-0) with another torch optimizer as the client optimizer, so the optimizer state holds its
own per-param state instead of exp_avg / exp_avg_sq:

    sgd_s2_w2_fp32      ZeRO-2, 2 ranks, SGD (momentum 0.9, nesterov): momentum_buffer
    adagrad_s0_fp32     ZeRO-0 (the torch state per param in the model states), Adagrad: sum, step

    /work/dsvenv/bin/python tests/tools/make_optim_fixtures.py tests/fixtures/optim [NAME ...]

The patch (after deepspeed is imported: it subclasses AdamW) sits at the top level of this
script: the rank processes (spawned) import it again as __mp_main__ and get it too; which
optimizer is patched in travels to them in ZINSPECT_FIXTURE_OPTIMIZER.
DeepSpeed's zero_to_fp32.py / zero_to_torch.py copies are deleted (we do not commit them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402, F401  (first: its classes derive from the real AdamW)
import make_ds_checkpoints  # noqa: E402
import make_ds_variants  # noqa: E402
import torch  # noqa: E402


def _sgd(groups, betas=None, **kwargs):
    return torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True)


def _adagrad(groups, betas=None, **kwargs):
    return torch.optim.Adagrad(groups, lr=0.01)


OPTIMIZERS = {  # name -> (client optimizer in place of AdamW, what the manifest says)
    "sgd": (_sgd, "torch.optim.SGD(momentum=0.9, nesterov=True)"),
    "adagrad": (_adagrad, "torch.optim.Adagrad(lr=0.01)"),
}
torch.optim.AdamW = OPTIMIZERS[os.environ.get("ZINSPECT_FIXTURE_OPTIMIZER", "sgd")][0]

FIXTURES = {  # name -> (optimizer, generator, its arguments)
    "sgd_s2_w2_fp32": ("sgd", make_ds_checkpoints,
                       ["--stage", "2", "--world-size", "2", "--dtype", "fp32", "--steps", "2"]),
    # (Adagrad at ZeRO-1/2 fails in DeepSpeed 0.19.8's gradient partitioning: IndexError in
    # _get_flat_partition_unpadded)
    "adagrad_s0_fp32": ("adagrad", make_ds_variants,
                        ["--stage", "0", "--world-size", "2", "--dtype", "fp32", "--steps", "2"]),
}


def main() -> None:
    out_root, names = sys.argv[1], sys.argv[2:] or list(FIXTURES)
    for name in names:
        optimizer = FIXTURES[name][0]
        if os.environ.get("ZINSPECT_FIXTURE_OPTIMIZER", "sgd") == optimizer:
            make(out_root, name)
        else:  # the optimizer is patched in at import: a process of its own
            subprocess.run([sys.executable, os.path.abspath(__file__), out_root, name], check=True,
                           env={**os.environ, "ZINSPECT_FIXTURE_OPTIMIZER": optimizer})


def make(out_root: str, name: str) -> None:
    optimizer, generator, args = FIXTURES[name]
    out = os.path.join(out_root, name)
    generator.main(["--out", out, *args])
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        if os.path.exists(os.path.join(out, script)):
            os.remove(os.path.join(out, script))
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["generator"] = f"make_optim_fixtures.py ({generator.__name__}.py with {optimizer})"
    manifest["optimizer"] = OPTIMIZERS[optimizer][1]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("zero_to_")}
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
