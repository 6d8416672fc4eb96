"""Plan a merge: for every output tensor, the byte ranges to copy from which rank files.

A plan is pure metadata. Executing it (`zinspect.core.stream`) reads exactly those bytes: the fp32
partitions, the 16-bit frozen values and the buffers, never the Adam moments or whole files.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zinspect.core import layouts
from zinspect.core.coverage import first_problem
from zinspect.core.fmt import shown
from zinspect.core.model import ERROR, Checkpoint, Finding, Fragment, Param
from zinspect.core.selection import Selection
from zinspect.core.torchzip import DTYPE_SIZES
from zinspect.errors import NotMergeable, UsageError

MERGEABLE_LAYOUTS = layouts.MERGEABLE
#: file-level errors that say a rank file's tensors are not this checkpoint's: under --salvage,
#: every param with a fragment in such a file is left out (its shapes may still look right)
UNTRUSTED_FILE_CODES = {"step-mismatch", "mixed-prefix", "stage-mismatch", "world-size-mismatch",
                        "partition-size", "unsafe-pickle"}
#: errors that put a whole flat group in doubt: under --salvage, every param of it is left out
#: (a param-order mismatch names the first param out of place; its partner moved too)
GROUP_CODES = {"group-coverage", "param-order-mismatch"}
#: source dtypes that are written upcast to fp32 (frozen 16-bit values, 16-bit masters)
UPCAST = ("bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class Piece:
    """`nbytes` bytes at `offset` of `path`, holding consecutive elements of one tensor."""

    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Weave:
    """`rows` output rows made of several sources' rows (a tensor-parallel split on dim 1): the
    tensor's next `npieces` pieces hold, back to back, each part's bytes in `parts` order; part
    j gives every output row `take` bytes, its rows `stride` bytes apart in what was read
    ((rows - 1) * stride + take bytes). Output row = the parts' runs side by side."""

    npieces: int
    rows: int
    parts: tuple[tuple[int, int], ...]  # (stride, take) bytes per part, in output order

    @property
    def read_nbytes(self) -> int:
        return sum((self.rows - 1) * stride + take for stride, take in self.parts)

    @property
    def out_nbytes(self) -> int:
        return self.rows * sum(take for _, take in self.parts)


@dataclass
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # what is written
    src_dtype: str  # what the pieces hold
    pieces: list[Piece]
    tied_to: str | None = None
    #: (index of its first piece, Weave): pieces read as blocks and interleaved into rows;
    #: pieces outside every weave are copied as they are
    weaves: tuple[tuple[int, Weave], ...] = ()
    #: other copies of the same values, read after the tensor and compared with it, never
    #: written: a replicated tensor-parallel param's other tp ranks, a tied pipeline param's
    #: other stages (same element order; `replica` = their tp rank or stage, `axis` says which)
    mirrors: list[OutputTensor] = field(default_factory=list)
    replica: int | None = None
    axis: str = "tp"  # "tp" or "stage" (merge.DRIFT words each one's drift)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def src_nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def streamed(self) -> list[OutputTensor]:
        """What a stream reads for it, in order: itself, then its mirrors."""
        return [self, *self.mirrors] if self.mirrors else [self]


@dataclass
class MergePlan:
    tensors: list[OutputTensor]
    excluded: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)  # salvage: name -> why it was left out

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def read_bytes(self) -> int:
        return sum(m.src_nbytes for t in self.tensors for m in t.streamed())


