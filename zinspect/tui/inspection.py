"""What the app is looking at: a checkpoint, the user's selection, and views derived from them.

Plain Python (no Textual), so the widgets stay thin and the logic is testable on its own.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress, repeat
from math import prod
from operator import is_not, itemgetter
from pathlib import Path

from zinspect.core import gc_paused, peft
from zinspect.core.fmt import shown
from zinspect.core.model import ERROR, INFO, Buffer, Checkpoint, Finding, Param
from zinspect.core.params import column, dict_in_chunks
from zinspect.core.selection import Selection
from zinspect.core.stats import TensorStats
from zinspect.core.torchzip import DTYPE_SIZES
from zinspect.core.tree import ModuleNode, build_tree, count_below
from zinspect.report import totals
from zinspect.tui.rows import Orders

#: the merge writes fp32 values for every param
OUTPUT_ITEMSIZE = DTYPE_SIZES["float32"]
_NUMEL = itemgetter(0)


def param_columns(ckpt: Checkpoint, *fields: str) -> list[list]:
    """Each of `fields` of every param, in model order, from the model's columns (no Param is
    made for the usual ZeRO-3 names: `ckpt.params.values()` would make all 297k)."""
    return [column(ckpt.params, field) for field in fields]


def display_path(path: Path | str) -> str:
    """A path as shown on screen: relative to the working dir when under it (stable in
    screenshots and snapshots), else as given; escaped (fmt.shown), so plain text only."""
    path = Path(path)
    try:
        return shown(str(path.resolve().relative_to(Path.cwd().resolve())) or ".")
    except ValueError:
        return shown(path)


@dataclass
class Distinct:
    """The distinct values of the parameter table's columns (a few, even at 300k names)."""

    shapes: set[tuple[int, ...]]
    dtypes: set[str]
    numels: set[int]
    nbytes: set[int]
    groups: set[int]


@dataclass
class OutputSummary:
    """What a merge with the current selection writes."""

    params: int
    buffers: int
    nbytes: int
    excluded: int
    excluded_nbytes: int


