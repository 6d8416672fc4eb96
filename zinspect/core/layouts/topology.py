"""The parallel topology: sizes per axis (dp, tp, pp, ep) and each file's coordinates, from the
file names (discover) and what the pickles declare, cross-checked against each other.

* `declare(rf, obj)` keeps what a model-states pickle says (`mp_world_size`,
  `checkpoint_parallel_dimensions`);
* `settle(ctx)` sets the default topology before a layout describes the files (a layout that
  knows better overrides `ckpt.topology` and the coordinates in `describe`);
* `cross_check(ctx)` reports files whose pickle disagrees with the topology (`topology-mismatch`);
* `grid_findings(...)` is the per-axis file check of the plain ZeRO layouts (validate calls it):
  every coordinate of the grid has its file, no file lies outside it. The parallel layouts
  write their own, each on `gaps.missing_coords` (bounded whatever size a pickle claims).
"""

from __future__ import annotations

import math
from dataclasses import replace

from zinspect.core import codes
from zinspect.core.layouts.base import LoadContext
from zinspect.core.layouts.gaps import missing_coords
from zinspect.core.layouts.pickled import get
from zinspect.core.model import Finding, RankFile, Topology

AXES = Topology.AXES
#: how an axis's coordinate is said in a message ("rank 2" is the dp rank, as users know it)
AXIS_WORDS = {"dp": "rank", "tp": "tp rank", "pp": "stage", "ep": "ep rank"}
_MAX_AXIS = 1 << 20  # a declared size beyond this is not a size (forged or damaged)


def declare(rf: RankFile, obj) -> None:
    """What a model-states pickle says about the topology, kept on its RankFile."""
    mp = get(obj, "mp_world_size")
    rf.mp_world_size = mp if type(mp) is int and 0 < mp <= _MAX_AXIS else None
    pp, tp = get(obj, "checkpoint_parallel_dimensions", "pp_degree"), \
        get(obj, "checkpoint_parallel_dimensions", "tp_degree")
    rf.parallel_dims = (pp, tp) if all(type(x) is int and 0 < x <= _MAX_AXIS for x in (pp, tp)) \
        else None


def settle(ctx: LoadContext) -> None:
    """The topology that the names and the reference model states give: dp = the optimizer's
    partition count (else the model states' dp_world_size), pp and tp from
    `checkpoint_parallel_dimensions` (else tp = the number of mp ranks named). With pp > 1,
    mp_rank SS counts stage and tp rank (SS = pp*tp + tp_rank), so the files' coordinates move."""
    c, rf = ctx.ckpt, ctx.model_file
    t = c.topology
    dp = get(ctx.model_state, "dp_world_size")
    t.dp = c.world_size or (dp if type(dp) is int and 0 < dp <= _MAX_AXIS else 1)
    if rf is not None and rf.parallel_dims is not None:
        t.pp, t.tp = rf.parallel_dims
    else:
        t.pp, t.tp = 1, max(len(ctx.mp_ranks), 1)
    if t.pp > 1:
        for f in c.files:
            if f.kind in ("optim", "model") and f.mp_rank is not None:
                f.coords = replace(f.coords, tp=f.mp_rank % t.tp, pp=f.mp_rank // t.tp)


def cross_check(ctx: LoadContext) -> None:
    """Each model-states file that declares the topology must agree with it: its
    checkpoint_parallel_dimensions are (pp, tp), its mp_world_size pp*tp, and its name's
    mp_rank is below its own mp_world_size."""
    t = ctx.ckpt.topology
    for rf in ctx.ckpt.files_of("model"):
        if not rf.readable or rf.shallow:
            continue
        dims, mp = rf.parallel_dims, rf.mp_world_size
        problem = None
        if dims is not None and dims != (t.pp, t.tp):
            problem = (f"its checkpoint_parallel_dimensions say pp {dims[0]} x tp {dims[1]}, the "
                       f"checkpoint's are pp {t.pp} x tp {t.tp}")
        elif dims is not None and mp is not None and mp != dims[0] * dims[1]:
            problem = (f"its mp_world_size is {mp}, its checkpoint_parallel_dimensions pp "
                       f"{dims[0]} x tp {dims[1]} = {dims[0] * dims[1]}")
        elif mp is not None and rf.mp_rank is not None and rf.mp_rank >= mp:
            problem = f"its name says mp_rank {rf.mp_rank}, its mp_world_size is {mp}"
        if problem:
            ctx.find("topology-mismatch", f"{rf.name}: {problem}",
                     "the file comes from another run or was altered; restore the file saved "
                     "with the others", file=rf.name, rank=rf.rank)


def grid_findings(files: list[RankFile], sizes: dict[str, int], what: str,
                  missing_code: str, beyond_code: str, beyond_hint: str) -> list[Finding]:
    """The files of one kind against the grid of coordinates `sizes` spans ({axis: size}, e.g.
    {"dp": 4, "tp": 2}): `missing_code` for each coordinate without a file, `beyond_code` for
    each file outside the grid (its axis and size named). `what` names the files in messages
    ("optimizer", "model-states", "layer")."""
    axes = [a for a in AXES if a in sizes]
    have = {tuple(getattr(f.coords, a) for a in axes) for f in files}
    shape = tuple(sizes[a] for a in axes)
    total, first = missing_coords(have, shape)  # never the whole grid: sizes come from pickles
    of = f"{math.prod(shape)} {_plural(axes)}"
    out = []
    for at in first:
        where = _where(axes, at)
        out.append(codes.finding(
            missing_code, f"the {what} file of {where} is missing "
            f"({math.prod(shape) - total} of {of} present)",
            f"copy {where}'s {what} file from the training run; without it the params it "
            "holds cannot be rebuilt", rank=at[axes.index("dp")] if "dp" in axes else None))
    if total > len(first):
        out.append(codes.finding(missing_code, f"{total - len(first)} more {what} files are "
                                 f"missing (of {of})", "check the copy: most of the checkpoint "
                                 "is gone, or a file's recorded world size is wrong"))
    for f in files:
        for a in axes:
            v = getattr(f.coords, a)
            if v >= sizes[a]:
                size = "world size" if a == "dp" else f"{a} size"
                out.append(codes.finding(beyond_code, f"{f.name} is {AXIS_WORDS[a]} {v}, beyond "
                                         f"the {size} {sizes[a]}", beyond_hint, file=f.name,
                                         rank=f.rank))
                break
    return out


def _where(axes: list[str], at: tuple[int, ...]) -> str:
    return ", ".join(f"{AXIS_WORDS[a]} {v}" for a, v in zip(axes, at, strict=True))


def _plural(axes: list[str]) -> str:
    return "ranks" if axes == ["dp"] else "coordinates"