def plan_merge(ckpt: Checkpoint, selection: Selection | None = None,
               salvage: bool = False, dtype: str = "float32") -> MergePlan:
    """What a merge writes. Raises `NotMergeable` when validation errors touch what it would
    write; with `salvage`, params that cannot be rebuilt are dropped (and listed) instead.
    `dtype` (float32, bfloat16, float16) is what float params and buffers are written as."""
    if ckpt.layout not in MERGEABLE_LAYOUTS:
        raise NotMergeable(f"{ckpt.path}: cannot merge this checkpoint: its layout is "
                           f"{ckpt.layout}",
                           _layout_hint(ckpt))
    selection = selection or Selection()
    excluded = selection.excluded(ckpt)
    blocking = blocking_errors(ckpt, excluded)
    distrusted = _distrusted_params(ckpt, blocking) if salvage else {}
    if not salvage:
        if blocking:
            lines = "\n".join(f"  - {shown(f.message, 300)}" for f in blocking[:8])
            more = f"\n  ... and {len(blocking) - 8} more" if len(blocking) > 8 else ""
            raise NotMergeable(
                f"{ckpt.path}: validation found {len(blocking)} error(s):\n{lines}{more}",
                "run `zinspect validate` for details; `--salvage` writes every param that is "
                "intact and lists the rest")
    plan = MergePlan([], excluded)
    for name, p in ckpt.params.items():
        if name in excluded:
            continue
        owner = ckpt.params.get(p.tied_to) if p.tied_to else p
        problem = (f"tied to missing {p.tied_to}" if owner is None else
                   param_problem(owner) or distrusted.get(name) or distrusted.get(owner.name))
        if problem:
            plan.dropped[name] = problem
            continue
        plan.tensors.append(param_tensor(ckpt, name, owner, p.tied_to, dtype))
    for name, b in ckpt.buffers.items():
        if name in excluded:
            continue
        if not b.intact:
            plan.dropped[name] = "its bytes are not in the model-states file"
            continue
        nbytes = b.numel * DTYPE_SIZES[b.dtype]
        plan.tensors.append(OutputTensor(name, b.shape, _out_dtype(b.dtype, dtype), b.dtype,
                                         [Piece(str(ckpt.path / b.file), b.offset, nbytes)]
                                         if nbytes else []))
    if not plan.tensors and not plan.dropped and plan.excluded:
        raise UsageError(f"{ckpt.path}: nothing to write: every param and buffer is excluded",
                         "exclude less (check the --exclude patterns and the selection file)")
    # never an output without params (e.g. model states that cannot be read), unless the
    # selection left every param out on purpose
    if not any(t.name in ckpt.params for t in plan.tensors) and \
            not (ckpt.params and set(ckpt.params) <= excluded):
        why = "; ".join(f.message for f in blocking[:3])
        raise NotMergeable(f"{ckpt.path}: there is no param that can be rebuilt (the output "
                           "would hold none)"
                           + (f" ({why})" if why else ""),
                           "run `zinspect validate` to see what is wrong")
    if plan.dropped and not salvage:
        lines = ", ".join(list(plan.dropped)[:5])
        raise NotMergeable(f"{ckpt.path}: {len(plan.dropped)} tensor(s) cannot be rebuilt: {lines}",
                           "`--salvage` writes the rest and lists what it left out")
    return plan


def blocking_errors(ckpt: Checkpoint, excluded: set[str]) -> list[Finding]:
    """Errors that make the merge of the selected tensors wrong: all of them except those
    about params the user left out."""
    return [f for f in ckpt.findings if f.severity == ERROR and
            not (f.param is not None and f.param in excluded)]


def _distrusted_params(ckpt: Checkpoint, blocking: list[Finding]) -> dict[str, str]:
    """--salvage: the params that errors make untrustworthy beyond what their own fragments
    show (name -> why): those an error names, those of a group whose ranks do not add up, and
    those with a fragment in a file from another run. Refuses when an error puts the whole
    layout in doubt (it names no param, file, rank or group)."""
    whole = [f for f in blocking if f.param is None and f.file is None and f.rank is None
             and f.group is None]
    if whole:
        raise NotMergeable(f"{ckpt.path}: --salvage cannot work around: "
                           + "; ".join(f.message for f in whole[:3]),
                           "run `zinspect validate` for details")
    out = {f.param: f.message for f in blocking if f.param is not None}
    for f in blocking:
        if f.code in GROUP_CODES:
            group = next((g for g in ckpt.groups if g.index == f.group), None)
            for name in group.params if group else ():
                out.setdefault(name, f.message)
    files = {f.file: f for f in blocking if f.param is None and f.file
             and f.code in UNTRUSTED_FILE_CODES}
    if files:
        for name, p in ckpt.params.items():
            bad = next((fr.file for fr in p.fragments if fr.file in files), None)
            if bad is not None:
                out.setdefault(name, f"{bad} is not this checkpoint's ({files[bad].code})")
    return out


def param_problem(p: Param, fragments: Sequence[Fragment] | None = None) -> str | None:
    """Why `p` cannot be rebuilt from its fragments (or from `fragments`, those of another
    optimizer state); None when it can."""
    from zinspect.core import shardplan

    fragments = p.fragments if fragments is None else fragments
    if p.numel == 0:
        return None
    if not fragments:
        return "no rank file holds it"
    if p.shards:
        return shardplan.problem(p, fragments)
    return first_problem(p.numel, list(fragments))


