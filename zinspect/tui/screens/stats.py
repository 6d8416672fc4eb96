"""`a`: statistics of the values, computed on demand in a thread worker (progress; escape
cancels), then a sortable per-param table and the L2 norm of each layer along depth as a
sparkline, so that a layer out of line stands out."""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Label, Sparkline
from textual.worker import get_current_worker

from zinspect.core.fmt import shown
from zinspect.core.model import Checkpoint
from zinspect.core.stats import TensorStats
from zinspect.core.stream import Progress, ShouldStop
from zinspect.tui.errors import Problem, WorkerOutcomes
from zinspect.tui.footer import KeyFooter
from zinspect.tui.widgets.header import Header
from zinspect.tui.widgets.virtual_table import ROWS_AT_ONCE, Column, VirtualTable
from zinspect.tui.widgets.work_progress import WorkProgressPanel, running_dialog

#: (column title, sort key of a TensorStats, its cell); the outlier columns (L2, max|x|, NaN,
#: Inf) right after the name: at 80 columns they are what shows
COLUMNS = [
    ("name", lambda s: s.name, lambda s: shown(s.name, 200)),
    ("L2", lambda s: s.l2, lambda s: _num(s.l2)),
    ("max|x|", lambda s: _key(s.max_abs), lambda s: _num(s.max_abs)),
    ("NaN", lambda s: s.nan, lambda s: f"{s.nan:,}"),
    ("Inf", lambda s: s.inf, lambda s: f"{s.inf:,}"),
    ("numel", lambda s: s.numel, lambda s: f"{s.numel:,}"),
    ("min", lambda s: _key(s.min), lambda s: _num(s.min)),
    ("max", lambda s: _key(s.max), lambda s: _num(s.max)),
    ("mean", lambda s: _key(s.mean), lambda s: _num(s.mean)),
    ("std", lambda s: _key(s.std), lambda s: _num(s.std)),
    ("zeros", lambda s: s.zero_fraction, lambda s: f"{s.zero_fraction:.1%}"),
]
L2_COLUMN = 1
#: narrow screens: these make way (first to last) before a name is cut
DROP = {"zeros": 1, "std": 2, "mean": 3, "min": 4, "max": 5, "numel": 6}
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")  # `encoder.blocks.3.`, a pipeline's leading `3.`


