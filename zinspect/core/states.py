"""`merge --state all`: the optimizer's per-param state written beside the weights.

OUT gets, next to the weights (model.safetensors or its shards), one file set per state the
checkpoint holds (`Checkpoint.states`: Adam's moments, or another optimizer's own, e.g. SGD's
momentum_buffer), with the weights' tensor names, in the weights' format, sharded by the same
--max-shard-size:

    exp_avg.safetensors      (or exp_avg-00001-of-0000N.safetensors + exp_avg.safetensors.index.json)
    exp_avg_sq.safetensors   (SGD / Muon: momentum_buffer.safetensors; Adagrad: sum.safetensors)
    optimizer_state.json     the optimizer, its step, each param group's hyper-parameters and
                             param names, the loss scaler, and which files hold which state

Flat names, not an `optimizer_state/` subdirectory: every output file then goes through the same
OutputDir (created O_EXCL|O_NOFOLLOW under a temp name in one locked directory, renamed in at
the end, removed on failure), with nothing new to check about a directory made inside OUT.
`safetensors.torch.load_file(OUT / "exp_avg.safetensors")` gives {param name: exp_avg}.

The moments are planned from `Checkpoint.state_fragments` (the masters' element ranges in the
moment tensors of the same rank and group), so every layout that describes its masters gets
its moments too, tensor-parallel shards included; they are streamed, CRC-verified and counted
for NaN/Inf exactly as the weights. They are written as fp32 (their saved dtype; 16-bit moments
would be upcast exactly): `--dtype` is for the weights. Frozen params have no moments; tied
aliases are written once, under their owner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from zinspect.core.model import MOMENTS, Checkpoint  # noqa: F401 (MOMENTS: merge's tree writer)
from zinspect.core.plan import MergePlan, OutputTensor, param_problem, param_tensor
from zinspect.errors import NotMergeable, UsageError

STATE_JSON = "optimizer_state.json"
CHOICES = ("weights", "all")


@dataclass
class StatePlan:
    """The moments to write: state -> tensors (in the weights' order), what was left out."""

    tensors: dict[str, list[OutputTensor]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # "name:state" -> why

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for ts in self.tensors.values() for t in ts)

    def without(self, names: set[str]) -> StatePlan:
        """The plan minus the moments of params the weights' plan dropped (salvage)."""
        return StatePlan({s: [t for t in ts if t.name not in names] for s, ts in self.tensors.items()},
                         self.dropped)


def held_states(ckpt: Checkpoint) -> list[str]:
    """The per-param optimizer states `merge --state all` writes: every state the files hold
    beside the masters (Adam's moments first)."""
    return [s for s in ckpt.states if s != "fp32"]


def unavailable(ckpt: Checkpoint) -> str | None:
    """Why `ckpt` has no optimizer state to write (None: it has some); the app's form says it too."""
    if not held_states(ckpt):
        return ("the files hold no per-param optimizer state zinspect reads (exp_avg, "
                "momentum_buffer, ...: none saved, or a layout whose state zinspect does not read)")
    return None


def plan_states(ckpt: Checkpoint, plan: MergePlan, salvage: bool = False) -> StatePlan:
    """The per-param optimizer states (`held_states`) of every trainable param the weights'
    `plan` writes. Refuses (UsageError) when the files hold none; a param whose state cannot be
    rebuilt refuses (NotMergeable), or with `salvage` is listed and left out."""
    why = unavailable(ckpt)
    if why:
        raise UsageError(f"{ckpt.path}: {why}", "merge without --state all")
    held = held_states(ckpt)
    out = StatePlan({s: [] for s in held})
    for t in plan.tensors:
        p = ckpt.params.get(t.name)
        if p is None or t.tied_to is not None or p.frozen or p.tied_to is not None:
            continue
        for state in held:
            frags = ckpt.state_fragments(t.name, state)
            why = param_problem(p, frags)
            if why:
                out.dropped[f"{t.name}:{state}"] = why
            else:
                out.tensors[state].append(param_tensor(ckpt, t.name, p, None, "float32", frags))
    if out.dropped and not salvage:
        lines = "; ".join(f"{n}: {why}" for n, why in list(out.dropped.items())[:5])
        raise NotMergeable(f"{ckpt.path}: {len(out.dropped)} optimizer state tensor(s) cannot "
                           f"be rebuilt: {lines}", "`--salvage` writes the rest and lists "
                           "what it left out, or merge without --state all")
    return out


def state_json(ckpt: Checkpoint, states: StatePlan, files: dict[str, list[str]]) -> str:
    """optimizer_state.json: what the moments are and what they belong to."""
    from zinspect.core.optimizer import read_optimizer

    opt = read_optimizer(ckpt)
    written = {t.name for ts in states.tensors.values() for t in ts}
    groups = []
    for i, g in enumerate(opt.groups):
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [n for n, p in ckpt.params.items()
                                  if p.group == i and n in written]})
    return json.dumps({
        "format": "zinspect optimizer state 1",
        "optimizer": opt.name, "wrapper": opt.wrapper, "step": opt.step,
        "param_groups": groups,
        "loss_scaler": opt.loss_scaler.to_json() if opt.loss_scaler else None,
        "states": {s: files[s] for s in states.tensors},
        "dtype": "float32",
        "dropped": states.dropped,
    }, indent=2, default=str) + "\n"