def param_tensor(ckpt: Checkpoint, name: str, p: Param, tied_to: str | None,
                 dtype: str = "float32", fragments: Sequence[Fragment] | None = None
                 ) -> OutputTensor:
    """The output tensor `name` of `p` (a problem-free param), from its fragments or from
    `fragments` (another optimizer state's)."""
    from zinspect.core import shardplan

    # an alias re-reads its owner's bytes, another state has its own: copies compared once
    compared = tied_to is None and fragments is None
    fragments = p.fragments if fragments is None else fragments
    frags = sorted((f for f in fragments if f.numel), key=lambda f: f.start)
    src = frags[0].dtype if frags else "float32"
    out = _out_dtype("float32" if src in UPCAST else src, dtype)
    if not p.shards:
        return OutputTensor(name, p.shape, out, src, _pieces(ckpt, frags), tied_to, mirrors=[
            OutputTensor(name, p.shape, src, src, _pieces(ckpt, c), replica=stage, axis="stage")
            for stage, c in sorted(p.copies.items()) if compared and
            all(f.dtype == src for f in c) and first_problem(p.numel, list(c)) is None])
    pieces, weaves, mirrors = shardplan.plan_pieces(p, functools.partial(_file_path, ckpt.path),
                                                    fragments)
    # an alias re-reads its owner's bytes: the replicas are compared once, for the owner
    return OutputTensor(name, p.shape, out, src, pieces, tied_to, weaves,
                        [] if tied_to else [OutputTensor(name, p.shape, src, src, m, replica=t)
                                            for t, m in mirrors.items()] +
                        [OutputTensor(name, p.shape, src, src, ps, replica=stage, axis="stage")
                         for stage, ps in (_sharded_copies(ckpt, p, src) if compared else ())])


def _sharded_copies(ckpt: Checkpoint, p: Param, src: str) -> list[tuple[int, list[Piece]]]:
    """A tied param's copies on other pipeline stages, when it is also split over tp ranks
    (pipeline_tp): each stage's shards in output order, compared like an unsplit param's
    copies; a copy that would need weaving (split after dim 0) is not compared."""
    from zinspect.core import shardplan

    out = []
    for stage, c in sorted(p.copies.items()):
        if all(f.dtype == src for f in c) and shardplan.problem(p, c) is None:
            pieces, weaves, _ = shardplan.plan_pieces(p, functools.partial(_file_path, ckpt.path), c)
            if not weaves:
                out.append((stage, pieces))
    return out


def _pieces(ckpt: Checkpoint, fragments: Sequence[Fragment]) -> list[Piece]:
    """The pieces of a flat tensor held by `fragments`, in element order."""
    return [Piece(_file_path(ckpt.path, f.file), f.offset, f.nbytes)
            for f in sorted(fragments, key=lambda f: f.start) if f.numel]


@functools.lru_cache(maxsize=1 << 16)
def _file_path(tag_dir: Path, file: str) -> str:
    """`str(tag_dir / file)`, joined once per file: a plan asks for it per fragment (2.4M of
    them for 132k frozen params over 8 ZeRO-3 ranks, 34 s of pathlib joins)."""
    return str(tag_dir / file)


def output_nbytes(ckpt: Checkpoint, excluded: set[str], dtype: str = "float32") -> int:
    """The bytes a merge at `dtype` writes for the params and buffers not `excluded`, without
    planning it (the app's preview): params are written from fp32 (masters, upcast 16-bit)."""
    params = sum(p.numel for n, p in ckpt.params.items() if n not in excluded)
    return params * DTYPE_SIZES[_out_dtype("float32", dtype)] + sum(
        b.numel * DTYPE_SIZES.get(_out_dtype(b.dtype, dtype), 4)
        for n, b in ckpt.buffers.items() if n not in excluded)


def _out_dtype(natural: str, dtype: str) -> str:
    """16-bit output turns fp32, bf16 and fp16 values into `dtype`; ints, bools and fp64 keep
    their dtype (and so does everything in an fp32 merge)."""
    return dtype if dtype != "float32" and natural in ("float32", *UPCAST) else natural


def _layout_hint(ckpt: Checkpoint) -> str:
    if ckpt.layout == "unknown":
        return "run `zinspect validate` to see what is wrong with the files"
    return "zinspect can show this layout but not merge it yet; DeepSpeed's ds_to_universal.py " \
        "handles tensor-parallel, pipeline and MoE checkpoints"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (Hugging Face's units: KB/MB/GB are powers of 10; KiB... of 2)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"bad size {text!r:.40}", "use a number with a unit, e.g. 500MB, 5GB, 2GiB")
    value = float(m[1]) * _UNITS[(m[2] or "B").upper()]
    if not math.isfinite(value) or value > 2**63:
        raise UsageError(f"bad size {text!r:.40}: too large", "e.g. 5GB")
    if value < 1:
        raise UsageError(f"bad size {text!r:.40}: must be at least 1 byte", "e.g. 5GB")
    return int(value)
