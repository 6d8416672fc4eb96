"""What the files' headers say, read before any layout is chosen (`read_headers`): unreadable
files, the optimizer files by rank with their stage, partition count and step, the model states
that names are read from, and the checkpoint's stage, world size, version and ds_config."""

from __future__ import annotations

from collections import Counter

from zinspect.core.layouts import topology
from zinspect.core.layouts.base import LoadContext
from zinspect.core.layouts.pickled import get, text
from zinspect.core.model import RankFile
from zinspect.core.torchzip import TensorRef, TorchFile


def read_headers(ctx: LoadContext) -> None:
    """What the files' headers say, before any layout is chosen: unreadable files, the
    optimizer files by rank, stage / partition count / step of each, the model states that
    names are read from, and the checkpoint's stage, world size, version and ds_config."""
    c = ctx.ckpt
    for rf in c.files:
        if rf.error:
            ctx.find("unreadable-file", f"{rf.name} cannot be read: {rf.error}",
                     rf.error_hint or "restore this file from a copy, or re-save the checkpoint",
                     file=rf.name, rank=rf.rank)
    ctx.optim_files = [f for f in c.files_of("optim") if f.mp_rank in (0, None)]
    ctx.optim = _by_rank(ctx, ctx.optim_files)
    for rf in ctx.optim_files:
        read_optim_header(ctx, rf)
    ctx.model_files = [f for f in c.files_of("model") if f.mp_rank in (0, None)]
    for rf in c.files_of("model"):
        obj = ctx.torch_file(rf).obj if ctx.torch_file(rf) else None
        if isinstance(obj, dict):
            topology.declare(rf, obj)
            if rf.mp_rank in (0, None):
                rf.ds_version = text(obj.get("ds_version"))
                dp = obj.get("dp_world_size")
                rf.dp_world_size = dp if isinstance(dp, int) else None
    _pick_model_state(ctx)
    stages = Counter(f.stage for f in ctx.optim_files if f.stage is not None)
    if stages:
        c.stage = stages.most_common(1)[0][0]
    elif any(f.rank is not None for f in ctx.model_files):
        c.stage = 3  # only ZeRO-3 saves model states per rank: its placeholders are no shapes
    # the lowest rank that can be read: an unreadable rank 0 is reported once, as itself
    ref = next((rf for _, rf in sorted(ctx.optim.items()) if ctx.torch_file(rf)),
               ctx.optim.get(0))
    ref_tf = ctx.torch_file(ref)
    osd = get(ref_tf.obj, "optimizer_state_dict") if ref_tf else None
    if isinstance(osd, dict):
        c.world_size = _world_size(ctx.optim_files, ref)
        c.ds_version = ref.ds_version
        c.ds_config = get(ref_tf.obj, "ds_config")
        ctx.ref_osd = osd


def _world_size(files: list[RankFile], ref: RankFile) -> int | None:
    """The world size most optimizer files were partitioned over (a forged or stray file is
    then the one that differs); on a tie, the lowest readable rank's (`ref`)."""
    counts = Counter(max(f.partition_count) for f in files if f.partition_count)
    top = max(counts.values(), default=0)
    tied = [ws for ws, n in counts.items() if n == top]
    mine = max(ref.partition_count) if ref.partition_count else None
    return mine if mine in tied else next(iter(tied), None)


def _by_rank(ctx: LoadContext, files: list[RankFile]) -> dict[int, RankFile]:
    out: dict[int, RankFile] = {}
    for rf in sorted(files, key=lambda f: (f.rank, f.name)):
        if rf.rank in out:
            ctx.find("duplicate-rank",
                     f"rank {rf.rank} has two optimizer files: {out[rf.rank].name} and {rf.name}",
                     "a stale file from another run is mixed in (bf16_/fp16_ prefix); "
                     "remove the one that does not belong to this run", file=rf.name, rank=rf.rank)
            continue
        out[rf.rank] = rf
    return out


def read_optim_header(ctx: LoadContext, rf: RankFile) -> None:
    tf = ctx.torch_file(rf)
    if tf is None:
        return
    osd = get(tf.obj, "optimizer_state_dict")
    if not isinstance(osd, dict):
        rf.error = "no optimizer_state_dict in it: not a DeepSpeed optimizer file"
        ctx.find("not-optimizer-file", f"{rf.name} has no optimizer_state_dict",
                 "this is not a DeepSpeed ZeRO optimizer file; move it out of the tag dir",
                 file=rf.name, rank=rf.rank)
        ctx.forget(rf)
        return
    stage = osd.get("zero_stage")
    if isinstance(stage, int):
        rf.stage = int(stage)
    elif "single_partition_of_fp32_groups" in osd:
        rf.stage = 1  # BF16_Optimizer: no zero_stage key, ZeRO-1 partitioning
    pc = osd.get("partition_count")
    rf.partition_count = [int(pc)] if isinstance(pc, int) else [
        int(x) for x in pc if isinstance(x, int)] if isinstance(pc, list) else []
    rf.ds_version = text(osd.get("ds_version")) or text(get(tf.obj, "ds_version"))
    rf.step = _optimizer_step(tf, osd)


def _optimizer_step(tf: TorchFile, osd: dict) -> float | int | None:
    """Adam's `step` of the lowest-numbered param state: every rank steps together, so a rank
    file with another value was saved at another time (a stale file with the right shapes)."""
    state = get(inner_optimizer(osd), "state")
    if not isinstance(state, dict) or not state:
        return None
    step = get(state.get(min(state, key=str)), "step")
    if isinstance(step, TensorRef):
        return tf.read_scalar(step)
    return step if isinstance(step, (int, float)) else None


def inner_optimizer(osd: dict | None) -> dict | None:
    """The torch optimizer's own state dict: under base_optimizer_state at ZeRO-1/2 and in
    BF16_Optimizer, under optimizer_state_dict at ZeRO-3."""
    if not isinstance(osd, dict):
        return None
    inner = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")
    return inner if isinstance(inner, dict) else None


def _pick_model_state(ctx: LoadContext) -> None:
    """The model-states pickle to take names/shapes from: the rank-0 file (it alone has
    `shared_params` at stage 3), else the lowest rank that can be read."""
    for rf in sorted(ctx.model_files, key=lambda f: (f.rank or 0, f.name)):
        tf = ctx.torch_file(rf)
        if tf is None:
            continue
        if not isinstance(tf.obj, dict) or \
                ("buffer_names" not in tf.obj and "param_shapes" not in tf.obj):
            rf.error = "not a model-states file (no buffer_names/param_shapes)"
            ctx.find("not-model-states", f"{rf.name} is not a model-states file",
                     "move it out of the tag dir", file=rf.name, rank=rf.rank)
            continue
        ctx.model_file, ctx.model_state = rf, tf.obj
        if rf.rank not in (0, None):
            ctx.find("rank0-model-missing", f"the rank-0 model-states file is missing or "
                     f"unreadable; names are read from {rf.name}",
                     "tied-parameter links (shared_params) are only saved by rank 0; "
                     "restore zero_pp_rank_0_mp_rank_00_model_states.pt",
                     file=rf.name, rank=rf.rank)
        return
