"""`p`: the optimizer view. At the top what the optimizer is, its step, each param group's
hyper-parameters and the fp16 loss scale; below, per trainable param, the L2 norms of its fp32
master, exp_avg and sqrt(exp_avg_sq), Adam's update size |m| / (sqrt(v) + eps) (mean and max)
and max |x|, read on demand in a thread worker (progress; escape cancels), sorted so the params
whose update blew up come first. Enter opens a param's detail."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.events import Click
from textual.screen import Screen
from textual.widgets import Label, Static
from textual.worker import get_current_worker

from zinspect.core.fmt import shown
from zinspect.core.model import Checkpoint
from zinspect.core.optimizer import OptimizerState, read_optimizer, scaler_line, summary_line
from zinspect.core.optimizer_stats import OptimizerStats, ParamOptimStats
from zinspect.core.states import held_states
from zinspect.core.stream import Progress, ShouldStop
from zinspect.tui.errors import Problem, WorkerOutcomes
from zinspect.tui.footer import KeyFooter
from zinspect.tui.widgets.header import Header
from zinspect.tui.widgets.virtual_table import Column, VirtualTable
from zinspect.tui.widgets.work_progress import WorkProgressPanel, running_dialog

#: groups listed at the top; a MoE run has a few, a forged file thousands
SHOWN_GROUPS = 6
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum")
OUTLIER = Style(color="yellow", bold=True)
NONFINITE = Style(color="red", bold=True)


def _number(v: float | None) -> float:
    """A number to show and sort by; a moment that was not read is NaN (drawn "-")."""
    return math.nan if v is None else v


@dataclass(frozen=True)
class Col:
    column: Column
    value: Callable[[ParamOptimStats], object]  # what is shown and sorted by


COLS = [  # the update first; on a narrow terminal the later columns make way for the names
    Col(Column("name", 20, flex=True, middle=True), lambda r: r.name),
    Col(Column("upd max", 9, True), lambda r: _number(r.update_max)),
    Col(Column("upd mean", 9, True), lambda r: _number(r.update_mean)),
    Col(Column("L2 master", 9, True, drop=6), lambda r: r.master_l2),
    # Adam's m, or another optimizer's first per-param state (the head line names it)
    Col(Column("L2 m", 9, True, drop=5), lambda r: _number(
        r.exp_avg_l2 if not r.states else next(iter(r.states.values())))),
    Col(Column("L2 √v", 9, True, drop=4), lambda r: _number(r.sqrt_exp_avg_sq_l2)),
    Col(Column("max|x|", 9, True, drop=3), lambda r: r.master_max_abs),
    Col(Column("NaN/Inf", 7, True, drop=7), lambda r: r.nonfinite),
    Col(Column("numel", 9, True, drop=2), lambda r: r.numel),
    Col(Column("group", 5, True, drop=1), lambda r: -1 if r.group is None else r.group),
]


def column(label: str) -> int:
    return next(i for i, c in enumerate(COLS) if c.column.label == label)


NAME, UPDATE_MAX, MASTER_L2 = column("name"), column("upd max"), column("L2 master")
UPDATE_MEAN, SQRT_V = column("upd mean"), column("L2 √v")
NONFINITE_COL, GROUP = column("NaN/Inf"), column("group")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return shown(value, 200)


def _sort_key(value: object):
    return -math.inf if isinstance(value, float) and math.isnan(value) else value


class OptimizerTable(VirtualTable):
    """One row per param; a header click (or o) sorts, largest first for numbers."""

    def __init__(self, rows: list[ParamOptimStats], sort: int, **kwargs) -> None:
        super().__init__([c.column for c in COLS], len(rows), **kwargs)
        self.rows = rows
        self.flex_wants = max((len(shown(r.name, 200)) for r in rows[:2000]), default=0)
        updates = [r.update_max for r in rows if r.update_max is not None
                   and math.isfinite(r.update_max)]
        #: an update max this far above the median is marked: the params that blew up
        self.outlier = 10 * statistics.median(updates) if updates else math.inf
        # not Adam: no update size and no √v, so no columns of "-" taking a name's room
        self.hidden = {UPDATE_MAX, UPDATE_MEAN} if all(r.update_max is None for r in rows) \
            else set()
        if all(r.sqrt_exp_avg_sq_l2 is None for r in rows):
            self.hidden.add(SQRT_V)
        self._resize()
        self.sort_column, self.reverse = sort, sort != NAME
        self.sort_rows()

    def sort_rows(self) -> None:
        value = COLS[self.sort_column].value
        self.rows.sort(key=lambda r: _sort_key(value(r)), reverse=self.reverse)
        self.refresh()

    def sort_by(self, column: int) -> None:
        self.reverse = not self.reverse if column == self.sort_column else column != NAME
        self.sort_column = column
        self.sort_rows()
        self.cursor = 0

    def row_cells(self, index: int) -> list[str]:
        r = self.rows[index]
        return [_cell(c.value(r)) if not (i == GROUP and r.group is None) else "-"
                for i, c in enumerate(COLS)]

    def cell_style(self, index: int, column: int) -> Style | None:
        r = self.rows[index]
        if column == NONFINITE_COL and r.nonfinite:
            return NONFINITE
        if column == UPDATE_MAX and r.update_max is not None and r.update_max > self.outlier:
            return OUTLIER
        return None

    def on_click(self, event: Click) -> None:
        if event.y != 0:
            super().on_click(event)
            return
        x = event.x + self.scroll_offset.x
        for i, width in enumerate(self._widths()):
            if width is None:  # left out on a narrow terminal
                continue
            if x < width + 1:
                self.sort_by(i)
                self.screen.show_sorting()  # type: ignore[attr-defined]
                return
            x -= width + 1


def head_line(opt: OptimizerState) -> str:
    """`AdamW (ZeRO-3), step 2, clip_grad 1`: the groups follow on their own lines."""
    if not opt.groups:
        return summary_line(opt)
    facts = [f"{opt.name} ({opt.wrapper})"]
    facts += [f"step {_hyper(opt.step)}"] if opt.step is not None else []
    facts += [f"clip_grad {_hyper(opt.clip_grad)}"] if opt.clip_grad is not None else []
    return shown(", ".join(facts), 200)


def group_lines(opt: OptimizerState) -> list[str]:
    """`group 2 ep_size_2: lr 0.01, betas (0.9, 0.95), eps 1e-08, weight_decay 0.01` per param
    group: the group's name (what tells groups apart) first, where a narrow screen cuts last."""
    lines = []
    for i, g in enumerate(opt.groups[:SHOWN_GROUPS]):
        parts = [f"{k} {_hyper(g[k])}" for k in HYPER_KEYS if k in g]
        name = f" {_hyper(g['name'])}" if "name" in g else ""
        lines.append(shown(f"group {i}{name}: " + ", ".join(parts), 200))
    if len(opt.groups) > SHOWN_GROUPS:
        lines.append(f"… {len(opt.groups) - SHOWN_GROUPS} more groups (zinspect info --json)")
    return lines