class Inspection:
    """A loaded checkpoint plus the selection being edited and the sets the views mark."""

    def __init__(self, ckpt: Checkpoint, selection: Selection | None = None) -> None:
        """Built in the load worker before the tabs are first drawn: the passes over all names
        that drawing the lists needs (sizes, column widths), each in C (maps over the params,
        one size tuple per distinct shape); the tree's top once they are drawn, the look-ups
        by name after the findings (`prepare_lookups`), what the findings mark and the
        Overview's counts with `settle`, after validation."""
        self.ckpt = ckpt
        self.selection = selection or Selection()
        params, buffers = ckpt.params, ckpt.buffers
        columns = param_columns(ckpt, "shape", "dtype", "group", "tied_to", "frozen")
        shapes, dtypes, groups = columns[:3]
        #: the params' columns, by place in `names`: the table draws its rows from them (`facts`)
        self._shapes, self._dtypes, self._groups, self._tied, self._frozen = columns
        #: (numel, output bytes) per distinct shape (a few, even at 300k names): every param of
        #: a shape shares one tuple
        per_shape = {s: (prod(s), prod(s) * OUTPUT_ITEMSIZE) for s in set(shapes)}
        #: the buffers that are not params too, in `names` after the params
        self._own = {name: b for name, b in buffers.items() if name not in params}
        own = {name: (b.numel, b.nbytes) for name, b in self._own.items()}
        #: every name the merge writes, in model order: params, then buffers (they are written
        #: too, so they are shown and can be excluded like params); and their (numel, output
        #: bytes), in the same order
        self.names: list[str] = [*params, *own]
        self._size_list = [*map(per_shape.__getitem__, shapes), *own.values()]
        self._sizes: dict[str, tuple[int, int]] | None = None  # name -> size: `sizes`
        self._sizes_made = threading.Lock()
        self._numels = list(map(_NUMEL, self._size_list[:len(shapes)]))
        #: (`len(ckpt.params)` waits while a worker makes the ParamTable's index: not per key)
        self.param_count = len(shapes)
        self.buffers_below = count_below(own)
        self._tree: ModuleNode | None = None
        self._tree_made = threading.Lock()
        #: the distinct values of the table's columns, which size them
        kinds = {*per_shape.values(), *own.values()}
        self.distinct = Distinct(
            shapes=set(per_shape) | {b.shape for b in buffers.values()},
            dtypes=set(dtypes) | {b.dtype for b in buffers.values()},
            numels={numel for numel, _ in kinds},
            nbytes={size for _, size in kinds},
            groups=set(groups) - {None})
        #: owner -> the params tied to it (an alias names its owner in `tied_to`)
        self.aliases: dict[str, list[str]] = {}
        if self._tied.count(None) < len(self._tied):  # most tie none: a count, not a pass
            for name, owner in compress(zip(params, self._tied, strict=True),
                                        map(is_not, self._tied, repeat(None))):
                self.aliases.setdefault(owner, []).append(name)
        #: the longest name (the table's name column wants its width)
        self.longest = max(map(len, self.names), default=0)
        #: per-param statistics, once the Statistics screen computed them (the table shows
        #: them as columns; a reload drops them: the values may have changed)
        self.stats: dict[str, TensorStats] = {}
        self.stat_widths: list[int] = []  # of their columns in the parameter table
        #: whether `settle` has run and the UI thread has seen it (set there): until then the
        #: findings are being made and the views that show them say so
        self.validated = False
        self.totals: dict = {}
        self.peft: peft.PeftInfo | None = None
        self.flagged: set[str] = set()
        self.flagged_below: dict[str, int] = {}
        self.folded: list[Finding] = []
        self.file_findings: dict[str, list[Finding]] = {}
        self.missing_files: list[Finding] = []
        #: the Ranks tab's cells with their findings: set by whoever updates the findings
        #: (tui.widgets.ranks_pane.grid_cells; made with Textual's imports, so not here)
        self.rank_cells: list = []
        #: the flat table's rows in each sort order, and the filter
        self.orders = Orders(self.names, self._size_list)
        self._param_bytes = sum(self._numels) * OUTPUT_ITEMSIZE
        self._buffer_bytes = sum(b.nbytes for b in buffers.values())
        self.excluded: set[str] = set()
        self.excluded_below: dict[str, int] = {}
        self.output: OutputSummary
        self.update_exclusion()

    @property
    def sizes(self) -> dict[str, tuple[int, int]]:
        """name -> (numel, output bytes), for the excluded names' total and the detail: made
        after the findings (`prepare_lookups`) or when first asked for (0.1 s at 297k names:
        not before the tabs, and in chunks, so a key typed meanwhile is not kept waiting)."""
        if self._sizes is None:
            with self._sizes_made:
                if self._sizes is None:
                    self._sizes = dict_in_chunks(self.names, self._size_list)
        return self._sizes

    @property
    def tree(self) -> ModuleNode:
        """The module trie with its top level split off, made on first use: by the load worker
        once the tabs are drawn (a few passes over all names), or by the tree if the user opens
        the Parameters tab before that (then it waits for the worker's)."""
        if self._tree is None:
            with self._tree_made:
                if self._tree is None:
                    tree = build_tree(self.names, self._size_list)
                    tree.children  # noqa: B018 -- split the top level here too
                    self._tree = tree
        return self._tree

    def prepare_lookups(self, idle: Callable[[], bool]) -> None:
        """The look-ups by name (0.25 s at 297k names), here in a worker once `idle()` (no key
        is coming: the first filter keys came as it ran), not by the UI thread: the
        ParamTable's indexes (made by the first name asked of it), which a param's label in the
        tree or its detail needs (the flat table's rows need none: `facts`), then the sizes."""
        if idle():
            self.ckpt.params.get(next(iter(self.ckpt.params), None))
        if idle():
            self.sizes  # noqa: B018

    def settle(self) -> None:
        """After validation, in the load worker while the tabs are on screen: the Overview's
        counts (`zinspect info`'s rule), a PEFT run's adapter and what the findings mark."""
        self.totals = totals(self.ckpt, {"numel": self._numels, "frozen": self._frozen,
                                         "tied_to": self._tied})
        self.peft = peft.summary(self.ckpt)
        self.update_findings()

    def update_findings(self) -> None:
        """Recompute what the findings mark (flagged params, each file's findings, the
        Findings tab's order), after validation or a deep check replaced some of them. Sizes,
        tree and sort orders stay: rebuilding them takes seconds at 300k params."""
        ckpt = self.ckpt
        params = ckpt.params
        flagged = {f.param for f in ckpt.findings if f.param in params}
        self.flagged_below = count_below(flagged)
        self.flagged = flagged
        #: the findings in the Findings tab's order: each root cause, then its knock-ons
        self.folded = folded_order(ckpt.findings)
        #: per file name, the findings (not info) naming it, errors first: a file's status
        file_findings: dict[str, list[Finding]] = {}
        for f in sorted((x for x in ckpt.findings if x.file and x.severity != INFO),
                        key=lambda x: x.severity != ERROR):
            file_findings.setdefault(f.file, []).append(f)
        self.file_findings = file_findings
        #: findings that say a rank's file is missing (`missing-optimizer-file`, ...)
        present = {f.name for f in ckpt.files}
        self.missing_files = [x for x in ckpt.findings if x.code.startswith("missing-")
                              and x.code.endswith("-file") and x.file not in present]

    # -- exclusion -------------------------------------------------------------------------
    def update_exclusion(self) -> None:
        """Recompute what is excluded after the selection changed."""
        self.excluded = self.selection.excluded(self.ckpt)
        self.excluded_below = count_below(n for n in self.excluded if n in self.sizes)
        self.output = self._summarize()

    def toggle(self, names: list[str]) -> bool:
        """Exclude `names`, or include them again when all are excluded already.
        Returns True when they are all excluded afterwards (a glob loaded from a file can keep
        a name excluded)."""
        sel = self.selection
        if not all(n in self.excluded for n in names):
            sel.exclude.update(names)
        else:
            sel.exclude.difference_update(names)
            chosen = set(names)
            params = self.ckpt.params
            if sel.exclude_frozen and any(n in params and params[n].frozen for n in chosen):
                # keep the other frozen params out, as explicit names
                sel.exclude_frozen = False
                sel.exclude.update(n for n in compress(params, self._frozen) if n not in chosen)
        self.update_exclusion()
        return all(n in self.excluded for n in names)

    def toggle_frozen(self) -> bool:
        """Flip "exclude all frozen params". True: frozen params are now excluded."""
        self.selection.exclude_frozen = not self.selection.exclude_frozen
        self.update_exclusion()
        return self.selection.exclude_frozen

    def set_selection(self, selection: Selection) -> None:
        self.selection = selection
        self.update_exclusion()

    def is_buffer(self, name: str) -> bool:
        return name not in self.ckpt.params and name in self.ckpt.buffers

    def buffers_in(self, node: ModuleNode) -> int:
        return self.buffers_below.get(node.path, 0)

    def excluded_in(self, node: ModuleNode) -> int:
        return self.excluded_below.get(node.path, 0)

    def flagged_in(self, node: ModuleNode) -> int:
        return self.flagged_below.get(node.path, 0)

    def _summarize(self) -> OutputSummary:
        """Everything minus what is excluded: costs the exclusions, not the names."""
        params, buffers = self.ckpt.params, self.ckpt.buffers
        out_params = [n for n in self.excluded if n in params]
        out_buffers = [n for n in self.excluded if n in buffers]
        excluded_nbytes = (sum(self.sizes[n][1] for n in out_params)
                           + sum(buffers[n].nbytes for n in out_buffers))
        return OutputSummary(len(params) - len(out_params), len(buffers) - len(out_buffers),
                             self._param_bytes + self._buffer_bytes - excluded_nbytes,
                             len(self.excluded), excluded_nbytes)

    # -- the flat parameter table --------------------------------------------------------
    def facts(self, at: int) -> tuple[tuple[int, ...], str, int, int, int | None, str | None]:
        """Shape, dtype, numel, output bytes, group and tied owner of the name at `at` in
        `names`, from the columns read at the open (the table's rows: no look-up by name)."""
        numel, nbytes = self._size_list[at]
        if at < self.param_count:
            return (self._shapes[at], self._dtypes[at], numel, nbytes, self._groups[at],
                    self._tied[at])
        b = self._own[self.names[at]]
        return b.shape, b.dtype, numel, nbytes, None, None

    def marks(self, at: int) -> str:
        """The one-letter marks of the name at `at` in `names`: x excluded, F frozen (B a
        buffer), T tied, ! has findings."""
        name = self.names[at]
        if at >= self.param_count:
            return ("x" if name in self.excluded else " ") + "B  "
        return "".join((
            "x" if name in self.excluded else " ",
            "F" if self._frozen[at] else " ",
            "T" if self._tied[at] else " ",
            "!" if name in self.flagged else " ",
        ))

    def change_since(self, old: Inspection) -> str:
        """What `v` tells the user: re-reading the same files must not look like nothing happened."""
        def keys(view: Inspection) -> list[tuple[str, str]]:
            return sorted((f.code, f.where()) for f in view.ckpt.findings)
        before, after = keys(old), keys(self)
        if before == after and old.ckpt.params.keys() == self.ckpt.params.keys():
            return "validated again: no change"
        return (f"validated again: {len(after)} finding(s) (was {len(before)}), "
                f"{len(self.ckpt.params)} params (was {len(old.ckpt.params)})")

    def param(self, name: str) -> Param:
        return self.ckpt.params[name]

    def entry(self, name: str) -> Param | Buffer:
        """The param or, for a buffer's name, the buffer (both have a shape and a dtype)."""
        p = self.ckpt.params.get(name)
        return p if p is not None else self.ckpt.buffers[name]

    def slow_fragments(self, name: str) -> bool:
        """A ZeRO-3 frozen param's fragments live in every rank's model states, which the load
        leaves unparsed until the first such param is asked for: seconds at 512 ranks."""
        return self.ckpt.params[name].fragments_need_reads


