"""The checkpoint model: plain dataclasses that the CLI, the app and the merge all read.

    Checkpoint -> RankFile (one per file in the tag dir, with its Coords)
               -> Topology (sizes per parallel axis; which files hold which coordinates)
               -> ParamGroup (optimizer flat group; a ZeRO-3 sub-group)
               -> Param -> Fragment (which file holds which element range at which byte offset)
                        -> Shard (tensor parallel: what one tp rank holds, as Box maps)
               -> Buffer
               -> Finding (validation results)

Optimizer states other than the fp32 masters (Adam's exp_avg / exp_avg_sq, SGD's momentum_buffer,
...) are not stored as fragments: `Checkpoint.state_fragments` derives them from the masters' (same
element ranges, at the same offsets in the state tensors of the same rank and group, or in the
param's own state tensor where the optimizer keeps one per param: ZeRO-0).

Everything here is metadata; no tensor bytes are ever held.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zinspect.core.fragments import Fragment, Fragments, TensorAt
from zinspect.core.torchzip import DTYPE_SIZES

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITIES = (ERROR, WARNING, INFO)

#: short names users know, for display
DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def short_dtype(dtype: str | None) -> str:
    return DTYPE_SHORT.get(dtype or "", dtype or "?")


#: the optimizer states a checkpoint may hold per trainable param ("fp32": the masters); Adam's
#: moments first, then whatever other per-param state the optimizer keeps under its own key
#: (SGD/Muon momentum_buffer, Adagrad sum, ...: any name STATE_NAME allows)
STATES = ("fp32", "exp_avg", "exp_avg_sq")
MOMENTS = STATES[1:]
#: a per-param state key the core records (it names output files: no path characters, and
#: neither the masters' name nor the merged weights' file stem)
STATE_NAME = re.compile(r"(?!(?:fp32|model)$)[A-Za-z_][A-Za-z0-9_]{0,63}")


def is_state_key(key) -> bool:
    """An optimizer's per-param state key the core records: a STATE_NAME, not the scalar `step`."""
    return isinstance(key, str) and key != "step" and STATE_NAME.fullmatch(key) is not None


@dataclass(frozen=True, slots=True)
class Coords:
    """Where a file sits in the parallel topology; an axis the layout does not have is 0.
    `layer` (pipeline layer files) and `expert` (MoE expert files) are None when not named."""

    dp: int = 0
    tp: int = 0
    pp: int = 0
    ep: int = 0
    layer: int | None = None
    expert: int | None = None


@dataclass
class Topology:
    """Sizes of the parallel axes (an absent axis is 1) and the files at each coordinate."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    files: list[RankFile] = field(default_factory=list, repr=False)

    AXES = ("dp", "tp", "pp", "ep")

    @property
    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in self.AXES}

    def files_at(self, dp: int | None = None, tp: int | None = None, pp: int | None = None,
                 ep: int | None = None, kind: str | None = None) -> list[RankFile]:
        """The files whose coordinates match every axis given (and `kind`, when given)."""
        want = {k: v for k, v in (("dp", dp), ("tp", tp), ("pp", pp), ("ep", ep)) if v is not None}
        return [f for f in self.files if (kind is None or f.kind == kind) and
                all(getattr(f.coords, k) == v for k, v in want.items())]


@dataclass(frozen=True, slots=True)
class Box:
    """An N-D box of a tensor: `sizes[d]` elements from `offsets[d]` on each dim (as torch DCP's
    ChunkStorageMetadata)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass
class Shard:
    """What tensor-parallel rank `tp` holds of a param: a tensor of `shape` whose boxes map onto
    the full tensor (shard box -> full box). `replicated`: every tp rank holds the whole param."""

    tp: int
    shape: tuple[int, ...]
    maps: list[tuple[Box, Box]] = field(default_factory=list)
    replicated: bool = False


@dataclass(slots=True)  # 300k of them in a ZeRO-3 model-states file
class Storage:
    """A tensor record inside a rank file."""

    key: str
    dtype: str
    numel: int
    nbytes: int
    present: int  # bytes of it actually inside the file
    offset: int | None  # byte offset of the record's data (None: not resolved or missing)


