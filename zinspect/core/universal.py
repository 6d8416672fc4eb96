"""Write a DeepSpeed universal checkpoint (format 0.4, what `ds_to_universal.py` writes) straight
from a ZeRO checkpoint: streamed once, verified, no temporary files per fragment. Sources: plain
ZeRO-1/2/3, BF16_Optimizer, tensor-parallel (AutoTP), pipelines with or without tensor parallelism
(universal_pipeline) and native MoE (universal_moe); ZeRO-0 runs are refused (no DeepSpeed engine
reads their universal checkpoint: ZERO0_WHY).

    OUT/latest_universal                  names <tag>_universal
    OUT/<tag>_universal/zero/<param>/fp32.pt, exp_avg.pt, exp_avg_sq.pt
                                          {'cat_dim': 0, 'param': the full tensor, fp32}
                                  /step.pt the optimizer step (a 0-d tensor)
    OUT/<tag>_universal/zero/optimizer_state.pt
                                          the optimizer's global state (loss scaler, param_groups...)
    OUT/<tag>_universal/*model_states.pt  the model-states files, as the source holds them

Frozen params, buffers and tied aliases get a `fp32.pt` ({'param': ...}) as ds_to_universal
writes them, but DeepSpeed's universal load never reads them: it restores only the trainable
params' masters and moments (HELP_NOTE). ZeRO-3 sources get the same per-param files as ZeRO-1/2
(DeepSpeed's own converter writes bare flat tensors there; its ZeRO-3 loader reads both) and an
optimizer_state.pt without rank 0's partitions (dead weight in DeepSpeed's).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zinspect.core import universal_moe, universal_pipeline
from zinspect.core.fmt import shown
from zinspect.core.model import Checkpoint
from zinspect.core.outdir import OutputDir, temp_name, writing_failed
from zinspect.core.plan import Piece
from zinspect.core.reshard import check_reshardable
from zinspect.core.reshard_sources import non_adam
from zinspect.core.reshard_zero import MOMENTS, STEP, Sources
from zinspect.core.stream import Progress, ProgressMeter, ShouldStop, copy_tensors
from zinspect.core.torchsave import FilesSink, OutFile, add_piece, output_bytes, stream_tensors
from zinspect.core.verify import Verification
from zinspect.errors import MergeCancelled, NotMergeable

#: what ds_to_universal's output was checked against for (tests/test_universal*.py)
CONVERTIBLE = ("zero", "bf16_optimizer", "tensor_parallel", "pipeline", "pipeline_tp", "moe")
ZERO0_WHY = ("DeepSpeed reads a universal checkpoint's zero/ tree only through a ZeRO optimizer "
             "(deepspeed/runtime/engine.py, load_checkpoint: _load_zero_checkpoint, the only caller "
             "of the universal loaders, runs only when zero_optimization(), i.e. stage >= 1), so a "
             "ZeRO-0 engine would never read it")
LATEST = "latest_universal"
STAGING = ".zinspect-staging"
HELP_NOTE = ("DeepSpeed's universal load restores only the trainable params' fp32 masters, "
             "Adam moments and step: frozen params and buffers (BatchNorm statistics, ...) keep "
             "the values the new model was built with. Load those from the model weights "
             "yourself (e.g. `zinspect merge PATH OUT` and model.load_state_dict(strict=False)).")


@dataclass
class UniversalResult:
    out_dir: Path
    tag: str
    files: list[Path]
    bytes: int
    seconds: float
    verified: int = 0
    unverified: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "format": "universal", "tag": self.tag,
                "files": len(self.files), "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "verified_records": self.verified, "unverified_records": self.unverified,
                "notes": self.notes}


def plan_universal(ckpt: Checkpoint) -> list[OutFile]:
    """Every file of the universal tree (names relative to <tag>_universal)."""
    pipeline = ckpt.layout in ("pipeline", "pipeline_tp")
    src = Sources(ckpt)
    osd0 = src.osd(0)
    inner = osd0.get("optimizer_state_dict") if ckpt.stage == 3 else osd0.get("base_optimizer_state")
    if not isinstance(inner, dict) or not isinstance(inner.get("state"), dict):
        raise NotMergeable(f"{shown(str(ckpt.path))}: no optimizer state in "
                           f"{shown(src.optim[0].name)}", "an elastic checkpoint cannot be converted")
    for states in universal_pipeline.slice_states(src) if pipeline else [inner["state"]]:
        _check_adam(ckpt, states)
    files = []
    # the model-states files first: their records are read whole (CRC-checked) before the
    # buffers and frozen fragments in them are read again in part
    for rf in sorted(ckpt.files_of("model"), key=lambda f: f.name):  # every tp rank's
        out = OutFile(rf.name)
        out.obj = src.copy(out, rf.name, src.tf(rf.name).obj)
        files.append(out)
    files.append(_optimizer_state(src, osd0, inner))
    tp_keys = _tp_keys(src) if ckpt.topology.tp > 1 else None
    slots = {}
    if ckpt.layout == "moe":  # experts stacked per local name (universal_moe)
        universal_moe.check_ep_sizes(src)
        slots = universal_moe.expert_slots(ckpt)
    stacked = {p.name for params in slots.values() for p in params}

    def step_file(rel: str, p) -> None:
        where, step = universal_pipeline.step_of(src, p) if pipeline else \
            (src.optim[0].name, (inner["state"].get(p.sub_group) or {}).get(STEP))
        if step is not None:
            out = OutFile(rel)
            out.obj = src.copy(out, where, step)
            files.append(out)

    for local, params in slots.items():
        _check_name(ckpt, local)
        for state in ("fp32", *MOMENTS):
            files.append(universal_moe.stacked_file(src, f"zero/{local}/{state}.pt", params, state))
        step_file(f"zero/{local}/step.pt", params[0])
    for name, p in ckpt.params.items():
        if name in stacked:
            continue
        _check_name(ckpt, name)
        owner = ckpt.params[p.tied_to] if p.tied_to else p
        if p.frozen:
            files.append(_tensor_file(src, f"zero/{name}/fp32.pt", name, p.shape, "frozen", None))
            continue
        keys = None if p.tied_to else tp_keys(name) if tp_keys else {"cat_dim": 0}
        files.append(_tensor_file(src, f"zero/{name}/fp32.pt", owner.name, p.shape, "fp32", keys))
        if p.tied_to:
            continue
        for state in MOMENTS:
            files.append(_tensor_file(src, f"zero/{name}/{state}.pt", name, p.shape, state, keys))
        step_file(f"zero/{name}/step.pt", p)
    for name, b in ckpt.buffers.items():
        _check_name(ckpt, name)
        if b.file is None or b.offset is None or not b.intact:
            raise NotMergeable(f"{shown(str(ckpt.path))}: buffer {shown(name, 80)} is not in the "
                               "files", "run `zinspect validate` for details")
        out = OutFile(f"zero/{name}/fp32.pt")
        wide = "float32" if b.dtype in ("bfloat16", "float16") else b.dtype
        ops: list = []
        add_piece(ops, Piece(src.path(b.file), b.offset, b.numel * _size(b.dtype)))
        out.obj = {"param": out.tensor(wide, b.shape, ops, b.dtype)}
        files.append(out)
    return files


def _check_adam(ckpt: Checkpoint, states: dict) -> None:
    """Only Adam/AdamW states are written (as ds_to_universal writes them)."""
    if got := non_adam(states):
        raise NotMergeable(f"{shown(str(ckpt.path))}: group {got[0]}'s optimizer state holds "
                           f"{shown(', '.join(got[1]), 80)}: only Adam/AdamW states (exp_avg, "
                           "exp_avg_sq, step) are written to a universal checkpoint "
                           "(DeepSpeed's ds_to_universal.py fails on others: KeyError 'exp_avg')",
                           "take the weights and the optimizer states with `zinspect merge "
                           "PATH OUT --state all`")


def _refuse_zero0(ckpt: Checkpoint) -> None:
    """No DeepSpeed engine would read a ZeRO-0 run's universal checkpoint: refused, saying why."""
    if ckpt.stage == 0 and ckpt.layout != "universal":
        kind = {"zero0": "", "moe": " MoE", "pipeline": " pipeline",
                "pipeline_tp": " pipeline x tensor-parallel",
                "tensor_parallel_zero0": " tensor-parallel"}.get(ckpt.layout, f" {ckpt.layout}")
        raise NotMergeable(f"{shown(str(ckpt.path))}: a ZeRO-0{kind} checkpoint cannot be converted "
                           f"to a universal checkpoint: {ZERO0_WHY}", "resume it at the same "
                           "world size with plain load_checkpoint (ZeRO-0 keeps whole optimizer "
                           "states), or take the weights with `zinspect merge PATH OUT`")


