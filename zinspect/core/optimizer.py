"""The optimizer's own state in a checkpoint: what it is, its step, hyper-parameters and loss
scaler (`read_optimizer`: one pickle, no tensor bytes). Per param values: optimizer_stats.py.

Where DeepSpeed keeps it (deepspeed-format.md 2.4-2.6, parallel-layouts.md 5-7): ZeRO-1/2 and
BF16_Optimizer under `optimizer_state_dict.base_optimizer_state`, ZeRO-3 under
`optimizer_state_dict.optimizer_state_dict`, both torch `{'state', 'param_groups'}` dicts (an
elastic ZeRO-1/2 save keeps a list of per-group states and `base_optimizer_state_step`);
ZeRO-0 in the model states' `optimizer` (plain torch, or an FP16 wrapper with `cur_scale`);
a universal checkpoint in `zero/optimizer_state.pt`. Every rank steps together with the same
groups, so the lowest rank's file says it for all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zinspect.core.fmt import shown
from zinspect.core.model import Checkpoint, RankFile
from zinspect.core.torchzip import DType, Opaque, TensorRef, TorchFile, read_torch_file
from zinspect.errors import UnreadableFile

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
#: param-group keys that are not hyper-parameters (torch's list of param indices)
NOT_HYPER = {"params"}
MAX_GROUPS = 256  # a forged pickle's million groups are not printed
MAX_KEYS = 32  # hyper-parameters per group
MAX_STATES = 64  # per-param state entries looked at for their keys
DEFAULT_EPS = 1e-8
NO_STATE = "no optimizer state in this checkpoint's files (no readable *_optim_states.pt)"


@dataclass
class LossScaler:
    """The fp16 loss scaler as saved (DeepSpeed's LossScaler / DynamicLossScaler, or an FP16
    optimizer's own `cur_scale` keys). None fields were not saved."""

    scale: float | None = None
    dynamic: bool | None = None
    overflow: bool | None = None  # the last step overflowed (and was skipped)
    iteration: int | None = None  # the scaler's own step count
    last_overflow: int | None = None  # iteration of the last overflow; -1: none yet
    scale_window: int | None = None
    min_scale: float | None = None
    hysteresis: int | None = None

    def to_json(self) -> dict:
        return {k: _finite(v) for k, v in self.__dict__.items()}


@dataclass
class OptimizerState:
    source: str | None  # the file it was read from (relative to the tag dir)
    wrapper: str  # DeepSpeed's optimizer around the torch one: "ZeRO-1/2", "ZeRO-3", ...
    name: str  # "Adam", "AdamW", "SGD", "Muon", ... or "unknown"
    step: int | float | None = None
    groups: list[dict] = field(default_factory=list)  # hyper-parameters per param group
    state_keys: list[str] = field(default_factory=list)  # per-param state
    loss_scaler: LossScaler | None = None
    clip_grad: float | None = None
    skipped_steps: int | None = None  # the engine's count of steps skipped on overflow
    global_steps: int | None = None
    note: str = ""  # what could not be read, or why there is nothing

    @property
    def adam(self) -> bool:
        return all(k in self.state_keys for k in ADAM_KEYS)

    def eps(self, group: int | None) -> float:
        g = self.groups[group] if group is not None and 0 <= group < len(self.groups) else {}
        eps = g.get("eps")
        return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) \
            else DEFAULT_EPS

    def to_json(self) -> dict:
        out = {k: _finite(v) for k, v in self.__dict__.items()}
        out["loss_scaler"] = self.loss_scaler.to_json() if self.loss_scaler else None
        out["adam"] = self.adam
        return out


