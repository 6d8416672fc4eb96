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
    exp_avg_sq (named `NAME:exp_avg`, `NAME:exp_avg_sq`), or another optimizer's own states
    (`NAME:momentum_buffer`, ...)."""
    from zinspect.core import open_checkpoint
    from zinspect.core.plan import plan_merge

    ckpt = open_checkpoint(path, tag)
    tensors = plan_merge(ckpt).tensors
    return tensors + moment_tensors(ckpt) if moments else tensors


def moment_tensors(ckpt) -> list[OutputTensor]:
    """Adam's moments (or another optimizer's per-param states: SGD's momentum_buffer, ...) of
    every trainable param, in any layout the core locates them for (`Checkpoint.state_fragments`:
    the fp32 masters' ranges in each rank's moment tensor of the same flat group; tensor-parallel
    shards are put together as the merge puts the masters)."""
    from zinspect.core.plan import param_problem, param_tensor
    from zinspect.core.states import held_states

    keys = held_states(ckpt)
    if not keys:
        held = ", ".join(ckpt.states) or "nothing zinspect reads"
        raise UsageError(f"{ckpt.path}: no per-param optimizer state (exp_avg, momentum_buffer, "
                         f"...) in its files (they hold {held})", "leave out --moments")
    out = []
    for key in keys:
        for name, p in ckpt.params.items():
            if p.tied_to or p.frozen or not ckpt.state_fragments(name, "fp32"):
                continue
            frags = ckpt.state_fragments(name, key)
            problem = param_problem(p, frags) or next(
                (f"{shown(f.file)} holds it as {f.dtype}" for f in frags if f.dtype != "float32"),
                None)
            if problem is not None:
                raise UnreadableFile(f"{shown(name, 80)}: its {key} cannot be read ({problem})",
                                     "leave out --moments")
            out.append(param_tensor(ckpt, f"{name}:{key}", p, None, fragments=frags))
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
