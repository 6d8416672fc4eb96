"""DeepSpeed's BF16_Optimizer (bf16 + ZeRO-1 + fp32 gradient accumulation): ZeRO-1's
partitioning, but the saved fp32 partitions keep their padding and there is no `zero_stage`.
DeepSpeed's zero_to_fp32.py refuses it; the ZeRO-1/2 geometry reads it."""

from __future__ import annotations

from zinspect.core.layouts import zero12
from zinspect.core.layouts.base import Layout, LoadContext


def recognise(ctx: LoadContext) -> bool:
    osd = ctx.ref_osd
    return isinstance(osd, dict) and "zero_stage" not in osd and \
        "single_partition_of_fp32_groups" in osd


def describe(ctx: LoadContext) -> None:
    ctx.find("bf16-optimizer", "BF16_Optimizer layout (bf16 + ZeRO-1 + fp32 grad accumulation): "
             "DeepSpeed's zero_to_fp32.py refuses it, zinspect merges it")
    zero12.describe_flat(ctx, keep_padding=True)


LAYOUT = Layout("bf16_optimizer", recognise, describe)