def _hyper(v) -> str:
    if isinstance(v, list):
        return "(" + ", ".join(_hyper(x) for x in v) + ")"
    return f"{v:g}" if isinstance(v, float) else str(v)


class OptimizerScreen(WorkerOutcomes, Screen):
    BINDINGS = [Binding("escape", "back", "Back / cancel", id="optim-back",
                        tooltip="cancel while reading; then back to the checkpoint"),
                Binding("o", "sort_next", "Sort", id="optim-sort",
                        tooltip="sort by the next column (or click a column's header); "
                                "numbers largest first")]

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.result: OptimizerStats | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="optim-head"):
            yield Label("Reading the optimizer state …", id="optim-summary")
            yield Label(id="optim-note")
        yield running_dialog("optim-running", "Optimizer", "Reading each trainable param's fp32 "
                             "master, exp_avg and exp_avg_sq: norms and Adam's update size "
                             "|m|/(√v+ε)")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.title = "Optimizer"
        self.run_optimizer(*self.query_one(WorkProgressPanel).start())

    @work(thread=True, exclusive=True, exit_on_error=False, group="optimizer",
          description="reading the optimizer state")
    def run_optimizer(self, progress: Progress, stop_requested: ShouldStop) -> OptimizerStats:
        from zinspect.core.optimizer_stats import optimizer_stats

        worker = get_current_worker()
        opt = read_optimizer(self.ckpt)
        self.app.call_from_thread(self.show_head, opt)
        return optimizer_stats(self.ckpt, opt, progress=progress,
                               should_stop=lambda: stop_requested() or worker.is_cancelled)

    def show_head(self, opt: OptimizerState) -> None:
        """What the optimizer is, its groups and loss scale: shown before the values come."""
        lines = [head_line(opt)] + group_lines(opt)
        scale = scaler_line(opt)
        if scale is not None:
            lines.append(f"loss scale {scale}")
        own = held_states(self.ckpt)
        note = "" if opt.adam or not opt.state_keys else shown(
            f"{opt.name} keeps no Adam moments ({', '.join(opt.state_keys[:6])}): " + (
                f"'L2 m' is its {own[0]}, no update" if own else "the masters' norms only"), 300)
        for label in self.query("#optim-summary").results(Label):  # none once dismissed
            # one line per fact, cut at the screen's edge: a wrapped group ran into the next
            label.update(Text("\n".join(lines), no_wrap=True, overflow="ellipsis"))
        for label in self.query("#optim-note").results(Label):
            label.update(Text(note))
            label.display = bool(note)

    async def worker_succeeded(self, group: str, result: OptimizerStats) -> None:
        self.result = result
        await self.query_one("#optim-running").remove()
        params = self.result.params
        adam = any(r.update_max is not None for r in params)
        table = OptimizerTable(params, UPDATE_MAX if adam else MASTER_L2, id="optim-table")
        bad = sum(r.nonfinite for r in params)
        facts = [f"{len(params)} params", f"{bad:,} NaN/Inf values" if bad else "no NaN or Inf"]
        for what, names in (("left out", self.result.left_out),
                            ("without moments", self.result.masters_only)):
            if names:
                first = next(iter(names))
                facts.append(f"{len(names)} {what} ({shown(first, 60)}: {names[first]}"
                             + (", …)" if len(names) > 1 else ")"))
        await self.mount(Vertical(Label(Text("; ".join(facts)), id="optim-facts"), table,
                                  id="optim-results"), before=self.query_one(KeyFooter))
        self.show_sorting()
        table.focus()

    def worker_failed(self, group: str, problem: Problem) -> bool:
        if problem.severity != "error":  # cancelled: back, the notification says so
            self.dismiss()
            return False
        running = self.query("#optim-running")
        if running:
            running.first().remove_children()
            running.first().mount(Static(problem.text(), id="optim-error"))
        return True

    def show_sorting(self) -> None:
        table = self.query_one(OptimizerTable)
        self.sub_title = f"sorted by {COLS[table.sort_column].column.label}" + (
            " ↓" if table.reverse else " ↑")

    def action_sort_next(self) -> None:
        tables = self.query(OptimizerTable)
        if tables:
            table = tables.first()
            after = table.sort_column + 1  # the next column drawn
            table.sort_by(next(i % len(COLS) for i in range(after, after + len(COLS))
                               if i % len(COLS) not in table.hidden))
            self.show_sorting()

    @on(VirtualTable.RowChosen)
    def open_param(self, event: VirtualTable.RowChosen) -> None:
        from zinspect.tui.screens.param_detail import ParamDetailScreen

        self.app.push_screen(ParamDetailScreen(self.query_one(OptimizerTable).rows[event.index].name))

    def action_back(self) -> None:
        if self.result is None and self.query("#optim-running WorkProgressPanel"):
            self.query_one(WorkProgressPanel).cancel()
        else:
            self.dismiss()
