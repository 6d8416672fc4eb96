"""The Ranks tab: a grid over the parallel axes (pp x tp x dp, ep beside dp) with, per cell, its
files, the elements its optimizer partitions hold, how many of its slice's flat groups it holds
a partition of (its coverage) and a status; then
the partition elements of each cell in each flat group.

Both tables draw only the rows on screen (Line API): 512 ranks, or 8 tp x 4 pp x 16 dp, stay
fast. Cells come from the topology's sizes, so a missing rank file is a row of its own.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from rich.style import Style
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Static

from zinspect.core import fmt
from zinspect.core.layouts.gaps import missing_coords
from zinspect.core.model import ERROR, INFO, Checkpoint, Finding, ParamGroup, RankFile
from zinspect.tui.inspection import Inspection
from zinspect.tui.widgets.findings_pane import VALIDATING
from zinspect.tui.widgets.overview import SEVERITY_STYLES
from zinspect.tui.widgets.virtual_table import Column, VirtualTable

#: groups shown as matrix columns; ZeRO-3 sub-groups can number thousands
MATRIX_MAX_GROUPS = 64
#: a grid larger than this (a forged world size of 10**7 in one pickle) lists the cells that
#: have files and the first missing ones only; real runs have far fewer ranks
MAX_GRID_CELLS = 1 << 16
#: the files a cell is made of (layer and expert files belong to no dp rank)
CELL_KINDS = ("optim", "model")
SLICE_AXES = ("tp", "pp", "ep")
UNIVERSAL = ("No ranks: a universal checkpoint keeps each param's fp32 master and optimizer "
             "states whole in zero/<param>/ (made from a run of {shape}); it resumes at any "
             "world size")


@dataclass
class Cell:
    """One rank of the grid: data-parallel rank `dp` of the (tp, pp) slice."""

    pp: int
    tp: int
    dp: int
    files: list[RankFile] = field(default_factory=list)
    held: int = 0  # elements of the optimizer partitions its file holds
    padding: int = 0
    groups: int = 0  # flat groups it holds a partition of
    slice_groups: int = 0  # flat groups partitioned over its slice (its dp group)
    by_group: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (held, pad)
    findings: list[Finding] = field(default_factory=list)

    @property
    def optim(self) -> RankFile | None:
        return next((f for f in self.files if f.kind == "optim"), None)

    @property
    def ep(self) -> int | None:
        return self.optim.coords.ep if self.optim is not None else None

    #: the layout saves an optimizer file per rank (ZeRO-0 keeps the state in the model file)
    per_rank: bool = True

    _status: str | None = None

    def status(self) -> str:
        """"ok" only when no finding names the cell's files or its rank: a missing optimizer
        file is a finding about the rank, not about a file that failed to read. Worked out
        once: a rank missing from a 300k-param ZeRO-3 run has 300k findings."""
        if self._status is None:
            found = [f for f in self.findings if f.severity != INFO]
            worst = next((f for f in found if f.severity == ERROR), found[0] if found else None)
            if worst is None:
                self._status = "missing" if self.optim is None and self.per_rank else \
                    "ok" if self.files or self.dp == 0 else "ok (a replica: not saved)"
            else:
                more = f" +{len(found) - 1}" if len(found) > 1 else ""
                self._status = f"{worst.severity}: {worst.code}{more}"
        return self._status


def grid_shape(ckpt: Checkpoint) -> tuple[int, int, int]:
    """(pp, tp, dp) of the grid: the topology's sizes, widened to every optimizer file found."""
    topo = ckpt.topology
    dp = max([topo.dp, *(f.coords.dp + 1 for f in ckpt.files if f.kind == "optim")])
    if topo.tp * topo.pp == 1:  # then the world is the data-parallel ranks (a missing last one too)
        dp = max(dp, ckpt.world_size or 0)
    return topo.pp, topo.tp, dp


