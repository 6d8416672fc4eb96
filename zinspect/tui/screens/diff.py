"""`c`: this checkpoint against another one (or its merged output, or a state dict), param by
param, streamed in a thread worker (progress; escape cancels): what changed, most first.

A is what a merge of this checkpoint writes (its fp32 masters); B is opened as `zinspect diff`
opens it (core/sources.py), and the engine is the CLI's (core/diff.py)."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Label
from textual.worker import get_current_worker

from zinspect.core.diff import DiffResult, ParamDiff, diff_tensors, unravel
from zinspect.core.fmt import shown
from zinspect.core.model import Checkpoint
from zinspect.core.stream import Progress, ShouldStop
from zinspect.errors import NotMergeable
from zinspect.tui.errors import Problem, WorkerOutcomes
from zinspect.tui.footer import KeyFooter
from zinspect.tui.inspection import display_path
from zinspect.tui.widgets.header import Header
from zinspect.tui.widgets.virtual_table import Column, VirtualTable
from zinspect.tui.widgets.work_progress import WorkProgressPanel, running_dialog

#: a row: (name, verdict, max |a-b|, rel L2, differing elements, first differing position)
Row = tuple[str, str, str, str, str, str]
CHANGED = Style(color="yellow")
MISSING = Style(color="red")


def verdict(p: ParamDiff) -> str:
    if not p.comparable:
        return f"shape {list(p.shape_a)} vs {list(p.shape_b)}"
    if p.dtype_a != p.dtype_b:
        return f"dtype {p.dtype_a} vs {p.dtype_b}"
    return "identical" if p.identical else "within" if p.within else "differs"


def diff_rows(result: DiffResult) -> list[Row]:
    """Names on one side only first, then the params as the engine sorts them (most changed
    first); every name escaped."""
    rows: list[Row] = [(shown(n, 120), "only here", "", "", "", "") for n in result.only_a]
    rows += [(shown(n, 120), "only in the other", "", "", "", "") for n in result.only_b]
    for p in result.params:
        numbers = p.comparable and not p.identical
        first = list(unravel(p.first_index, p.shape_b)) if p.first_index is not None else ""
        rows.append((shown(p.name, 120), verdict(p), f"{p.max_abs:.4g}" if numbers else "",
                     f"{p.rel_l2:.3g}" if numbers else "", f"{p.differing:,}" if numbers else "",
                     str(first)))
    return rows


class DiffTable(VirtualTable):
    #: at 80 columns the counts and positions make way before a name is cut (in its middle)
    COLUMNS = [Column("name", 16, flex=True, middle=True), Column("change", 12),
               Column("max|a-b|", 10, True), Column("rel L2", 9, True, drop=3),
               Column("differ", 9, True, drop=1), Column("first at", 12, drop=2)]

    def __init__(self, rows: list[Row], names: list[str], **kwargs) -> None:
        super().__init__(self.COLUMNS, len(rows), **kwargs)
        self.rows, self.names = rows, names
        self.flex_wants = max((len(r[0]) for r in rows), default=0)

    def row_cells(self, index: int) -> list[str]:
        return list(self.rows[index])

    def cell_style(self, index: int, column: int) -> Style | None:
        if column != 1:
            return None
        change = self.rows[index][1]
        return MISSING if change.startswith(("only", "shape", "dtype")) else \
            CHANGED if change == "differs" else None


class DiffScreen(WorkerOutcomes, Screen):
    BINDINGS = [Binding("escape", "back", "Back / cancel", id="diff-back",
                        tooltip="cancel while reading; then back to the checkpoint")]

    def __init__(self, ckpt: Checkpoint, other: str) -> None:
        super().__init__()
        self.ckpt, self.other = ckpt, other
        self.result: DiffResult | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield running_dialog("diff-running", "Compare", Text(
            f"This checkpoint's fp32 masters against {display_path(self.other)}, read once "
            "each, compared exactly"))
        yield KeyFooter()

    def on_mount(self) -> None:
        self.title = "Compare"
        self.sub_title = display_path(self.other)
        self.run_diff(*self.query_one(WorkProgressPanel).start())

    @work(thread=True, exclusive=True, exit_on_error=False, group="diff",
          description="comparing with the other checkpoint")
    def run_diff(self, progress: Progress, stop_requested: ShouldStop) -> DiffResult:
        from zinspect.core.plan import plan_merge
        from zinspect.core.sources import open_source

        worker = get_current_worker()
        try:
            other = open_source(self.other)
        except NotMergeable as e:  # its values cannot be rebuilt: nothing to compare with
            raise NotMergeable(f"{self.other}: {e.message}", "its Findings say why: open it "
                               "with `zinspect PATH`") from e
        return diff_tensors(plan_merge(self.ckpt).tensors, other.tensors, progress=progress,
                            should_stop=lambda: stop_requested() or worker.is_cancelled)

    async def worker_succeeded(self, group: str, result: DiffResult) -> None:
        self.result = result
        await self.query_one("#diff-running").remove()
        changed = sum(not (p.comparable and p.dtype_a == p.dtype_b and p.within)
                      for p in result.params)
        summary = Text(f"{len(result.params)} matched, {changed} changed, "
                       f"{len(result.only_a)} only here, {len(result.only_b)} only in the other: ")
        summary.append("EQUAL" if result.equal else "DIFFERENT",
                       style="bold green" if result.equal else "bold yellow")
        nonfinite = {f.param for f in result.findings()}
        if nonfinite:  # as stats and the deep check say it (nan-values / inf-values)
            summary.append(f" · NaN/Inf in {len(nonfinite)} param(s)", style="yellow")
        names = [*result.only_a, *result.only_b, *(p.name for p in result.params)]
        table = DiffTable(diff_rows(result), names, id="diff-table")
        await self.mount(Vertical(Label(summary, id="diff-summary"), table, id="diff-results"),
                         before=self.query_one(KeyFooter))
        table.focus()

    def worker_failed(self, group: str, problem: Problem) -> bool:
        self.dismiss()
        return False  # the app's notification says why

    @on(VirtualTable.RowChosen)
    def open_param(self, event: VirtualTable.RowChosen) -> None:
        """enter on a row: that param's detail, over this screen (escape comes back)."""
        from zinspect.tui.screens.param_detail import ParamDetailScreen

        name = self.query_one(DiffTable).names[event.index]
        if name in self.ckpt.params:
            self.app.push_screen(ParamDetailScreen(name))

    def action_back(self) -> None:
        if self.result is None:
            self.query_one(WorkProgressPanel).cancel()
        else:
            self.dismiss()
