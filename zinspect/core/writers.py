"""Output formats behind one registry (`WRITERS`): streamed safetensors (default) and torch.save
files, sharded the Hugging Face way.

safetensors needs no library: an 8-byte header length, a JSON header (every shape and offset is
known from the plan), then the tensors' bytes back to back. So a shard is written as a stream and
memory stays bounded. `torch.save` output needs torch and holds one shard in memory.

The CLI's `--format` choices and help, the app's merge form and the dependency check all read
`WRITERS`. Adding a shard writer is one `Writer(...)` entry here with its `write` function; a
writer of a directory tree (DeepSpeed's universal checkpoint) gives `tree` instead and writes
through the same OutputDir (see `register`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from zinspect.core.dtypes import OUTPUT_DTYPES
from zinspect.core.plan import OutputTensor
from zinspect.core.stream import BufferSink, ProgressMeter, ShouldStop, copy_tensors, fd_sink
from zinspect.errors import MissingDependency, UsageError

SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


@dataclass
class Shard:
    name: str
    tensors: list[OutputTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], fmt: str, max_shard_size: int | None,
                stem: str | None = None) -> list[Shard]:
    """Greedy, in order: a shard closes before the tensor that would push it past the limit
    (a tensor larger than the limit gets a shard of its own). `stem` names the files
    (default: the writer's, e.g. "model")."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if max_shard_size and groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    w = writer(fmt)
    if len(groups) == 1:
        return [Shard(w.single_name(stem), groups[0])]
    return [Shard(w.shard_name(i + 1, len(groups), stem), g) for i, g in enumerate(groups)]


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


@dataclass(frozen=True)
class Writer:
    """One output format. File names are templates of `stem` ("model", "exp_avg"...): `single`
    for a one-file output, `shard` (with `i` and `n`) and `index` for a sharded one. `dtypes`
    are the output dtypes it can write (the plan's names: float32, bfloat16, float16).

    A shard writer has `write(fd, shard, meter, should_stop)`: the merge plans, verifies and
    commits, the writer only lays bytes out. A tree writer (`tree`) makes a whole directory
    tree from the checkpoint itself, with the merge's guarantees (OutputDir, verified stream,
    nothing left on failure): `tree(ckpt, out_dir, *, force, progress, should_stop, notice,
    ready)` returns a result with `files`, `bytes`, `seconds`, `verified`, `unverified` and
    `notes` (each said to the user); it writes every param, so a selection, --salvage, --peft
    and --max-shard-size do not apply to it."""

    name: str
    description: str
    stem: str = "model"
    single: str = ""
    shard: str = ""
    index: str = ""
    needs_torch: bool = False
    dtypes: tuple[str, ...] = tuple(OUTPUT_DTYPES.values())
    write: Callable | None = None
    tree: Callable | None = None
    label: str = ""  # the app's radio button (default: the name)

    def single_name(self, stem: str | None = None) -> str:
        return self.single.format(stem=stem or self.stem)

    def shard_name(self, i: int, n: int, stem: str | None = None) -> str:
        return self.shard.format(stem=stem or self.stem, i=i, n=n)

    def index_name(self, stem: str | None = None) -> str:
        return self.index.format(stem=stem or self.stem)

    def check(self, dtype: str = "float32") -> None:
        """Refuse before anything is written: a dtype it cannot write, a missing dependency."""
        if dtype not in self.dtypes:
            short = {v: k for k, v in OUTPUT_DTYPES.items()}
            raise UsageError(f"--format {self.name} writes {', '.join(short.get(d, d) for d in self.dtypes)}"
                             f" only, not {short.get(dtype, dtype)}",
                             f"leave out --dtype, or use another --format ({', '.join(WRITERS)})")
        if self.needs_torch:
            require_torch()


#: every output format, in the order the CLI and the app offer them (the first is the default)
WRITERS: dict[str, Writer] = {}


def register(w: Writer) -> Writer:
    WRITERS[w.name] = w
    return w


register(Writer("safetensors", "streamed safetensors shards + index, no torch needed (default)",
                single="{stem}.safetensors", shard="{stem}-{i:05d}-of-{n:05d}.safetensors",
                index="{stem}.safetensors.index.json", write=write_safetensors))
register(Writer("pt", "torch.save files (pytorch_model.bin); needs torch, holds one shard in memory",
                stem="pytorch_model", single="{stem}.bin", shard="{stem}-{i:05d}-of-{n:05d}.bin",
                index="{stem}.bin.index.json", needs_torch=True, write=write_torch,
                label="pt (torch.save)"))


def _write_universal(ckpt, out_dir, **callbacks):
    from zinspect.core.universal import write_universal  # 0.1 s of imports: only when asked

    return write_universal(ckpt, out_dir, **callbacks)


register(Writer("universal", "a DeepSpeed universal checkpoint (latest_universal + zero/<param>/"
                "{fp32,exp_avg,exp_avg_sq}.pt) for load_universal at any world size; every "
                "param, fp32; DeepSpeed's universal load does not restore frozen params and "
                "buffers", dtypes=("float32",), tree=_write_universal))


def writer(name: str) -> Writer:
    """The registered writer `name`; UsageError naming the choices otherwise."""
    w = WRITERS.get(name)
    if w is None:
        raise UsageError(f"unknown format {name!r}", f"use one of: {', '.join(WRITERS)}")
    return w


def formats_help() -> str:
    """One line per writer, for --help."""
    return "\n".join(f"  {w.name:<12} {w.description}" for w in WRITERS.values())