def _sync_filesystem(path: Path) -> None:
    """Flush every file written under `path` to disk: syncfs(2) of its file system where libc
    has it (one journal commit, not one per file), else sync(2)."""
    import ctypes
    import ctypes.util

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _size(dtype: str) -> int:
    from zinspect.core.torchzip import DTYPE_SIZES

    return DTYPE_SIZES[dtype]


def _check_name(ckpt: Checkpoint, name: str) -> None:
    """A name becomes a directory: never one that leaves zero/ or hides."""
    if not name or "/" in name or "\0" in name or name in (".", "..") or \
            len(name.encode()) > 250:
        raise NotMergeable(f"{shown(str(ckpt.path))}: {shown(name, 80)!r} cannot be a directory "
                           "name of a universal checkpoint", "rename the param in the model")


def _tensor_file(src: Sources, rel: str, name: str, shape, state: str, keys: dict | None) -> OutFile:
    """{**keys, 'param': the full fp32 tensor of `state`} (keys: {'cat_dim': 0} for plain ZeRO,
    `_tp_keys`' for a tensor-parallel param; frozen, aliases: none). A tensor-parallel param's
    shards are joined as the merge joins them (shardplan: rows woven, replicas compared)."""
    out = OutFile(rel)
    frags = src.fragments(name, state)
    p = src.ckpt.params[name]
    src_dtype = frags[0].dtype if frags else "float32"
    if p.shards:
        from zinspect.core import shardplan
        from zinspect.core.plan import param_problem

        why = param_problem(p, frags)
        if why:
            raise NotMergeable(f"{shown(str(src.ckpt.path))}: {shown(name, 80)}: its {state} "
                               f"cannot be joined: {why}", "run `zinspect validate` for details")
        ops, weaves, mirrors = shardplan.plan_pieces(p, src.path, frags)
        if not mirrors and p.copies and state != "frozen":  # a tied pipeline_tp param's stages
            mirrors = universal_pipeline.tied_copies(src, p, state)
        t = out.tensor("float32", tuple(shape), ops, src_dtype, weaves, mirrors)
    else:
        ops = []
        src.add_range(ops, frags, 0, p.numel, name)
        # a tied pipeline param's copies on its other stages: compared as they stream
        mirrors = universal_pipeline.tied_copies(src, p, state) if p.copies and state != "frozen" \
            else None
        t = out.tensor("float32", tuple(shape), ops, src_dtype, (), mirrors)
    out.obj = {**(keys or {}), "param": t}
    return out


