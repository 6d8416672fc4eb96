"""The Findings tab: validation results; enter jumps to the param or rank a finding names."""

from __future__ import annotations

from collections import Counter

from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from zinspect.core.model import Finding
from zinspect.tui.inspection import Inspection
from zinspect.tui.messages import FindingChosen
from zinspect.tui.text import counted, explained
from zinspect.tui.widgets.overview import SEVERITY_STYLES
from zinspect.tui.widgets.virtual_table import Column, VirtualTable

#: the "where" column fits the first this many findings, up to WHERE_MAX columns
WHERE_SAMPLE, WHERE_MAX = 1000, 48


KNOCK_ON_MARK = "↳ "


def finding_columns(findings: list[Finding]) -> list[Column]:
    """Columns as wide as their contents; the message gets whatever width is left."""
    codes = {KNOCK_ON_MARK + f.code if f.cause else f.code for f in findings}
    wheres = (len(f.where()) for f in findings[:WHERE_SAMPLE])
    return [
        Column("severity", 8),
        Column("code", max([4, *map(len, codes)])),
        Column("where", min(WHERE_MAX, max([5, *wheres]))),
        Column("message", 24, flex=True),
    ]


class FindingTable(VirtualTable):
    """One row per finding, drawn a screenful at a time: a ZeRO-3 checkpoint missing a rank
    has a coverage finding for every param, 300k of them for a large model."""

    def __init__(self, findings: list[Finding], **kwargs) -> None:
        super().__init__(finding_columns(findings), len(findings), **kwargs)
        self.findings = findings

    def row_cells(self, index: int) -> list[str]:
        f = self.findings[index]
        code = KNOCK_ON_MARK + f.code if f.cause else f.code
        return [f.severity, code, f.where(), f.message.replace("\n", " ")]

    def cell_style(self, index: int, column: int) -> Style | None:
        f = self.findings[index]
        if f.cause is not None:
            return Style(dim=True)
        if column == 0:
            return Style.parse(SEVERITY_STYLES[f.severity])
        return None

    def on_virtual_table_row_chosen(self, event: VirtualTable.RowChosen) -> None:
        event.stop()
        self.post_message(FindingChosen(self.findings[event.index]))


def findings_summary(findings: list[Finding]) -> Text:
    """How many findings of each code: with thousands of rows, what the list holds at a glance.
    Knock-ons are counted apart: one root cause is one finding."""
    roots = [f for f in findings if f.cause is None]
    counts = Counter((f.severity, f.code) for f in roots)
    text = Text(f"{counted(len(roots), 'finding')}: ", style="bold")
    for i, ((severity, code), n) in enumerate(counts.items()):
        text.append(" · " if i else "")
        text.append(f"{n:,} {code}", style=SEVERITY_STYLES[severity])
    if folded := len(findings) - len(roots):
        text.append(f" (+{counted(folded, 'knock-on')}, "
                    f"{KNOCK_ON_MARK.strip()} under their cause)", style="dim")
    return text


#: what the Findings and Ranks tabs say while the load worker validates
VALIDATING = "Validating the checkpoint …"


class FindingsPane(Vertical):
    """A count per code, the findings table and, below it, the full message and hint of the
    highlighted one; "validating" until the findings are in (then it is composed again)."""

    def __init__(self, view: Inspection, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = view

    @property
    def findings(self) -> list[Finding]:
        return self.view.folded  # ordered by the load worker

    def compose(self) -> ComposeResult:
        if not self.view.validated:
            yield Static(VALIDATING, id="finding-detail")
            return
        if self.findings:
            yield Static(findings_summary(self.findings), id="findings-summary")
        yield FindingTable(self.findings, id="findings-table")
        yield Static(self.detail(0) if self.findings else
                     "No findings: the checkpoint is consistent.", id="finding-detail")

    @on(VirtualTable.RowHighlighted, "#findings-table")
    def _highlighted(self, event: VirtualTable.RowHighlighted) -> None:
        self.show_detail(event.index)

    def show_detail(self, index: int) -> None:
        self.query_one("#finding-detail", Static).update(self.detail(index))

    def detail(self, index: int) -> Text:
        f = self.findings[index]
        text = Text()
        text.append(f"{f.severity} {f.code}: ", style=SEVERITY_STYLES[f.severity])
        explained(text, f.message, f"knock-on of {f.cause}" if f.cause else "", f.hint)
        if f.param or f.rank is not None:
            text.append("\nenter: show the " + ("param" if f.param else "rank"), style="dim")
        return text
