"""The pipeline side of the universal writer (`zinspect.core.universal`): pp stages × dp, ZeRO-1
or BF16_Optimizer at ZeRO-1 (DeepSpeed refuses ZeRO-2/3 with pipelines).

What DeepSpeed 0.19.8's PipelineEngine reads on `"checkpoint": {"load_universal": true}`
(runtime/engine.py `_load_checkpoint`, base_optimizer.py
`load_hp_checkpoint_state_from_checkpoint_dir`): the stages' `mp_rank_SS_model_states.pt`
(global steps, dp/mp sizes; its module state is skipped) and, per trainable param of its stage,
`zero/<PipelineModule name>/` (`3.up.weight`, `tied_modules.embed.weight`: global layer
indices, so the names are the same at any pp). No layer file is read, so none is written
(ds_to_universal writes none either). A tied param is written once, from the lowest stage that
holds it; its other stages' masters and moments are compared with it as they stream (they are
equal when the stages all-reduce its gradient) and a drifted copy refuses the conversion.
"""

from __future__ import annotations

from zinspect.core.fmt import shown
from zinspect.core.model import Checkpoint, Param
from zinspect.core.reshard_zero import STEP, Sources
from zinspect.errors import NotMergeable

ZERO0_WHY = ("DeepSpeed reads a universal checkpoint's zero/ tree only through a ZeRO optimizer "
             "(deepspeed/runtime/engine.py, load_checkpoint: _load_zero_checkpoint, the only "
             "caller of the universal loaders, runs only when zero_optimization(), i.e. stage "
             ">= 1), so a ZeRO-0 pipeline engine would never read it")


def refuse_unloadable(ckpt: Checkpoint) -> None:
    """A pipeline whose universal checkpoint no DeepSpeed engine would load is refused."""
    if not ckpt.stage:
        raise NotMergeable(f"{shown(str(ckpt.path))}: a ZeRO-0 pipeline checkpoint cannot be "
                           f"converted to a universal checkpoint: {ZERO0_WHY}",
                           "resume it with the same pp x dp and plain load_checkpoint, or take "
                           "the weights with `zinspect merge PATH OUT`")
    if ckpt.topology.tp > 1:
        raise NotMergeable(f"{shown(str(ckpt.path))}: a pipeline x tensor-parallel checkpoint "
                           "cannot be converted to a universal checkpoint yet",
                           "use DeepSpeed's ds_to_universal.py for this one")


class StageSources(Sources):
    """Sources of a pipeline checkpoint: its optimizer files keyed by global rank, stage × dp +
    dp rank (one file per (dp rank, stage); keyed by dp rank alone the stages' would collide)."""

    def __init__(self, ckpt: Checkpoint) -> None:  # noqa: D107 - Sources' fields, other keys
        self.ckpt = ckpt
        self.notes: list[str] = []
        self._tfs: dict = {}
        self._paths: dict = {}
        dp = ckpt.topology.dp
        self.optim = {(f.coords.pp or 0) * dp + f.rank: f for f in ckpt.files_of("optim")}
        self.model = {f.mp_rank: f for f in ckpt.files_of("model")}
        self.old = ckpt.world_size or len(self.optim)
        if sorted(self.optim) != list(range(self.old)):
            raise NotMergeable(f"{shown(str(ckpt.path))}: the optimizer files are not every "
                               f"(dp rank, stage) of {ckpt.topology.dp} x {ckpt.topology.pp}",
                               "run `zinspect validate` for details")

    def stage_states(self) -> list[dict]:
        """Each stage's optimizer state (dp rank 0's `base_optimizer_state['state']`)."""
        dp = self.ckpt.topology.dp
        return [self.osd(s * dp)["base_optimizer_state"]["state"] for s in range(self.ckpt.topology.pp)]


def step_of(src: Sources, p: Param):
    """(file, the `step` of the param's flat group) in the optimizer file of its first fp32
    fragment: each stage numbers its own groups."""
    first = min((f for f in p.fragments if f.source == "master"), key=lambda f: f.start)
    osd = src.tf(first.file).obj["optimizer_state_dict"]
    return first.file, (osd["base_optimizer_state"]["state"].get(first.group) or {}).get(STEP)


def tied_copies(src: Sources, p: Param, state: str) -> dict[int, list]:
    """stage -> the pieces of `state` of a tied param's copy on that stage (to compare)."""
    ckpt = src.ckpt
    out = {}
    for stage, frags in sorted(p.copies.items()):
        if state != "fp32":
            frags = [ckpt.moments[(f.file, f.group, state)].fragment(
                f.group, f.group_offset, f.start, f.numel, f.padding, state, f.shard)
                for f in frags if (f.file, f.group, state) in ckpt.moments]
        frags = sorted((f for f in frags if f.numel), key=lambda f: f.start)
        ops: list = []
        src.add_range(ops, frags, 0, p.numel, f"{p.name} (stage {stage}'s copy)")
        out[stage] = ops
    return out
