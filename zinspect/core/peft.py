"""PEFT (LoRA) runs: recognise them and write only the adapter, named as PEFT saves it.

A PEFT model trained under ZeRO names its params `base_model.model.<module>.lora_A.<adapter>.weight`
(and `<module>.modules_to_save.<adapter>.<leaf>` for fully trained copies). `PeftModel.save_pretrained`
keeps the adapter's tensors only and removes the adapter name; `PeftModel.from_pretrained` puts it
back. adapter_config.json, which the Trainer writes beside `latest`, says what the adapter is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from zinspect.core.model import Checkpoint
from zinspect.core.plan import OutputTensor
from zinspect.errors import UsageError

CONFIG = "adapter_config.json"
#: the stem of the adapter's weights file (adapter_model.safetensors / adapter_model.bin)
WEIGHTS_STEM = "adapter_model"
#: name components of PEFT's own tensors (LoRA, DoRA, LoRA on embeddings)
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass
class PeftInfo:
    """What the overview shows about a PEFT run."""

    peft_type: str | None  # from adapter_config.json (None: recognised by the names only)
    rank: int | None
    alpha: float | None
    targets: list[str]
    adapter: str  # the adapter name in the param names ("default")
    trainable: int  # elements
    base: int  # elements of the frozen base
    config_path: Path | None


def root_of(ckpt: Checkpoint) -> Path:
    """The dir the Trainer writes config files into: the one holding `latest`."""
    return ckpt.root or ckpt.path.parent


def adapter_name(name: str) -> str | None:
    """'...q_proj.lora_A.default.weight' -> 'default'; None for a name that is not PEFT's."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-2]):
        if part in ADAPTER_PARTS or part == "modules_to_save":
            return parts[i + 1]
    return None


def detect(ckpt: Checkpoint) -> PeftInfo | None:
    """A PeftInfo when the params carry PEFT's names or the root holds adapter_config.json."""
    # only names holding one of the parts can be PEFT's: the test in C first (300k names)
    adapters = {a for a in map(adapter_name, [n for n in ckpt.params if "lora_" in n or
                                              "modules_to_save" in n]) if a}
    cfg_path = root_of(ckpt) / CONFIG
    config = _read_config(cfg_path) if cfg_path.is_file() else None
    if not adapters and config is None:
        return None
    trainable = sum(p.numel for p in ckpt.params.values() if not p.frozen and not p.tied_to)
    base = sum(p.numel for p in ckpt.params.values() if p.frozen and not p.tied_to)
    cfg = config or {}
    targets = cfg.get("target_modules") or []
    return PeftInfo(cfg.get("peft_type"), cfg.get("r"), cfg.get("lora_alpha"),
                    sorted(targets) if isinstance(targets, list) else [str(targets)],
                    sorted(adapters)[0] if adapters else "default", trainable, base,
                    cfg_path if config is not None else None)


def adapter_tensors(ckpt: Checkpoint, tensors: list[OutputTensor]) -> list[OutputTensor]:
    """The adapter's tensors among `tensors`, renamed as PeftModel.save_pretrained names them.
    Raises UsageError when the checkpoint is not a PEFT run or lacks adapter_config.json."""
    info = detect(ckpt)
    cfg_path = root_of(ckpt) / CONFIG
    if info is None:
        raise UsageError(f"{ckpt.path}: --peft: this is not a PEFT run (no param is named like "
                         "'...lora_A.default.weight' and there is no adapter_config.json)",
                         "merge without --peft to write the full weights")
    if info.config_path is None:
        raise UsageError(f"{cfg_path}: --peft needs adapter_config.json beside `latest`, and it "
                         "is missing", "copy the adapter_config.json of the run there (the "
                         "Trainer writes it; peft's LoraConfig(...).save_pretrained(DIR) does too)")
    bias = _read_config(cfg_path).get("bias", "none")
    adapter = info.adapter
    out = []
    for t in tensors:
        p = ckpt.params.get(t.name)
        ours = adapter_name(t.name) == adapter
        if ours or (bias != "none" and p is not None and not p.frozen and t.name.endswith(".bias")):
            out.append(replace(t, name=peft_key(t.name, adapter), tied_to=None))
    if not out:
        raise UsageError(f"{ckpt.path}: --peft: no adapter tensor is left to write",
                         "check the --exclude patterns and the selection")
    return out


def peft_key(name: str, adapter: str) -> str:
    """PEFT's saved name: `modules_to_save.<adapter>.` and then every `.<adapter>` removed
    (get_peft_model_state_dict's rule)."""
    return name.replace(f"modules_to_save.{adapter}.", "").replace(f".{adapter}", "")


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read it as JSON ({e})"[:300],
                         "write it again with peft's save_pretrained") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a PEFT adapter config", "write it again with peft's save_pretrained")
    return data


def summary(ckpt: Checkpoint) -> dict | None:
    """What `zinspect info` shows of a PEFT run (None for another run); never raises."""
    try:
        info = detect(ckpt)
    except UsageError as e:
        return {"error": e.message}
    if info is None:
        return None
    return {"peft_type": info.peft_type, "rank": info.rank, "alpha": info.alpha,
            "targets": info.targets, "adapter": info.adapter, "trainable_numel": info.trainable,
            "base_numel": info.base, "adapter_config": str(info.config_path) if info.config_path
            else None}


def describe(s: dict) -> str:
    """One line for a person: 'LORA r=4 alpha=8 on k_proj, q_proj: 1.2k trainable ...'."""
    from zinspect.core import fmt

    if "error" in s:
        return s["error"]
    where = f" on {', '.join(s['targets'])}" if s["targets"] else ""
    conf = "" if s["adapter_config"] else " (no adapter_config.json beside `latest`: --peft needs it)"
    return (f"{s['peft_type'] or 'PEFT'} r={s['rank']} alpha={s['alpha']}{where}, adapter "
            f"{s['adapter']!r}: {fmt.short_count(s['trainable_numel'])} trainable, "
            f"{fmt.short_count(s['base_numel'])} base (frozen){conf}; `merge --peft` writes it")
