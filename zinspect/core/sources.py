"""Tensor sources for `stats` and `diff`: a ZeRO checkpoint, a safetensors file or folder, or a
torch `.pt`/`.bin` state dict, each seen as the same thing: a list of `OutputTensor`s (name,
dtype, shape, byte ranges), which `stream.copy_tensors` reads with bounded memory.

Only metadata is read here (a safetensors JSON header, a torch pickle through torchzip's
restricted unpickler, a checkpoint's merge plan); never tensor bytes, never torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from zinspect.core.fmt import shown
from zinspect.core.plan import OutputTensor, Piece
from zinspect.core.torchzip import DTYPE_SIZES, TensorRef
from zinspect.core.writers import SAFETENSORS_DTYPES
from zinspect.errors import UnreadableFile, UsageError

SAFETENSORS_CODES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header
TORCH_SUFFIXES = (".pt", ".bin", ".pth")


@dataclass
class Source:
    path: str
    kind: str  # "checkpoint", "safetensors" or "torch"
    tensors: list[OutputTensor]


def open_source(path: str | os.PathLike, tag: str | None = None, moments: bool = False) -> Source:
    """Whatever PATH is: a safetensors file or a folder of them (with or without its index), a
    torch state dict file, or else a checkpoint (its fp32 masters, as a merge would write them;
    with `moments`, its Adam moments too).
    Raises a ZinspectError naming PATH when it is none of these."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return Source(str(p), "safetensors", safetensors_tensors(p))
    if p.is_file() and (p.suffix in TORCH_SUFFIXES or _is_torch_file(p)):
        return Source(str(p), "torch", torch_tensors(p))
    if p.is_dir() and not (p / "latest").exists():
        files = sorted(p.glob("*.safetensors"))
        if files:
            return Source(str(p), "safetensors", [t for f in files for t in safetensors_tensors(f)])
    return Source(str(p), "checkpoint", checkpoint_tensors(p, tag, moments))


def checkpoint_tensors(path: Path, tag: str | None = None,
                       moments: bool = False) -> list[OutputTensor]:
    """The tensors a merge writes; with `moments`, then each param's Adam exp_avg and
    exp_avg_sq (named `NAME:exp_avg`, `NAME:exp_avg_sq`)."""
    from zinspect.core import open_checkpoint
    from zinspect.core.plan import plan_merge

    ckpt = open_checkpoint(path, tag)
    tensors = plan_merge(ckpt).tensors
    return tensors + moment_tensors(ckpt) if moments else tensors


MOMENTS = ("exp_avg", "exp_avg_sq")


def moment_tensors(ckpt) -> list[OutputTensor]:
    """Adam's moments of every trainable param in a plain ZeRO 1/2/3 checkpoint. Each rank's
    optimizer state holds, per flat group, exp_avg/exp_avg_sq tensors shaped like its fp32
    partition (`state[group][key]`, under base_optimizer_state for ZeRO 1/2, under
    optimizer_state_dict for ZeRO 3), so a param's moment pieces sit at its fp32 fragments'
    group offsets."""
    from zinspect.core.torchzip import read_torch_file

    if ckpt.layout != "zero":
        raise UsageError(f"{ckpt.path}: Adam moments are read from plain ZeRO checkpoints only "
                         f"(this one is {ckpt.layout})", "leave out --moments")
    states: dict[str, tuple] = {}

    def state_of(file: str):
        if file not in states:
            tf = read_torch_file(ckpt.path / file)
            osd = tf.obj.get("optimizer_state_dict") if isinstance(tf.obj, dict) else None
            inner = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict") \
                if isinstance(osd, dict) else None
            state = inner.get("state") if isinstance(inner, dict) else None
            if not isinstance(state, dict):
                raise UnreadableFile(f"{shown(file)}: no optimizer state (exp_avg) in it",
                                     "the optimizer is not Adam, or leave out --moments")
            states[file] = (tf, state)
        return states[file]

    out = []
    for key in MOMENTS:
        for name, p in ckpt.params.items():
            frags = sorted((f for f in p.fragments if f.numel and f.source == "master"),
                           key=lambda f: f.start)
            if p.tied_to or not frags:
                continue
            t = OutputTensor(f"{name}:{key}", p.shape, "float32", "float32", [])
            for f in frags:
                tf, state = state_of(f.file)
                ref = (state.get(f.group) or {}).get(key) if isinstance(state.get(f.group), dict) else None
                offset = tf.tensor_offset(ref) if isinstance(ref, TensorRef) else None
                if offset is None or ref.dtype != "float32" or f.group_offset + f.numel > ref.numel:
                    raise UnreadableFile(f"{shown(f.file)}: no {key} of group {f.group} for "
                                         f"{shown(name, 80)}", "leave out --moments")
                t.pieces.append(Piece(str(ckpt.path / f.file), offset + 4 * f.group_offset,
                                      4 * f.numel))
            out.append(t)
    return out


