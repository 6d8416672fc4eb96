"""Checkpoint layouts: one module per layout behind one interface (`base.Layout`), and the
registry below that `load.py` asks, in order, which layout the files are.

A layout module defines `LAYOUT = Layout(name, recognise, describe)`:
  * `recognise(ctx) -> bool` from the files' names and headers (`ctx`: a `base.LoadContext`;
    `headers.read_headers` has filled it: optimizer files by rank, stage, world size, the
    model states, the reference optimizer_state_dict);
  * `describe(ctx) -> None` fills `ctx.ckpt` (params, groups, fragments, topology, findings
    through `ctx.find(code, ...)`). The shared steps are in `common` (names/ties/frozen flags
    from the model states: `describe_names`; frozen values by stage: `attach_frozen`;
    buffers/dtypes: `finish`; Adam moments: `attach_moments`); the ZeRO geometry per slice is
    `zero12.attach` / `zero3.attach` (+ `zero3.attach_frozen`); `gaps` has the file check
    (`missing_files`, `stale`). `topology.settle` has set `ctx.ckpt.topology` and the files'
    coordinates from the names and pickles before `describe`: a layout that knows better
    overrides them; `topology.cross_check` runs after it.

How to add a layout: write `layouts/<name>.py` with its LAYOUT, add its module name to
`REGISTRY` (one line; before the layouts it must win over, and if it replaces a placeholder of
`unsupported.py`, in that placeholder's place), register any new finding code in
`core/codes.py` (one line each), and add its fixtures and tests. Add it to `MERGEABLE` when
the merge plan can write it. An entry is a module name (its LAYOUT) or "module:ATTRIBUTE" for
another Layout object.
"""

from __future__ import annotations

import importlib
from functools import cache

from zinspect.core.layouts.base import Layout, LoadContext

#: asked in this order; the first layout that recognises the files describes them
REGISTRY: tuple[str, ...] = (
    "universal",
    "pipeline_tp",  # pipeline x tensor parallel (Megatron-DeepSpeed / BLOOM)
    "pipeline",  # before any tensor-parallel layout: a pipeline has one mp_rank file per stage
    "tensor_parallel",
    "tp_zero0",  # ZeRO-0 with tensor parallelism (masters in each tp rank's model states)
    "unsupported:TENSOR_PARALLEL",
    "moe",
    "unsupported:NVME_OFFLOAD",
    "zero0",
    "zero3",
    "zero12",
    "bf16_optimizer",
    "unsupported:UNKNOWN",  # always last: files of no known layout
)


@cache
def layouts() -> tuple[Layout, ...]:
    """The registry's Layout objects, in order."""
    out = []
    for entry in REGISTRY:
        module, _, attr = entry.partition(":")
        out.append(getattr(importlib.import_module(f"{__name__}.{module}"), attr or "LAYOUT"))
    return tuple(out)


def pick(ctx: LoadContext) -> Layout:
    """The first layout of the registry that recognises the files."""
    return next(layout for layout in layouts() if layout.recognise(ctx))


#: the layouts a merge can be planned for
MERGEABLE = ("zero", "bf16_optimizer", "pipeline", "pipeline_tp", "moe", "zero0", "tensor_parallel",
             "tensor_parallel_zero0", "universal")

__all__ = ["MERGEABLE", "REGISTRY", "Layout", "LoadContext", "layouts", "pick"]
