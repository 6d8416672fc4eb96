"""The Python API: the same engine as the CLI, for scripts and notebooks.

    import zinspect
    ckpt = zinspect.open_checkpoint("ckpt/")               # metadata only, validated
    sd = zinspect.get_fp32_state_dict("ckpt/")             # {name: fp32 tensor}, needs torch
    zinspect.load_into(model, "ckpt/")                     # strict load_state_dict
    zinspect.merge("ckpt/", "out/", max_shard_size="5GB")  # streamed to safetensors
    zinspect.reshard("ckpt/", "ckpt_ws8/", world_size=8)   # the same run, for 8 ranks
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

from zinspect.core import open_checkpoint
from zinspect.core.merge import MergeResult, drift_axes, drift_warning
from zinspect.core.merge import merge as _merge
from zinspect.core.plan import plan_merge
from zinspect.core.selection import Selection
from zinspect.core.stream import ProgressMeter
from zinspect.core.verify import Verification, plan_without
from zinspect.core.writers import torch_tensors

__all__ = ["get_fp32_state_dict", "load_into", "merge", "open_checkpoint", "reshard"]


def _selection(exclude: Iterable[str], exclude_frozen: bool) -> Selection:
    return Selection(exclude_globs=list(exclude), exclude_frozen=exclude_frozen)


def get_fp32_state_dict(path: str | os.PathLike, tag: str | None = None, *,
                        exclude_frozen: bool = False, exclude: Iterable[str] = (),
                        salvage: bool = False) -> dict:
    """The consolidated state dict as torch tensors: a drop-in for DeepSpeed's
    `get_fp32_state_dict_from_zero_checkpoint`, with these differences: frozen params are fp32,
    integer buffers keep their dtype, ZeRO-1 frozen params are present, and broken checkpoints
    raise `NotMergeable` instead of returning wrong weights. Tied names share one tensor.

    `exclude` takes glob patterns of names to leave out."""
    ckpt = open_checkpoint(path, tag)
    plan = plan_merge(ckpt, _selection(exclude, exclude_frozen), salvage=salvage)
    while True:  # verified as the merge is: a bad record refuses, or under salvage is dropped
        meter = ProgressMeter(plan.total_bytes, None)
        verification = meter.verification = Verification(plan.tensors, salvage=salvage)
        tensors = torch_tensors(plan.tensors, meter)
        verification.check_unchanged()
        failures = verification.failures()
        if not failures:
            break
        plan = plan_without(plan, failures)
    if plan.dropped:
        warnings.warn(f"--salvage left out {len(plan.dropped)} tensor(s): "
                      + "; ".join(f"{n}: {why}" for n, why in list(plan.dropped.items())[:5]),
                      RuntimeWarning, stacklevel=2)
    if verification.drift:
        axes = drift_axes(plan)  # tp replicas or pipeline stage copies
        warnings.warn("; ".join(drift_warning(n, r, axes.get(n, "tp"))
                                for n, r in verification.drift.items()),
                      RuntimeWarning, stacklevel=2)
    if verification.nonfinite:
        warnings.warn("NaN/Inf in " + ", ".join(
            f"{n} ({a:,} NaN, {b:,} Inf)" for n, (a, b) in verification.nonfinite.items()),
            RuntimeWarning, stacklevel=2)
    return tensors


def load_into(model, path: str | os.PathLike, tag: str | None = None, strict: bool = True):
    """Load the fp32 weights into `model` (built outside zero.Init) with load_state_dict."""
    return model.load_state_dict(get_fp32_state_dict(path, tag), strict=strict)


def merge(path: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None, *,
          fmt: str = "safetensors", max_shard_size: int | str | None = None,
          exclude: Iterable[str] = (), exclude_frozen: bool = False, force: bool = False,
          salvage: bool = False, progress=None, should_stop=None, dtype: str = "fp32",
          state: str = "weights") -> MergeResult:
    """Stream the consolidated weights of the checkpoint at `path` into `out_dir` (`fmt`: a
    name of zinspect.core.writers.WRITERS; `dtype`: fp32, bf16 or fp16; `state="all"`: the Adam
    moments beside them)."""
    return _merge(open_checkpoint(path, tag), out_dir,
                  selection=_selection(exclude, exclude_frozen), fmt=fmt,
                  max_shard_size=max_shard_size, force=force, salvage=salvage,
                  progress=progress, should_stop=should_stop, dtype=dtype, state=state)


def reshard(path: str | os.PathLike, out_dir: str | os.PathLike, world_size: int,
            tag: str | None = None, *, force: bool = False, progress=None, should_stop=None):
    """Write the checkpoint at `path` as DeepSpeed would have saved it at `world_size`
    ranks (every rank, dp x tp x pp: tp, pp and ep kept; same stage; masters, Adam moments and
    step moved to the new partitions) into `out_dir`: what `zinspect reshard` does. Returns a
    ReshardResult."""
    from zinspect.core.reshard import reshard as _reshard

    return _reshard(open_checkpoint(path, tag), out_dir, world_size, force=force,
                    progress=progress, should_stop=should_stop)
