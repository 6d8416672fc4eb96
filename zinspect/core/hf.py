"""Hugging Face–ready output: what `from_pretrained(OUT)` needs beside the weights.

The HF Trainer writes config.json, generation_config.json and the tokenizer files into
`checkpoint-N/`, beside DeepSpeed's `latest`. A merge copies them into OUT, so OUT loads with
`AutoModelForCausalLM.from_pretrained(OUT)`; the weights are already named as HF names them
(model.safetensors, model-00001-of-0000N.safetensors + model.safetensors.index.json). Tied
aliases (lm_head.weight) are left out when the config ties them, as save_pretrained does (with
--no-hf-files the output is a plain state dict and keeps them, for load_state_dict(strict=True)).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from zinspect.core import peft as peft_mod
from zinspect.core.model import Checkpoint
from zinspect.core.plan import MergePlan
from zinspect.core.states import StatePlan
from zinspect.core.writers import Shard, plan_shards, writer
from zinspect.errors import UsageError

CONFIG = "config.json"
#: what the Trainer / save_pretrained leave beside the weights (model, generation, tokenizer)
HF_FILES = (CONFIG, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
            "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
            "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
            "processor_config.json")
#: not copied next to an adapter: they would make OUT look like a full model
MODEL_ONLY = (CONFIG, "generation_config.json")


@dataclass
class Output:
    """A merge plan shaped for its consumer: the tensors to write, the files to copy
    (output name -> source path) and what to tell the user."""

    plan: MergePlan
    copies: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    peft: bool = False
    states: StatePlan | None = None  # --state all: the optimizer moments written beside


def prepare(ckpt: Checkpoint, plan: MergePlan, *, peft: bool = False,
            copy_files: bool = True) -> Output:
    """The Output of `plan` for `ckpt`: the adapter alone with `peft`, the full model with its HF
    files otherwise. Raises UsageError (peft: not a PEFT run, no adapter_config.json)."""
    root = peft_mod.root_of(ckpt)
    present = {n: root / n for n in HF_FILES if (root / n).is_file()}
    if peft:
        tensors = peft_mod.adapter_tensors(ckpt, plan.tensors)
        copies = {peft_mod.CONFIG: root / peft_mod.CONFIG}
        if copy_files:
            copies.update({n: p for n, p in present.items() if n not in MODEL_ONLY})
        notes = [f"writing the {peft_mod.detect(ckpt).peft_type or 'PEFT'} adapter only: "
                 f"{len(tensors)} tensors named as PeftModel.save_pretrained names them"]
        return Output(replace(plan, tensors=tensors), copies, notes + _copied(copies), True)
    notes = []
    tensors = plan.tensors
    config = _config(present.get(CONFIG))
    if copy_files and config is not None and config.get("tie_word_embeddings", True):
        names = {t.name for t in tensors}
        tied = [t for t in tensors if t.tied_to in names]
        if tied:
            tensors = [t for t in tensors if t not in tied]
            notes.append(f"left out {len(tied)} tied alias(es) ({', '.join(t.name for t in tied[:3])}): "
                         "config.json ties them (tie_word_embeddings), from_pretrained restores them")
    if peft_mod.detect(ckpt) is not None:
        notes.append("this is a PEFT run: the output keeps PEFT's names (base_model.model...); "
                     "--peft writes the adapter that PeftModel.from_pretrained loads")
    copies = present if copy_files else {}
    if config is None and not peft_mod.detect(ckpt):
        notes.append(f"no config.json in {root}: from_pretrained(OUT) needs the model's "
                     "config.json (and the tokenizer files) there; add them with "
                     "`AutoConfig.from_pretrained(BASE).save_pretrained(OUT)` and "
                     "`AutoTokenizer.from_pretrained(BASE).save_pretrained(OUT)`")
    elif not copy_files and present:
        notes.append(f"--no-hf-files: not copying {', '.join(present)} from {root}")
    return Output(replace(plan, tensors=tensors), copies, notes + _copied(copies))


def _copied(copies: dict[str, Path]) -> list[str]:
    if not copies:
        return []
    return [f"copying {', '.join(copies)} from {next(iter(copies.values())).parent}"]


def _config(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not readable as JSON ({e})"[:300],
                         "fix it or pass --no-hf-files") from e
    return data if isinstance(data, dict) else None


def copy_into(out, copies: dict[str, Path]) -> None:
    """Copy each file through `out` (an OutputDir: a temp name, renamed in at commit)."""
    for name, src in copies.items():
        data = memoryview(src.read_bytes())
        fd = out.create(name)
        try:
            while len(data):
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)


def shards_of(output: Output, fmt: str, max_shard_size: int | None):
    """The files the weights go to: PEFT's single adapter file, or HF's model shards."""
    if output.peft:
        return [Shard(writer(fmt).single_name(peft_mod.WEIGHTS_STEM), output.plan.tensors)]
    return plan_shards(output.plan.tensors, fmt, max_shard_size)