def _tp_keys(src: Sources):
    """name -> the keys ds_to_universal writes beside a tensor-parallel param's 'param' (its
    merge_tp_slices): none where the model states' affine map places it or for a replicated
    param, 'cat_dim' (1 row-parallel, else 0) for a split one; 'vocab_tensor': True for a
    vocabulary param (padding rows trimmed). Kinds whose output was not checked against
    DeepSpeed's (averaged, sub-params, 2-sub-params without an affine map) are refused."""
    from zinspect.core.layouts import tp_affine, tp_rules

    model0 = min(src.ckpt.files_of("model"), key=lambda f: f.name)
    info = src.tf(model0.name).obj.get("universal_checkpoint_info")
    affine = info.get("affine_map") if isinstance(info, dict) else None
    affine = affine if isinstance(affine, dict) else None

    def keys(name: str) -> dict:
        try:
            rule = tp_rules.rule_for(name, info)
        except tp_rules.SplitUnknown as e:
            raise NotMergeable(f"{shown(str(src.ckpt.path))}: {shown(name, 80)}: {e}",
                               "use DeepSpeed's ds_to_universal.py for this one") from None
        vocab = {"vocab_tensor": True} if rule.vocab_size is not None else {}
        if tp_affine.affine_entry(name, affine) is not None or rule.kind == tp_rules.REPLICATED:
            return vocab
        if rule.kind in (tp_rules.ROW, tp_rules.COLUMN):
            return {"cat_dim": 1 if rule.kind == tp_rules.ROW else 0, **vocab}
        if rule.kind == tp_rules.TWO_SUB_PARAMS:  # Megatron's fused [gate; up]: halves joined
            return {"cat_dim": 0, "param_n_sub_params": 2, **vocab}
        raise NotMergeable(f"{shown(str(src.ckpt.path))}: {shown(name, 80)} is a {rule.kind} "
                           "tensor-parallel param: zinspect does not write it to a universal "
                           "checkpoint yet", "use DeepSpeed's ds_to_universal.py for this one")
    return keys


def _refuse_drift(ckpt: Checkpoint, verification: Verification) -> None:
    """A replicated tensor-parallel param whose tp ranks hold different values, or a tied
    pipeline param whose stages do, has no one universal value (ds_to_universal asserts tp
    replicas are equal): refused, nothing written."""
    for name, ranks in verification.drift.items():
        p = ckpt.params.get(name.split("/", 2)[1]) if name.count("/") >= 2 else None
        what, axis, written = ("tied", "stage", "the lowest stage holding it") \
            if p is not None and p.copies else ("replicated", "tp rank", "tp rank 0")
        raise NotMergeable(f"{shown(str(ckpt.path))}: {shown(name.rsplit(':', 1)[0], 120)}: a "
                           f"{what} param differs on {axis}(s) {sorted(ranks)} from {written} "
                           f"(max |a-b| {max(ranks.values()):.3g}); nothing was written",
                           f"`zinspect merge PATH OUT` writes {written}'s copy and reports "
                           "the drift; average or fix the copies in the run")