@dataclass
class RankFile:
    """One file of the tag dir, with what its name says and what its pickle holds."""

    path: Path
    kind: str  # "optim", "model", "expert", "expert_optim", "layer", "universal", "offload", "other"
    rank: int | None = None  # data-parallel rank parsed from the name
    mp_rank: int | None = None
    prefix: str = ""  # "bf16_" / "fp16_" / "" (optimizer files)
    size: int = 0
    format: str = ""  # "zip", "legacy", or "" when unreadable
    error: str | None = None  # why it could not be parsed
    error_hint: str | None = None  # what to do about it, when the reader knows better
    storages: list[Storage] = field(default_factory=list)
    stage: int | None = None
    partition_count: list[int] = field(default_factory=list)
    ds_version: str | None = None
    dp_world_size: int | None = None  # model-states files: what the engine recorded
    mp_world_size: int | None = None  # model-states files: tp * pp as the engine recorded it
    parallel_dims: tuple[int, int] | None = None  # model states: (pp, tp) degrees recorded
    step: float | int | None = None  # optimizer files: the optimizer's step count
    unknown_globals: list[str] = field(default_factory=list)
    recovered: bool = False  # zip central directory missing; read by walking local headers
    #: not unpickled when the checkpoint was opened (ZeRO-3 model states of ranks > 0): only
    #: checked whole (the zip end record; with frozen params, the pickle's CRC as well, as its
    #: frozen fragments are unpickled when first needed)
    shallow: bool = False
    coords: Coords = field(default_factory=Coords)  # from its name (see discover.classify)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def readable(self) -> bool:
        return self.error is None and bool(self.format)


def _lazy(slot: str, make: Callable[[], object], doc: str) -> property:
    """A property over `slot` whose container is made (`make()`) when first read: a Param
    does not carry empty containers it may never need."""
    def get(self):
        value = getattr(self, slot)
        if value is None:
            value = make()
            setattr(self, slot, value)
        return value
    return property(get, lambda self, value: setattr(self, slot, value), doc=doc)


class Param:
    """A tensor of the model by name: its shape, its (training) dtype as saved in the module
    state, and where its values are (`fragments`; `shards` when tensor-parallel; `copies` of
    a tied param on other pipeline stages).

    Lean, as a checkpoint may hold 300k of them: slotted, and its containers are made when
    first asked for (read or written), not with every param (a list and two dicts were 2/3 of
    its 350 bytes). Compares and prints as a dataclass would."""

    __slots__ = ("name", "shape", "dtype", "frozen", "group", "sub_group", "tied_to",
                 "_fragments", "_shards", "_copies")
    _FIELDS = ("name", "shape", "dtype", "frozen", "group", "sub_group", "tied_to", "fragments",
               "shards", "copies")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, frozen: bool = False,
                 group: int | None = None, sub_group: int | None = None,
                 tied_to: str | None = None, fragments: Sequence[Fragment] | None = None,
                 shards: dict[int, Shard] | None = None,
                 copies: dict[int, list[Fragment]] | None = None) -> None:
        self.name = name
        self.shape = shape
        self.dtype = dtype  # the model (training) dtype as saved in the module state
        self.frozen = frozen
        self.group = group  # optimizer param group
        self.sub_group = sub_group  # flat group index (== group at stage 1/2)
        self.tied_to = tied_to  # alias of this param: the name that owns the data
        self._fragments = fragments
        self._shards = shards
        self._copies = copies

    fragments: Sequence[Fragment] = _lazy(
        "_fragments", list, "Which file holds which element range (a list, or a lazy `Fragments`).")
    shards: dict[int, Shard] = _lazy("_shards", dict, "tp rank -> what it holds of the param; {}: "
                                     "not tp-split.")
    copies: dict[int, list[Fragment]] = _lazy(
        "_copies", dict, "Other pipeline stages' fp32 masters of a tied param (stage -> "
        "fragments, same ranges).")

    def _values(self) -> tuple:
        return (self.name, self.shape, self.dtype, self.frozen, self.group, self.sub_group,
                self.tied_to, [] if self._fragments is None else self._fragments,
                self._shards or {}, self._copies or {})

    def __eq__(self, other) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # mutable, as a dataclass with eq

    def __repr__(self) -> str:
        return f"Param({', '.join(f'{k}={v!r}' for k, v in zip(self._FIELDS, self._values(), strict=True))})"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def fragments_need_reads(self) -> bool:
        """Its fragments are not built yet and building them reads rank files (ZeRO-3 frozen
        params: every rank's model states, unparsed at open)."""
        return isinstance(self._fragments, Fragments) and self._fragments.pending_reads