def split_ahead(node: ModuleNode, least: int, idle: Callable[[], bool]) -> None:
    """Split off now (in a worker) the children of those of `node`'s children that hold more
    than `least` names, so that they open at once: each is a pass over the names below it
    (0.25 s for 33,000 layers). One at a time, each once `idle()` says that no key is coming
    (False: stop): a split beside the filter's keys took the interpreter from them. One level
    only: the next is split when the user opens one of these."""
    split = False
    try:
        for child in list(node.children.values()):
            if child.count > least:
                if not idle():
                    return
                with gc_paused():  # a full collection in the middle held the interpreter 0.1 s
                    child.children  # noqa: B018
                split = True
    finally:
        if split:  # their nodes, as the load's: the collector's full passes walked them (once:
            gc.freeze()  # a freeze also keeps the garbage not yet collected, until the end)


def folded_order(findings: list[Finding]) -> list[Finding]:
    """Each root cause followed by its knock-ons (core/rootcause.py marks them with `cause`):
    one root cause reads as one finding, its consequences folded under it."""
    under: dict[str, list[Finding]] = {}
    for f in findings:
        if f.cause is not None:
            under.setdefault(f.cause, []).append(f)
    out = []
    for f in findings:
        if f.cause is None:
            out.append(f)
            out += under.pop(f"{f.code}: {f.where()}", [])
    for rest in under.values():  # a cause that is not a finding itself: keep them all
        out += rest
    return out


def default_output_dir(ckpt: Checkpoint) -> str:
    """`<checkpoint name>-<tag>-fp32` in the working dir."""
    base = (ckpt.root or ckpt.path.parent).name or "checkpoint"
    return os.path.join(".", f"{base}-{ckpt.tag}-fp32")
