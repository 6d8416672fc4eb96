"""The pipeline side of the universal writer (`zinspect.core.universal`): pp stages [× tp] × dp,
ZeRO-1 or BF16_Optimizer at ZeRO-1 (DeepSpeed refuses ZeRO-2/3 with pipelines); the tp split of a
Megatron-DeepSpeed pipeline is joined as for tensor-parallel checkpoints.

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

from zinspect.core.model import Param
from zinspect.core.reshard_sources import at_masters
from zinspect.core.reshard_zero import STEP, Sources


def slice_states(src: Sources) -> list[dict]:
    """Each (stage, tp rank) slice's optimizer state: its dp rank 0 file's
    `base_optimizer_state['state']` (each slice numbers its own groups)."""
    return [src.tf(f.name).obj["optimizer_state_dict"]["base_optimizer_state"]["state"]
            for f in src.ckpt.files_of("optim") if f.rank == 0]


def step_of(src: Sources, p: Param):
    """(file, the `step` of the param's flat group) in the optimizer file of its first fp32
    fragment: each stage numbers its own groups."""
    first = min((f for f in p.fragments if f.source == "master"), key=lambda f: f.start)
    osd = src.tf(first.file).obj["optimizer_state_dict"]
    return first.file, (osd["base_optimizer_state"]["state"].get(first.group) or {}).get(STEP)


def tied_copies(src: Sources, p: Param, state: str) -> dict[int, list]:
    """stage -> the pieces of `state` of a tied param's copy on that stage (to compare); a
    tensor-parallel one's shards in output order (pipeline_tp), unless they need weaving (split
    after dim 0: not compared, as in a merge)."""
    from zinspect.core import shardplan

    out = {}
    for stage, frags in sorted(p.copies.items()):
        frags = sorted((f for f in at_masters(src.ckpt, frags, state) if f.numel),
                       key=lambda f: (f.shard or 0, f.start))
        if p.shards:
            if shardplan.problem(p, frags) is None:
                pieces, weaves, _ = shardplan.plan_pieces(p, src.path, frags)
                if not weaves:
                    out[stage] = pieces
            continue
        ops: list = []
        src.add_range(ops, frags, 0, p.numel, f"{p.name} (stage {stage}'s copy)")
        out[stage] = ops
    return out