def _key(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def _num(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.4g}"


def layer_norms(stats: list[TensorStats]) -> list[tuple[int, float]]:
    """(layer index, L2 norm of all its params) in depth order: the layer is the first
    `.N.` in a name (`encoder.blocks.3.mlp.weight` -> 3), or its leading `N.` (a pipeline's
    `3.up.weight`)."""
    sums: dict[int, float] = {}
    for s in stats:
        m = _LAYER.search(s.name)
        if m:
            sums[int(m[1])] = sums.get(int(m[1]), 0.0) + s.sumsq
    return [(i, math.sqrt(v)) for i, v in sorted(sums.items())]


def from_zero(values: list[float]):
    """A Sparkline summary that draws its bars from zero. The widget scales bars from the
    data's min to its max, so two layers 1% apart were drawn empty and full: each bucket's
    max is mapped to where that scale puts value/max (the widget's extent is max-min or 1)."""
    lo, hi = min(values), max(values)
    return lambda bucket: lo + (max(bucket) / hi if hi else 0.0) * ((hi - lo) or 1)


@dataclass
class StatsShown:
    """What the screen shows of the statistics, made by the worker: the UI thread never walks
    300k tensors (their names' widths, layer sums, a sort)."""

    stats: list[TensorStats]
    rows: list[TensorStats]  # by L2, largest first
    layers: list[tuple[int, float]]
    bad: int  # NaN and Inf values
    longest: int  # the widest name as shown
    by_name: dict[str, TensorStats]
    widths: list[int]  # of the parameter table's statistics columns

    @classmethod
    def of(cls, stats: list[TensorStats]) -> StatsShown:
        from zinspect.tui.widgets.param_table import stat_widths

        return cls(stats, sorted_rows(stats, L2_COLUMN, True), layer_norms(stats),
                   sum(s.nan + s.inf for s in stats),
                   max((len(shown(s.name, 200)) for s in stats), default=0),
                   {s.name: s for s in stats}, stat_widths(stats))


def sorted_rows(stats: list[TensorStats], column: int, reverse: bool) -> list[TensorStats]:
    return sorted(stats, key=COLUMNS[column][1], reverse=reverse)


class StatsTable(VirtualTable):
    """One row per tensor, drawn a screenful at a time (a DataTable measuring 300k rows froze
    the app for seconds); a click on a header sorts by that column."""

    def __init__(self, shown_: StatsShown, **kwargs) -> None:
        widths = [max([len(title), *(len(cell(s)) for s in shown_.stats[:2000])])
                  for title, _, cell in COLUMNS[1:]]
        columns = [Column("name", 16, flex=True, middle=True),
                   *(Column(title, width, right=True, drop=DROP.get(title, 0)) for (title, _, _), width
                     in zip(COLUMNS[1:], widths, strict=True))]
        super().__init__(columns, **kwargs)
        self.rows: list[TensorStats] = []
        self.flex_wants = shown_.longest

    def set_rows(self, rows: list[TensorStats]) -> None:
        self.rows = rows
        self.set_row_count(len(rows))

    def row_cells(self, index: int) -> list[str]:
        s = self.rows[index]
        return [cell(s) for _, _, cell in COLUMNS]


class StatisticsScreen(WorkerOutcomes, Screen):
    BINDINGS = [Binding("escape", "back", "Back / cancel", id="stats-back",
                        tooltip="cancel while reading; then back to the checkpoint"),
                Binding("o", "sort_next", "Sort", id="stats-sort",
                        tooltip="sort by the next column (or click a column's header)")]

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.shown: StatsShown | None = None
        self.sort_column, self.reverse = L2_COLUMN, True  # largest first

    def compose(self) -> ComposeResult:
        yield Header()
        yield running_dialog("stats-running", "Statistics", "Reading the fp32 masters a merge "
                             "would write: min, max, mean, std, L2, zeros, NaN/Inf per param")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.run_stats(*self.query_one(WorkProgressPanel).start())

    @work(thread=True, exclusive=True, exit_on_error=False, group="stats",
          description="computing statistics of the values")
    def run_stats(self, progress: Progress, stop_requested: ShouldStop) -> StatsShown:
        from zinspect.core.plan import plan_merge
        from zinspect.core.stats import compute_stats

        worker = get_current_worker()
        return StatsShown.of(compute_stats(
            plan_merge(self.ckpt).tensors, progress=progress,
            should_stop=lambda: stop_requested() or worker.is_cancelled))

    @work(thread=True, exclusive=True, exit_on_error=False, group="stats-sort",
          description="sorting the statistics")
    def sort_rows(self, column: int, reverse: bool) -> tuple[int, bool, list[TensorStats]]:
        assert self.shown is not None
        return column, reverse, sorted_rows(self.shown.stats, column, reverse)

    async def worker_succeeded(self, group: str, result) -> None:
        if group == "stats-sort":
            self.show_rows(*result)
            return
        self.shown = result
        view = getattr(self.app, "view", None)
        if view is not None and view.ckpt is self.ckpt:  # the parameter table shows them too
            from zinspect.tui.widgets.param_table import ParamTable

            view.stats, view.stat_widths = result.by_name, result.widths
            for table in self.app.screen_stack[0].query(ParamTable):
                table.show_stats()
        await self.show_results()

    def worker_failed(self, group: str, problem: Problem) -> bool:
        if group == "stats":
            self.dismiss()
        return False  # the app's notification says why

    async def show_results(self) -> None:
        await self.query_one("#stats-running").remove()
        shown_ = self.shown
        assert shown_ is not None
        layers = shown_.layers
        box = Vertical(id="stats-results")
        await self.mount(box, before=self.query_one(KeyFooter))
        bad = shown_.bad
        await box.mount(Label(f"{len(shown_.stats)} tensors; " + (
            f"[b red]{bad:,} NaN/Inf values[/]" if bad else "no NaN or Inf"), id="stats-summary"))
        if len(layers) > 1:
            norms = [n for _, n in layers]
            median = statistics.median(norms)
            top = max(layers, key=lambda item: item[1])
            note = f"layer {top[0]}: {top[1] / median:.2f}x the median" if median else ""
            await box.mount(Label(f"L2 norm per layer, layers {layers[0][0]}..{layers[-1][0]} "
                                  f"(max {note})", id="stats-layers-label"),
                            Sparkline(norms, summary_function=from_zero(norms),
                                      id="stats-layers"))
        table = StatsTable(shown_, id="stats-table")
        await box.mount(table)
        self.show_rows(self.sort_column, self.reverse, shown_.rows)
        table.focus()

    def fill_table(self) -> None:
        """Sort by the chosen column: at once when the rows are few, else in a worker."""
        if self.shown is None:
            return
        if len(self.shown.stats) <= ROWS_AT_ONCE:
            self.show_rows(self.sort_column, self.reverse,
                           sorted_rows(self.shown.stats, self.sort_column, self.reverse))
        else:
            self.sort_rows(self.sort_column, self.reverse)

    def show_rows(self, column: int, reverse: bool, rows: list[TensorStats]) -> None:
        if (column, reverse) != (self.sort_column, self.reverse):
            return  # another sort was asked for since
        self.query_one("#stats-table", StatsTable).set_rows(rows)
        self.sub_title = f"sorted by {COLUMNS[column][0]}" + (" ↓" if reverse else " ↑")

    @on(VirtualTable.HeaderClicked, "#stats-table")
    def sort_by_header(self, event: VirtualTable.HeaderClicked) -> None:
        index = event.column
        self.reverse = not self.reverse if index == self.sort_column else index != 0
        self.sort_column = index
        self.fill_table()

    def action_sort_next(self) -> None:
        if self.shown is not None:
            self.sort_column = (self.sort_column + 1) % len(COLUMNS)
            self.reverse = self.sort_column != 0
            self.fill_table()

    def action_back(self) -> None:
        if self.shown is None:
            self.query_one(WorkProgressPanel).cancel()
        else:
            self.dismiss()