def grid_cells(ckpt: Checkpoint) -> list[Cell]:
    """Every coordinate of pp x tp x dp (from the topology and the files found), its files, the
    partitions its optimizer file holds and the findings about it; in pp, tp, dp order. Past
    MAX_GRID_CELLS only the coordinates with files and the first missing ones."""
    topo = ckpt.topology
    optim = [f for f in ckpt.files if f.kind == "optim"]
    shape = grid_shape(ckpt)
    if shape[0] * shape[1] * shape[2] <= MAX_GRID_CELLS:
        keys = [(p, t, d) for p in range(shape[0]) for t in range(shape[1]) for d in range(shape[2])]
    else:
        have = {(f.coords.pp, f.coords.tp, f.coords.dp) for f in ckpt.files if f.kind in CELL_KINDS}
        keys = sorted(have | set(missing_coords(have, shape)[1]))
    cells = {key: Cell(*key) for key in keys}
    for f in ckpt.files:
        if f.kind in CELL_KINDS:
            key = (f.coords.pp, f.coords.tp, f.coords.dp)
            cells.setdefault(key, Cell(*key)).files.append(f)
    for cell in cells.values():
        cell.per_rank = bool(optim)
    _hold(ckpt, cells)
    by_file = {f.name: cell for cell in cells.values() for f in cell.files}
    present = {f.name for f in ckpt.files}
    single = topo.tp * topo.pp == 1
    by_dp: dict[int, list[Cell]] = defaultdict(list)  # 300k coverage findings x 512 cells
    for c in cells.values():
        if single or c.optim is None:
            by_dp[c.dp].append(c)
    for finding in ckpt.findings:
        cell = by_file.get(finding.file or "")
        if cell is not None:
            cell.findings.append(finding)
        elif finding.rank is not None and (finding.file is None or finding.file not in present):
            # a finding about a rank (its file is missing): the rank's cells without that file
            for c in by_dp.get(finding.rank, ()):
                c.findings.append(finding)
    return [cells[k] for k in sorted(cells)]


def _hold(ckpt: Checkpoint, cells: dict[tuple[int, int, int], Cell]) -> None:
    """What each cell's optimizer file holds: a group's partition r (of its slice's dp group,
    for MoE the expert-data-parallel group) is the r-th optimizer file of the slice, by dp.
    This mirrors the layouts' partition order for display only; coverage itself is core's."""
    slice_files: dict[tuple, list[RankFile]] = defaultdict(list)
    # ZeRO-0 keeps the optimizer state in the model states: those files hold the groups
    kind = "optim" if any(f.kind == "optim" for f in ckpt.files) else "model"
    optim = sorted((f for f in ckpt.files if f.kind == kind), key=lambda f: f.coords.dp)
    cell_of = {f.name: cell for cell in cells.values() for f in cell.files}
    for f in optim:
        slice_files[_slice(f.coords)].append(f)
    for g in ckpt.groups:
        files = _group_files(g, slice_files, optim)
        for r, numel in g.partition_numel.items():
            if r < len(files):
                cell = cell_of[files[r].name]
                pad = g.padding.get(r, 0)
                cell.held += numel
                cell.padding += pad
                cell.by_group[g.index] = (numel, pad)
                cell.groups += 1
        for f in files:
            cell_of[f.name].slice_groups += 1


def _slice(coords) -> tuple:
    return tuple(getattr(coords, a) for a in SLICE_AXES)


def _group_files(g: ParamGroup, slice_files: dict[tuple, list[RankFile]],
                 optim: list[RankFile]) -> list[RankFile]:
    """The optimizer files a group is partitioned over, in partition order: every file for a
    group of the layout's one slice (a dense group of an MoE run too), else its slice's (tp
    rank, pipeline stage, or expert-parallel rank for an expert group)."""
    if g.coords is None:
        return optim
    return slice_files.get(_slice(g.coords), [])


class RankGrid(VirtualTable):
    """One row per cell of the grid (a rank of a slice); enter or a click does nothing more
    than highlight: the Findings tab jumps here."""

    def __init__(self, ckpt: Checkpoint, cells: list[Cell], **kwargs) -> None:
        topo = ckpt.topology
        self.axes = [a for a in ("pp", "tp") if getattr(topo, a) > 1] + ["dp"] + \
            (["ep"] if topo.ep > 1 else [])
        self.cells = cells
        columns = [Column(a, max(2, len(str(max([getattr(c, a) or 0 for c in cells] + [0])))),
                          right=True) for a in self.axes]
        held = max([4, *(len(fmt.count(c.held)) for c in cells)])
        pad = max([4, *(len(fmt.count(c.padding)) for c in cells)])
        columns += [Column("files", 24, flex=True), Column("held", held, right=True),
                    Column("+pad", pad, right=True), Column("groups", 6, right=True, drop=1),
                    Column("status", max([6, *(len(c.status()) for c in cells[:2000])]))]
        super().__init__(columns, len(cells), **kwargs)
        self.flex_wants = 40

    def row_cells(self, index: int) -> list[str]:
        c = self.cells[index]
        files = " · ".join(f"{f.kind} {fmt.size(f.size)}" for f in c.files) or "—"
        groups = f"{c.groups}/{c.slice_groups}" if c.slice_groups else ""
        return [*(str(getattr(c, a)) if getattr(c, a) is not None else "" for a in self.axes),
                files, fmt.count(c.held), fmt.count(c.padding) if c.padding else "", groups,
                c.status()]

    def cell_style(self, index: int, column: int) -> Style | None:
        if column != len(self.columns) - 1:
            return None
        c = self.cells[index]
        status = c.status()
        if status == "ok":
            return Style(color="green")
        return Style.parse(SEVERITY_STYLES.get(status.split(":")[0], "bold red"))


