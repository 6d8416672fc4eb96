"""Layouts zinspect recognises but cannot describe in full yet, and the fallback for files of
no known layout. Each names its params (from the model states) without any geometry, so the
checkpoint can be shown but not merged. A layout module that replaces one of these takes its
line in the registry (zinspect/core/layouts/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable

from zinspect.core.layouts import common
from zinspect.core.layouts.base import Layout, LoadContext


def describe_names_only(ctx: LoadContext) -> None:
    """Params, frozen params, buffers and dtypes, with no optimizer geometry."""
    names = common.describe_names(ctx)
    if names is None:
        return
    common.attach_frozen(ctx, names)
    common.finish(ctx, names)


def _unsupported(name: str, what: str, recognise: Callable[[LoadContext], bool],
                 stage: int | None = None) -> Layout:
    def describe(ctx: LoadContext) -> None:
        if stage is not None:
            ctx.ckpt.stage = stage
        ctx.find("unsupported-layout", f"{what}: zinspect can show it but not merge it yet",
                 "for now use DeepSpeed's ds_to_universal.py for this layout")
        describe_names_only(ctx)

    return Layout(name, recognise, describe)


UNIVERSAL = _unsupported("universal", "universal checkpoint folder (ds_to_universal.py output)",
                         lambda ctx: "universal" in ctx.kinds)
TENSOR_PARALLEL = _unsupported("tensor_parallel",
                               "tensor-parallel checkpoint (several mp_rank_XX sets)",
                               lambda ctx: len(ctx.mp_ranks) > 1)
PIPELINE = _unsupported("pipeline", "pipeline-parallel checkpoint (layer_* files)",
                        lambda ctx: "layer" in ctx.kinds)
MOE = _unsupported("moe", "mixture-of-experts checkpoint (expert files)",
                   lambda ctx: bool(ctx.kinds & {"expert", "expert_optim"}))
NVME_OFFLOAD = _unsupported("nvme_offload",
                            "ZeRO-3 NVMe-offload checkpoint (masters in offloaded_tensors/)",
                            lambda ctx: "offload" in ctx.kinds)
ZERO0 = _unsupported("zero0", "ZeRO-0 checkpoint (no ZeRO optimizer partitions)",
                     lambda ctx: not ctx.optim_files and ctx.model_state is not None and
                     ctx.model_state.get("optimizer") is not None, stage=0)
#: the last entry of the registry: files no layout recognised
UNKNOWN = Layout("unknown", lambda ctx: True, describe_names_only)
