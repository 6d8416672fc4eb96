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


def _unsupported(name: str, what: str, recognise: Callable[[LoadContext], bool]) -> Layout:
    def describe(ctx: LoadContext) -> None:
        ctx.find("unsupported-layout", f"{what}: zinspect can show it but not merge it yet",
                 "for now use DeepSpeed's ds_to_universal.py for this layout")
        describe_names_only(ctx)

    return Layout(name, recognise, describe)


#: a tensor-parallel run neither tensor_parallel nor tp_zero0 describes (e.g. mp_rank_01 files
#: beside model states that declare tp 1); its own name, so it can never pass for a mergeable layout
TENSOR_PARALLEL = _unsupported("tensor_parallel_unsupported",
                               "tensor-parallel checkpoint of a kind zinspect cannot merge yet "
                               "(several mp_rank_XX sets)",
                               lambda ctx: len(ctx.mp_ranks) > 1)
NVME_OFFLOAD = _unsupported("nvme_offload",
                            "ZeRO-3 NVMe-offload checkpoint (masters in offloaded_tensors/)",
                            lambda ctx: "offload" in ctx.kinds)
#: the last entry of the registry: files no layout recognised
UNKNOWN = Layout("unknown", lambda ctx: True, describe_names_only)