def safetensors_tensors(path: Path) -> list[OutputTensor]:
    """The tensors of one safetensors file, from its header (checked against the file size)."""
    where = shown(str(path))
    try:
        size = path.stat().st_size
        with open(path, "rb", buffering=0) as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise UnreadableFile(f"{where}: not a safetensors file (bad header length)",
                                     "check the file: it may be truncated or of another format")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UnreadableFile(f"{where}: cannot read its safetensors header ({e})",
                             "check the file: it may be truncated or of another format") from e
    if not isinstance(header, dict):
        raise UnreadableFile(f"{where}: the safetensors header is not a JSON object", "check the file")
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_CODES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise UnreadableFile(f"{where}: bad header entry for {shown(name, 80)!r}",
                                 "check the file") from e
        t = OutputTensor(name, shape, dtype, dtype, [])
        if end - start != t.nbytes or start < 0 or 8 + n + end > size:
            raise UnreadableFile(f"{where}: {shown(name, 80)!r}: its byte range does not match "
                                 "its shape or lies past the end of the file",
                                 "the file is truncated or damaged; copy it again")
        if t.nbytes:
            t.pieces.append(Piece(str(path), 8 + n + start, t.nbytes))
        out.append(t)
    return out


def torch_tensors(path: Path) -> list[OutputTensor]:
    """The tensors of a torch.save'd state dict (a dict of tensors, possibly under a
    `state_dict`/`module`/`model` key), located by torchzip without torch."""
    from zinspect.core.torchzip import read_torch_file

    tf = read_torch_file(path)
    obj = tf.obj
    if isinstance(obj, dict):
        for key in ("state_dict", "module", "model"):
            if isinstance(obj.get(key), dict) and not any(isinstance(v, TensorRef) for v in obj.values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, TensorRef) for v in obj.values()):
        raise UnreadableFile(f"{shown(str(path))}: holds no state dict (a dict of tensors)",
                             "give a file written by torch.save(model.state_dict(), ...)")
    out = []
    for name, ref in obj.items():
        if not isinstance(ref, TensorRef):
            continue
        name = str(name)
        offset = tf.tensor_offset(ref)
        rec = tf.records.get(ref.storage.key)
        if ref.dtype not in DTYPE_SIZES or not ref.is_contiguous() or offset is None or rec is None \
                or (ref.offset + ref.numel) * ref.itemsize > rec.present:
            raise UnreadableFile(f"{shown(str(path))}: {shown(name, 80)!r}: its bytes cannot be "
                                 "read in order (missing, truncated or not contiguous)",
                                 "save a contiguous copy (tensor.contiguous()) or check the file")
        t = OutputTensor(name, ref.shape, ref.dtype, ref.dtype, [])
        if t.nbytes:
            t.pieces.append(Piece(str(path), offset, t.nbytes))
        out.append(t)
    return out


def _is_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"