class GroupMatrix(VirtualTable):
    """The partition elements of each cell in each flat group (+ padding)."""

    def __init__(self, grid: RankGrid, groups: list[int], **kwargs) -> None:
        self.grid, self.groups = grid, groups
        widths = [len(f"group {g}") for g in groups]
        for c in grid.cells:  # as wide as the widest value: 512 cells x 64 groups at most
            widths = [max(w, len(self._cell(c, g))) for w, g in zip(widths, groups, strict=True)]
        columns = [*grid.columns[:len(grid.axes)],
                   *(Column(f"group {g}", w, right=True) for g, w in zip(groups, widths, strict=True))]
        super().__init__(columns, len(grid.cells), **kwargs)

    @staticmethod
    def _cell(c: Cell, group: int) -> str:
        held = c.by_group.get(group)
        return "—" if held is None else fmt.count(held[0]) + (f" +{held[1]}" if held[1] else "")

    def row_cells(self, index: int) -> list[str]:
        c = self.grid.cells[index]
        return [*self.grid.row_cells(index)[:len(self.grid.axes)],
                *(self._cell(c, g) for g in self.groups)]


class RanksPane(Vertical):
    """The grid of ranks, then the ranks x groups matrix; "validating" until the findings are
    in (a cell's status is what they say about it; then it is composed again)."""

    def __init__(self, view: Inspection, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = view

    @property
    def ckpt(self) -> Checkpoint:
        return self.view.ckpt

    @property
    def cells(self) -> list[Cell]:
        """grid_cells(ckpt), made by the load worker (a pass over every finding)."""
        return self.view.rank_cells

    def compose(self) -> ComposeResult:
        if not self.view.validated:
            yield Static(VALIDATING, classes="section-title")
            return
        ckpt, topo = self.ckpt, self.ckpt.topology
        shape = " × ".join(f"{a} {getattr(topo, a)}" for a in ("pp", "tp", "dp", "ep")
                           if getattr(topo, a) > 1 or a == "dp")
        if ckpt.layout == "universal":  # no rank holds anything: a grid of empty cells said
            yield Static(UNIVERSAL.format(shape=shape), classes="section-title")  # "replica"
            return
        others = [f for f in ckpt.files if f.kind not in CELL_KINDS]
        note = f"; {len(others)} layer/expert files in the Overview" if others else ""
        size = math.prod(grid_shape(ckpt))
        listed = f"{len(self.cells)} cells" if len(self.cells) >= size else \
            f"{size:,} cells, of which the {len(self.cells)} with files or first missing are listed"
        yield Label(f"Ranks: {shape}, {listed}{note}", classes="section-title")
        grid = RankGrid(ckpt, self.cells, id="rank-table")
        yield grid
        indices = sorted({g.index for g in ckpt.groups})
        if not indices:  # nothing described (an unsupported layout): no empty matrix
            return
        note = f" (first {MATRIX_MAX_GROUPS} of {len(indices)})" if len(indices) > MATRIX_MAX_GROUPS else ""
        yield Label(f"Partition elements per rank × group, + padding{note}", classes="section-title")
        yield GroupMatrix(grid, indices[:MATRIX_MAX_GROUPS], id="rank-matrix")

    def show_rank(self, rank: int) -> None:
        """The first cell of data-parallel rank `rank` (a finding names the dp rank)."""
        if not self.query(RankGrid):  # a universal checkpoint
            return
        grid = self.query_one(RankGrid)
        index = next((i for i, c in enumerate(self.cells) if c.dp == rank), None)
        if index is not None:
            grid.cursor = index
        grid.focus()