def _optimizer_state(src: Sources, osd0: dict, inner: dict) -> OutFile:
    """zero/optimizer_state.pt: rank 0's global state without its partitions, and the
    param_groups (lr, betas, eps, weight decay) the loaders copy into the new optimizer."""
    out = OutFile("zero/optimizer_state.pt")
    big = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings",
           "fp32_flat_groups", "optimizer_state_dict")
    obj = {k: v for k, v in osd0.items() if k not in big}
    if src.ckpt.stage == 3:  # its loader reads state[0]['step'] and param_groups from here
        steps = {k: {STEP: s[STEP]} for k, s in inner["state"].items()
                 if isinstance(s, dict) and STEP in s}
        obj["optimizer_state_dict"] = {"state": steps, "param_groups": inner.get("param_groups")}
    obj["param_groups"] = inner.get("param_groups")
    out.obj = src.copy(out, src.optim[0].name, obj)
    return out


def write_universal(ckpt: Checkpoint, out_dir: str | os.PathLike, *, force: bool = False,
                    progress: Progress | None = None, should_stop: ShouldStop | None = None,
                    notice: Callable[[str], None] | None = None,
                    ready: Callable[[], None] | None = None) -> UniversalResult:
    """Write `ckpt` as a universal checkpoint into OUT_DIR (see the module doc). The tree is
    built in a hidden staging dir and renamed into place when complete, `latest_universal`
    last; a failure or cancel leaves nothing behind."""
    _refuse_zero0(ckpt)
    if ckpt.layout == "moe":
        universal_moe.refuse_unloadable(ckpt)
    check_reshardable(ckpt, 1, "converted", CONVERTIBLE)
    started = time.monotonic()
    files = plan_universal(ckpt)
    tag = f"{ckpt.tag}_universal"
    tensors = stream_tensors(files)
    meter = ProgressMeter(sum(t.src_nbytes for t in tensors), progress)
    verification = meter.verification = Verification(tensors, shown=os.path.basename)
    out_dir = Path(out_dir).expanduser()
    inputs = [*ckpt.path.iterdir()] + ([ckpt.root / "latest"] if ckpt.root else [])
    forbidden = [ckpt.path] + ([ckpt.root] if ckpt.root else [])
    staging: Path | None = None
    try:
        with OutputDir(out_dir, [LATEST], inputs=inputs, forbidden_dirs=forbidden,
                       nbytes=output_bytes(files), force=force, notice=notice) as out:
            for old in out_dir.glob(f".*{STAGING}-*"):  # a killed run's (--force got here)
                shutil.rmtree(old, ignore_errors=True)
            staging = out_dir / f".{tag}{STAGING}-{temp_name('x')[-8:]}"
            staging.mkdir()
            if ready is not None:
                ready()
            written: list[Path] = []

            def open_fd(name: str) -> int:
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                written.append(out_dir / tag / name)
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)

            sink = FilesSink(files, open_fd, lambda name, fd: os.close(fd))
            copy_tensors(tensors, sink, meter, should_stop)
            sink.finish()
            _sync_filesystem(staging)  # once for the whole tree: an fsync per file costs ~10 ms
            if should_stop is not None and should_stop():
                raise MergeCancelled("conversion cancelled; nothing was written")
            verification.check_unchanged()
            _refuse_drift(ckpt, verification)
            final = out_dir / tag
            if final.exists():  # only with --force (OutputDir refused a non-empty OUT_DIR)
                shutil.rmtree(final)
            staging.rename(final)
            staging = None
            out.write_text(LATEST, tag)
            out.commit()
    except OSError as e:
        raise writing_failed(out_dir, e) from e
    except KeyboardInterrupt as e:
        raise MergeCancelled("conversion interrupted; nothing was written") from e
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    notes = [HELP_NOTE] + ([universal_moe.EP_NOTE.format(ep=ckpt.topology.ep)]
                           if ckpt.layout == "moe" else [])
    return UniversalResult(out_dir, tag, written + [out_dir / LATEST], output_bytes(files),
                           time.monotonic() - started, len(verification.checks),
                           [f"{c.file}: {c.record}" for c in verification.unverified], notes)