@dataclass
class Buffer:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str | None = None
    offset: int | None = None
    intact: bool = True  # its bytes are all in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """What it takes in the file and in a merged output (a buffer keeps its dtype; one of
        unknown dtype, whose record is lost, takes nothing)."""
        return self.numel * DTYPE_SIZES.get(self.dtype, 0)


@dataclass
class ParamGroup:
    """A flat group: ZeRO-1/2 optimizer param group, or a ZeRO-3 sub-group."""

    index: int
    param_group: int  # optimizer param group it belongs to
    params: list[str]
    numel: int  # real elements of its params
    partition_numel: dict[int, int] = field(default_factory=dict)  # rank -> saved elements
    padding: dict[int, int] = field(default_factory=dict)  # rank -> padding elements
    dtype: str | None = None  # master dtype
    coords: Coords | None = None  # the slice (tp, pp, ep) whose files hold it; None: the only one


@dataclass
class Finding:
    severity: str
    code: str
    message: str
    hint: str = ""
    file: str | None = None
    rank: int | None = None
    group: int | None = None
    param: str | None = None
    #: a knock-on of another finding ("code: where" of its root cause; see core/rootcause.py)
    cause: str | None = None

    def where(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.rank is not None:
            parts.append(f"rank {self.rank}")
        if self.group is not None:
            parts.append(f"group {self.group}")
        if self.param:
            parts.append(self.param)
        return ", ".join(parts)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in
               ("severity", "code", "message", "hint", "file", "rank", "group", "param")}
        if self.cause is not None:
            out["cause"] = self.cause
        return out


@dataclass
class Checkpoint:
    path: Path  # the tag dir
    tag: str
    root: Path | None = None  # the dir holding `latest`, when there is one
    tags: list[str] = field(default_factory=list)  # every tag dir found beside this one
    stage: int | None = None
    world_size: int | None = None
    layout: str = "unknown"  # the describing layout's name (zinspect.core.layouts)
    features: list[str] = field(default_factory=list)  # "offload", "hpz", ... from ds_config
    dtype: str | None = None  # training dtype (bf16, fp16, fp32)
    master_dtype: str | None = None
    ds_version: str | None = None
    ds_config: object = None
    files: list[RankFile] = field(default_factory=list)
    groups: list[ParamGroup] = field(default_factory=list)
    params: dict[str, Param] = field(default_factory=dict)  # model order; aliases included
    buffers: dict[str, Buffer] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    topology: Topology = field(default_factory=Topology)
    #: (file, flat group, moment) -> that moment's flat tensor, for `state_fragments`
    moments: dict[tuple[str, int, str], TensorAt] = field(default_factory=dict, repr=False)
    #: (param, state, tp shard or None) -> that param's own state tensor, shaped like the param
    #: (or its tp shard): ZeRO-0 keeps torch's per-param optimizer state; for `state_fragments`
    param_states: dict[tuple[str, str, int | None], TensorAt] = field(default_factory=dict,
                                                                      repr=False)
    #: checks a layout leaves to validate because they read files not parsed at open (the
    #: frozen fragments of ZeRO-3 ranks > 0); each returns its findings
    later_checks: list[Callable[[], list[Finding]]] = field(default_factory=list, repr=False,
                                                             compare=False)

    @property
    def states(self) -> list[str]:
        """The optimizer states present: "fp32" (the masters) when there are flat groups, then
        each Adam moment that some file holds, then the other per-param states by name."""
        held = {key[2] for key in self.moments} | {key[1] for key in self.param_states}
        return (["fp32"] if self.groups or held else []) + [s for s in MOMENTS if s in held] + \
            sorted(held - set(MOMENTS))

    def state_fragments(self, param: str, state: str) -> list[Fragment]:
        """A param's fragments of `state` ("fp32", or one of `states`: "exp_avg", ...): the fp32
        masters' element ranges, at the same element offsets in that state's tensor of the same
        rank and group (or in the param's own state tensor, `param_states`). A tied alias
        answers for its owner; [] for a frozen param or a state the files do not hold (a rank
        file without it leaves that rank's range out)."""
        if not isinstance(state, str):
            raise ValueError(f"an optimizer state is named by a string, not {type(state).__name__}")
        p = self.params.get(param)
        if p is not None and p.tied_to:
            p = self.params.get(p.tied_to)
        if p is None or p.frozen:
            return []
        masters = [f for f in p.fragments if f.source == "master"]
        if state == "fp32":
            return masters
        out = []
        for f in masters:
            own = self.param_states.get((p.name, state, f.shard)) if self.param_states else None
            if own is not None:  # the param's own tensor: indexed by the param's elements
                out.append(own.fragment(f.group, f.start, f.start, f.numel, 0, state, f.shard))
                continue
            at = self.moments.get((f.file, f.group, state)) if f.group is not None else None
            if at is not None:
                out.append(at.fragment(f.group, f.group_offset, f.start, f.numel, f.padding,
                                       state, f.shard))
        return out

    # -- derived views -------------------------------------------------------------------
    def file(self, name: str) -> RankFile | None:
        return next((f for f in self.files if f.name == name), None)

    def files_of(self, kind: str) -> list[RankFile]:
        return [f for f in self.files if f.kind == kind]

    def owners(self) -> list[Param]:
        """Params that own data (tied aliases left out)."""
        return [p for p in self.params.values() if p.tied_to is None]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in SEVERITIES}
        for f in self.findings:
            out[f.severity] += 1
        return out

    def findings_for(self, param: str) -> list[Finding]:
        return [f for f in self.findings if f.param == param]
