"""Output formats: streamed safetensors (default) and torch.save files, sharded the Hugging Face way.

safetensors needs no library: an 8-byte header length, a JSON header (every shape and offset is
known from the plan), then the tensors' bytes back to back. So a shard is written as a stream and
memory stays bounded. `torch.save` output needs torch and holds one shard in memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from zinspect.core.plan import OutputTensor
from zinspect.core.stream import BufferSink, ProgressMeter, ShouldStop, copy_tensors, fd_sink
from zinspect.errors import MissingDependency

SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
FORMATS = {
    # format: (single-file name, shard name pattern, index name)
    "safetensors": ("model.safetensors", "model-{:05d}-of-{:05d}.safetensors",
                    "model.safetensors.index.json"),
    "pt": ("pytorch_model.bin", "pytorch_model-{:05d}-of-{:05d}.bin",
           "pytorch_model.bin.index.json"),
}


@dataclass
class Shard:
    name: str
    tensors: list[OutputTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], fmt: str, max_shard_size: int | None) -> list[Shard]:
    """Greedy, in order: a shard closes before the tensor that would push it past the limit
    (a tensor larger than the limit gets a shard of its own)."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if max_shard_size and groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    single, pattern, _ = FORMATS[fmt]
    if len(groups) == 1:
        return [Shard(single, groups[0])]
    return [Shard(pattern.format(i + 1, len(groups)), g) for i, g in enumerate(groups)]


def index_json(shards: list[Shard]) -> str:
    total = sum(s.nbytes for s in shards)
    weight_map = {t.name: s.name for s in shards for t in s.tensors}
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                      indent=2, sort_keys=True) + "\n"


def safetensors_header(tensors: list[OutputTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{t.name}: dtype {t.dtype} has no safetensors code")
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # data starts 64-byte aligned (spaces are allowed)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(fd: int, shard: Shard, meter: ProgressMeter,
                      should_stop: ShouldStop | None) -> None:
    write = fd_sink(fd)
    write(memoryview(safetensors_header(shard.tensors)))
    copy_tensors(shard.tensors, write, meter, should_stop)


def write_torch(fd: int, shard: Shard, meter: ProgressMeter, should_stop: ShouldStop | None) -> None:
    """torch.save of {name: tensor}; tied aliases share their owner's tensor (saved once)."""
    torch = require_torch()
    state = torch_tensors(shard.tensors, meter, should_stop)
    with os.fdopen(os.dup(fd), "wb") as f:
        torch.save(state, f)


def torch_tensors(tensors: list[OutputTensor], meter: ProgressMeter,
                  should_stop: ShouldStop | None = None) -> dict:
    """{name: torch tensor} of `tensors`, read in one stream. A tied alias shares its owner's
    tensor when the owner is among them, and is read like an owner otherwise."""
    torch = require_torch()

    names = {t.name for t in tensors}
    owners = [t for t in tensors if t.tied_to is None or t.tied_to not in names]
    sink = BufferSink(owners)
    copy_tensors(owners, sink, meter, should_stop)
    built = {}
    for t, buf in zip(owners, sink.buffers, strict=True):
        dtype = getattr(torch, t.dtype)
        built[t.name] = (torch.frombuffer(buf, dtype=dtype) if buf else
                         torch.empty(0, dtype=dtype)).reshape(t.shape)
    for t in tensors:
        if t.name not in built:
            built[t.name] = built[t.tied_to]
            meter.add(t.nbytes, t.name)
    return {t.name: built[t.name] for t in tensors}


def require_torch():
    """torch, imported on demand: only `.pt` output and the tensor API need it."""
    try:
        import torch
    except ImportError as e:
        raise MissingDependency(
            "torch is not installed: .pt output and the tensor API (get_fp32_state_dict, "
            "load_into) need it", "pip install 'zinspect[torch]', or write safetensors "
            "(the default format, which needs no torch)") from e
    return torch


WRITERS = {"safetensors": write_safetensors, "pt": write_torch}
