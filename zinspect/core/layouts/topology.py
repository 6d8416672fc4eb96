"""The parallel topology: sizes per axis (dp, tp, pp, ep) and each file's coordinates, from the
file names (discover) and what the pickles declare, cross-checked against each other.

* `declare(rf, obj)` keeps what a model-states pickle says (`mp_world_size`,
  `checkpoint_parallel_dimensions`);
* `settle(ctx)` sets the default topology before a layout describes the files (a layout that
  knows better overrides `ckpt.topology` and the coordinates in `describe`);
* `cross_check(ctx)` reports files whose pickle disagrees with the topology (`topology-mismatch`).

Which coordinates of the grid have no file, and which files lie outside it, is `gaps`' rule
(`missing_files`, `stale`), run by validate and by every layout.
"""

from __future__ import annotations

from dataclasses import replace

from zinspect.core.layouts.base import LoadContext
from zinspect.core.layouts.pickled import get
from zinspect.core.model import RankFile, Topology

AXES = Topology.AXES
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
