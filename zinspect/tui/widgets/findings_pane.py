"""The Findings tab: validation results; enter jumps to the param or rank a finding names."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from zinspect.core.model import Checkpoint, Finding
from zinspect.tui.messages import FindingChosen
from zinspect.tui.widgets.overview import SEVERITY_STYLES


class FindingsPane(Vertical):
    """The findings table and, below it, the full message and hint of the highlighted one."""

    def __init__(self, ckpt: Checkpoint, **kwargs) -> None:
        super().__init__(**kwargs)
        self.findings: list[Finding] = list(ckpt.findings)

    def compose(self) -> ComposeResult:
        yield DataTable(id="findings-table", cursor_type="row")
        yield Static(id="finding-detail")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("severity", "code", "where", "message")
        for i, f in enumerate(self.findings):
            table.add_row(Text(f.severity, style=SEVERITY_STYLES[f.severity]), f.code,
                          f.where(), f.message, key=str(i))
        if not self.findings:
            self.query_one("#finding-detail", Static).update("No findings: the checkpoint is consistent.")

    @on(DataTable.RowHighlighted, "#findings-table")
    def _show_detail(self, event: DataTable.RowHighlighted) -> None:
        f = self.findings[event.cursor_row]
        text = Text()
        text.append(f"{f.severity} {f.code}: ", style=SEVERITY_STYLES[f.severity])
        text.append(f.message)
        if f.hint:
            text.append("\nhint: ", style="bold")
            text.append(f.hint)
        if f.param or f.rank is not None:
            text.append("\nenter: show the " + ("param" if f.param else "rank"), style="dim")
        self.query_one("#finding-detail", Static).update(text)

    @on(DataTable.RowSelected, "#findings-table")
    def _jump(self, event: DataTable.RowSelected) -> None:
        self.post_message(FindingChosen(self.findings[event.cursor_row]))
