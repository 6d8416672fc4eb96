"""The layout interface: what a layout module is given (`LoadContext`) and what it provides
(`Layout`: a name, `recognise(ctx)` and `describe(ctx)`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from zinspect.core import codes
from zinspect.core.model import Checkpoint, RankFile
from zinspect.core.torchzip import TorchFile


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout. `recognise(ctx)` says from the files' names and headers whether
    the files are this layout (layouts are asked in registry order; the first yes wins);
    `describe(ctx)` fills `ctx.ckpt`: params, groups, fragments, topology, findings."""

    name: str  # Checkpoint.layout
    recognise: Callable[[LoadContext], bool]
    describe: Callable[[LoadContext], None]


@dataclass
class LoadContext:
    """A checkpoint being built: its files, their parsed pickles, and what the headers say.

    `headers.read_headers` fills the header facts before any layout is asked to recognise."""

    ckpt: Checkpoint
    parsed: dict[int, TorchFile]  # id(RankFile) -> its parsed TorchFile
    #: parse files not parsed at open (shallow ones): {id(RankFile): TorchFile} of those that
    #: could be read. Thread-safe; used by lazy fragment builders.
    parse: Callable[[list[RankFile]], dict[int, TorchFile]]

    # -- header facts (headers.read_headers) ----------------------------------------------
    #: dp rank -> optimizer file of the first slice (mp_rank 0 or none); duplicates reported
    optim: dict[int, RankFile] = field(default_factory=dict)
    optim_files: list[RankFile] = field(default_factory=list)  # every one of that slice
    model_files: list[RankFile] = field(default_factory=list)  # model states, mp_rank 0 / none
    model_file: RankFile | None = None  # the one names and shapes are read from
    model_state: dict | None = None  # its pickle
    ref_osd: dict | None = None  # optimizer_state_dict of the lowest readable optimizer file

    def torch_file(self, rf: RankFile | None) -> TorchFile | None:
        """The parsed file, or None (unreadable, not parsed yet, or dropped as not a
        checkpoint file)."""
        return None if rf is None else self.parsed.get(id(rf))

    def forget(self, rf: RankFile) -> None:
        """Drop a parsed file that turned out not to be what its name says."""
        self.parsed.pop(id(rf), None)

    def find(self, code: str, message: str, hint: str = "", **where) -> None:
        """Add a finding of a registered code (zinspect.core.codes)."""
        self.ckpt.findings.append(codes.finding(code, message, hint, **where))

    @property
    def kinds(self) -> set[str]:
        return {f.kind for f in self.ckpt.files}

    @property
    def mp_ranks(self) -> set[int]:
        return {f.mp_rank for f in self.ckpt.files
                if f.kind in ("optim", "model") and f.mp_rank is not None}