# -- reading the state dict ---------------------------------------------------------------
def read_optimizer(ckpt: Checkpoint) -> OptimizerState:
    """The optimizer of `ckpt`, from the lowest rank's optimizer file (one pickle, no tensor
    bytes but a few scalars). Never raises for what a checkpoint holds: what cannot be read
    is an OptimizerState named "unknown" whose `note` says why."""
    for path, key in _sources(ckpt):
        rel = _relative(ckpt, path)
        try:
            tf = read_torch_file(path)
        except UnreadableFile as e:
            return OptimizerState(rel, "unknown", "unknown", note=f"cannot read it: {e.message}")
        obj = tf.obj.get(key) if isinstance(tf.obj, dict) and key else tf.obj
        if obj is None and key == "optimizer":  # model states of a ZeRO or universal run
            continue
        out = _describe(tf, obj, rel)
        if path.name == "optimizer_state.pt" and key is None:  # a universal checkpoint
            out.wrapper = "universal"
            if not out.state_keys:
                _universal_states(path.parent, out)
        if out.loss_scaler is not None and out.loss_scaler.dynamic or key == "optimizer":
            _engine_counts(ckpt, out, tf if key == "optimizer" else None)
        return out
    return OptimizerState(None, "none", "unknown", note=NO_STATE)


def _sources(ckpt: Checkpoint) -> Iterator[tuple[Path, str | None]]:
    """(file, key of the optimizer's dict in its pickle), best first: the lowest rank's ZeRO
    optimizer file, else an expert-parallel one, else model states that hold a plain optimizer
    (ZeRO-0), else a universal checkpoint's zero/optimizer_state.pt."""
    def order(f: RankFile):
        return (f.mp_rank or 0, f.rank or 0, f.name)

    for kind, key in (("optim", "optimizer_state_dict"), ("expert_optim", None)):
        files = sorted((f for f in ckpt.files_of(kind) if f.readable), key=order)
        if files:
            yield files[0].path, key
            return
    models = sorted((f for f in ckpt.files_of("model") if f.readable and not f.shallow), key=order)
    if models and ckpt.stage in (0, None):
        yield models[0].path, "optimizer"
    universal = ckpt.path / "zero" / "optimizer_state.pt"
    if universal.is_file():
        yield universal, None


def _universal_states(zero: Path, out: OptimizerState) -> None:
    """A universal checkpoint (ds_to_universal: optimizer_state.pt is the rank-0 dict without
    its sharded states) keeps each param's states as zero/<name>/<state>.pt: the state keys are
    the names the param folders hold (a few looked at: a tied or frozen param's folder holds
    fp32.pt alone), the step a folder's step.pt."""
    names: set[str] = set()
    step_file = None
    try:
        folders = sorted((e for e in os.scandir(zero) if e.is_dir()), key=lambda e: e.name)
        for folder in folders[:MAX_STATES]:
            held = {e.name[:-3] for e in os.scandir(folder.path) if e.name.endswith(".pt")}
            names |= held
            if step_file is None and "step" in held:
                step_file = Path(folder.path) / "step.pt"
            if held - {"fp32", "step"} and step_file is not None:
                break  # a trainable param's folder: every state is named
    except OSError:
        return
    out.state_keys = sorted(n for n in names if n != "fp32")[:MAX_STATES]
    out.name = optimizer_name(out.state_keys, out.groups)
    if out.state_keys:
        out.note = ""
    if step_file is not None and out.step is None:
        try:
            tf = read_torch_file(step_file)
        except UnreadableFile:
            return
        step = tf.read_scalar(tf.obj) if isinstance(tf.obj, TensorRef) else None
        out.step = int(step) if isinstance(step, float) and step.is_integer() else step


def _relative(ckpt: Checkpoint, path: Path) -> str:
    try:
        return str(path.relative_to(ckpt.path))
    except ValueError:
        return str(path)


def _describe(tf: TorchFile, osd, rel: str) -> OptimizerState:
    if not isinstance(osd, dict):
        return OptimizerState(rel, "unknown", "unknown",
                              note="its optimizer entry is not a dict (empty or another format)")
    if isinstance(osd.get("optimizer"), dict) and "state" not in osd:  # expp_rank files
        osd = osd["optimizer"]
    inner, wrapper = osd, "torch"
    for key, name in (("base_optimizer_state", "ZeRO-1/2"), ("optimizer_state_dict", "ZeRO-3")):
        if key in osd:
            inner, wrapper = osd[key], name
            break
    if wrapper == "ZeRO-1/2" and "zero_stage" not in osd:
        wrapper = "BF16_Optimizer"
    elif wrapper == "ZeRO-3" and "zero_stage" not in osd:
        wrapper = "FP16_Optimizer"  # ZeRO-0 fp16/bf16: DeepSpeed's FP16_(Unfused)Optimizer
    state, groups, step = _state_and_groups(tf, osd, inner)
    keys: list[str] = []
    for entry in state[:MAX_STATES]:
        keys += [str(k) for k in entry if str(k) not in keys]
    out = OptimizerState(rel, wrapper, optimizer_name(keys, groups), step, groups, keys,
                         _loss_scaler(osd), _number(osd.get("clip_grad")))
    if not isinstance(inner, (dict, list)):
        out.note = "no torch optimizer state in it"
    elif not state:
        out.note = "no per-param state saved (not stepped yet, or an optimizer without one)"
    return out


