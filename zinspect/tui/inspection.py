"""What the app is looking at: a checkpoint, the user's selection, and views derived from them.

Plain Python (no Textual), so the widgets stay thin and the logic is testable on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from zinspect.core.fmt import shown
from zinspect.core.model import Buffer, Checkpoint, Param
from zinspect.core.selection import Selection
from zinspect.core.stats import TensorStats
from zinspect.core.torchzip import DTYPE_SIZES
from zinspect.core.tree import ModuleNode, _natural, build_tree, count_below

#: the merge writes fp32 values for every param
OUTPUT_ITEMSIZE = DTYPE_SIZES["float32"]


def display_path(path: Path | str) -> str:
    """A path as shown on screen: relative to the working dir when under it (stable in
    screenshots and snapshots), else as given; escaped (fmt.shown), so plain text only."""
    path = Path(path)
    try:
        return shown(str(path.resolve().relative_to(Path.cwd().resolve())) or ".")
    except ValueError:
        return shown(path)


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
        self.ckpt = ckpt
        self.selection = selection or Selection()
        #: (numel, output bytes) of every name the merge writes: params, then buffers (they are
        #: written too, so they are shown and can be excluded like params)
        self.sizes = {name: (p.numel, p.numel * OUTPUT_ITEMSIZE) for name, p in ckpt.params.items()}
        self.sizes.update((name, (b.numel, b.nbytes))
                          for name, b in ckpt.buffers.items() if name not in ckpt.params)
        self.buffers_below = count_below(n for n in ckpt.buffers if n not in ckpt.params)
        self.tree: ModuleNode = build_tree(self.sizes)
        #: per-param statistics, once the Statistics screen computed them (the table shows
        #: them as columns; a reload drops them: the values may have changed)
        self.stats: dict[str, TensorStats] = {}
        self.flagged: set[str] = set()
        self.flagged_below: dict[str, int] = {}
        self.update_findings()
        self._sorted: dict[str, list[str]] = {"model": list(self.sizes)}
        self.excluded: set[str] = set()
        self.excluded_below: dict[str, int] = {}
        self.output: OutputSummary
        self.update_exclusion()

    def update_findings(self) -> None:
        """Recompute which params the findings flag, after a deep check replaced some of them.
        Sizes, tree and sort orders stay: rebuilding them takes seconds at 300k params."""
        params = self.ckpt.params
        self.flagged = {f.param for f in self.ckpt.findings if f.param in params}
        self.flagged_below = count_below(self.flagged)

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
                sel.exclude.update(n for n, p in self.ckpt.params.items()
                                   if p.frozen and n not in chosen)
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
        ckpt = self.ckpt
        params = nbytes = excluded_nbytes = 0
        for name in ckpt.params:
            size = self.sizes[name][1]
            if name in self.excluded:
                excluded_nbytes += size
            else:
                params += 1
                nbytes += size
        buffers = 0
        for name, b in ckpt.buffers.items():
            size = b.nbytes
            if name in self.excluded:
                excluded_nbytes += size
            else:
                buffers += 1
                nbytes += size
        return OutputSummary(params, buffers, nbytes, len(self.excluded), excluded_nbytes)

    # -- the flat parameter list -----------------------------------------------------------
    def param_names(self, sort: str = "model", contains: str = "") -> list[str]:
        """Parameter (and buffer) names in `sort` order ("model", "name", "size", "numel"),
        keeping those that contain every space-separated word of `contains` (case-insensitive)."""
        names = self._sorted.get(sort)
        if names is None:
            names = self._sorted[sort] = self._sort(sort)
        words = contains.lower().split()
        if not words:
            return names
        return [n for n in names if all(w in n.lower() for w in words)]

    def _sort(self, key: str) -> list[str]:
        names = list(self.sizes)
        if key == "name":
            # natural, like the tree: blocks.2 before blocks.10
            return sorted(names, key=lambda n: [_natural(part) for part in n.split(".")])
        index = 0 if key == "numel" else 1
        return sorted(names, key=lambda n: -self.sizes[n][index])

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

    def marks(self, name: str) -> str:
        """One-letter marks: x excluded, F frozen (B a buffer), T tied, ! has findings."""
        p = self.ckpt.params.get(name)
        if p is None:
            return ("x" if name in self.excluded else " ") + "B  "
        return "".join((
            "x" if name in self.excluded else " ",
            "F" if p.frozen else " ",
            "T" if p.tied_to else " ",
            "!" if name in self.flagged else " ",
        ))


def default_output_dir(ckpt: Checkpoint) -> str:
    """`<checkpoint name>-<tag>-fp32` in the working dir."""
    base = (ckpt.root or ckpt.path.parent).name or "checkpoint"
    return os.path.join(".", f"{base}-{ckpt.tag}-fp32")