def _state_and_groups(tf: TorchFile, osd: dict, inner) -> tuple[list[dict], list[dict], object]:
    """(per-param state entries, hyper-parameters per group, step)."""
    if isinstance(inner, list):  # elastic ZeRO-1/2: one state dict per group, no param_groups
        state = [e for e in inner if isinstance(e, dict)]
        raw_groups = []
    elif isinstance(inner, dict):
        st = inner.get("state")
        state = [e for _, e in sorted(st.items(), key=lambda kv: str(kv[0]))
                 if isinstance(e, dict)][:MAX_STATES] if isinstance(st, dict) else []
        raw_groups = inner.get("param_groups") or osd.get("param_groups") or []
    else:
        state, raw_groups = [], osd.get("param_groups") or []
    groups = [{str(k): _value(tf, v) for k, v in list(g.items())[:MAX_KEYS] if k not in NOT_HYPER}
              for g in (raw_groups if isinstance(raw_groups, list) else [])[:MAX_GROUPS]
              if isinstance(g, dict)]
    step = next((s for s in (_value(tf, e.get("step")) for e in state) if s is not None), None)
    if step is None:
        step = _value(tf, osd.get("base_optimizer_state_step"))
    if step is None:  # optimizers that count in the group (DeepSpeed's FusedAdam, CPU Adam)
        step = next((g["step"] for g in groups if isinstance(g.get("step"), (int, float))), None)
    if isinstance(step, float) and step.is_integer():
        step = int(step)  # a count, saved as a float tensor
    return state, groups, step if isinstance(step, (int, float)) else None


def optimizer_name(keys: list[str], groups: list[dict]) -> str:
    """What the per-param state keys (and group hyper-parameters) say the optimizer is."""
    k, g = set(keys), {key for group in groups for key in group}
    if {"exp_avg", "exp_avg_sq"} <= k:
        if "use_muon" in g:
            return "Muon with AdamW"
        # torch's Adam and AdamW say which they are; DeepSpeed's FusedAdam / CPUAdam do not
        decoupled = {grp.get("decoupled_weight_decay") for grp in groups}
        return "AdamW" if True in decoupled else "Adam" if False in decoupled else "Adam/AdamW"
    if "momentum_buffer" in k:
        return "Muon" if g & {"ns_steps", "ns_coefficients", "use_muon"} else "SGD (momentum)"
    if {"exp_avg_sq_row", "exp_avg_sq_col"} & k:
        return "Adafactor"
    if k == {"exp_avg"} or k == {"exp_avg", "step"}:
        return "Lion"
    if "sum" in k:
        return "Adagrad"
    if "square_avg" in k:
        return "Adadelta" if "acc_delta" in k else "RMSprop"
    if not k and groups:
        return "SGD" if "momentum" in g else "unknown"
    return "unknown"


def _loss_scaler(osd: dict) -> LossScaler | None:
    scaler = osd.get("loss_scaler")
    if isinstance(scaler, Opaque):
        get = scaler.get
        out = LossScaler(scale=_number(get("cur_scale")), dynamic=_bool(get("dynamic")),
                         iteration=_int(get("cur_iter")),
                         last_overflow=_int(get("last_overflow_iter")),
                         scale_window=_int(get("scale_window")), min_scale=_number(get("min_scale")),
                         hysteresis=_int(get("cur_hysteresis")))
    elif "cur_scale" in osd:  # FP16_Optimizer / FP16_UnfusedOptimizer keep the scaler's keys
        out = LossScaler(scale=_number(osd.get("cur_scale")), iteration=_int(osd.get("cur_iter")),
                         last_overflow=_int(osd.get("last_overflow_iter")),
                         scale_window=_int(osd.get("scale_window")))
    else:
        return None
    out.dynamic = _bool(osd.get("dynamic_loss_scale")) if out.dynamic is None else out.dynamic
    out.overflow = _bool(osd.get("overflow"))
    return out


def _engine_counts(ckpt: Checkpoint, out: OptimizerState, tf: TorchFile | None) -> None:
    """The engine's skipped and global step counts, from the model states (read only where
    they matter: a dynamic loss scale skips steps; ZeRO-0 has just read that file)."""
    if tf is None:
        model = next((f for f in sorted(ckpt.files_of("model"), key=lambda f: (f.rank or 0, f.name))
                      if f.readable and not f.shallow), None)
        try:
            tf = read_torch_file(model.path) if model else None
        except UnreadableFile:
            tf = None
    if tf is not None and isinstance(tf.obj, dict):
        out.skipped_steps = _int(tf.obj.get("skipped_steps"))
        out.global_steps = _int(tf.obj.get("global_steps"))


def _value(tf: TorchFile, v, depth: int = 0):
    """A hyper-parameter as JSON can hold it: numbers, strings, short lists (betas); a
    one-element tensor (a `step`, a tensor lr) its value; anything else a short description.
    Bounded: a forged pickle's list of lists that share themselves is not walked out."""
    if v is None or isinstance(v, (bool, int, str)):
        return v[:1000] if isinstance(v, str) else v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (tuple, list)):
        return [_value(tf, x, depth + 1) for x in v[:16]] if depth < 2 else "<nested>"
    if isinstance(v, TensorRef):
        return tf.read_scalar(v) if v.numel == 1 and depth == 0 else f"tensor{list(v.shape)}"
    if isinstance(v, DType):
        return v.name
    return f"<{getattr(v, 'qualname', type(v).__name__)}>"


def _finite(v):
    """JSON has no inf / nan: such a value is written as its name ("inf")."""
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _bool(v) -> bool | None:
    return v if isinstance(v, bool) else None


def summary_line(opt: OptimizerState) -> str:
    """One line for people: `AdamW (ZeRO-1/2), step 2; lr 0.01, betas (0.9, 0.95), ...`."""
    if opt.name == "unknown" and not opt.state_keys:
        return f"unknown ({opt.note})" if opt.note else "unknown"
    step = f", step {_short(opt.step)}" if opt.step is not None else ""
    head = f"{opt.name} ({opt.wrapper}){step}"
    hypers = []
    for key in ("lr", "betas", "eps", "weight_decay"):
        values = []
        for g in opt.groups:
            if key in g and g[key] not in values:
                values.append(g[key])
        if values:
            hypers.append(f"{key} " + " / ".join(_short(v) for v in values[:4]))
    if opt.clip_grad is not None:
        hypers.append(f"clip_grad {_short(opt.clip_grad)}")
    keys = [k for k in opt.state_keys if k != "step"]
    if keys and not opt.adam:
        hypers.append(f"state {', '.join(keys[:6])}")
    return shown(head + ("; " + ", ".join(hypers) if hypers else ""), 300)


def scaler_line(opt: OptimizerState) -> str | None:
    """`256, dynamic (iteration 2, no overflow yet, 0 step(s) skipped)`; None without a
    scaler or with the static scale 1 of an fp32 / bf16 run."""
    s = opt.loss_scaler
    if s is None or (not s.dynamic and s.scale in (1.0, None)):
        return None
    facts = []
    if s.iteration is not None:
        facts.append(f"iteration {s.iteration}")
    if s.last_overflow is not None:
        facts.append("no overflow yet" if s.last_overflow < 0 else
                     f"last overflow at iteration {s.last_overflow}")
    if s.overflow:
        facts.append("the last step overflowed")
    if opt.skipped_steps is not None:
        facts.append(f"{opt.skipped_steps} step(s) skipped")
    kind = "dynamic" if s.dynamic else "static"
    return f"{_short(s.scale)}, {kind}" + (f" ({', '.join(facts)})" if facts else "")


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "(" + ", ".join(_short(x) for x in v) + ")"
    return str(v)
