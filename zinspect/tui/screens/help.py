"""`?`: what every key does."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = [
    ("Anywhere", [
        ("1 2 3 4", "Overview, Parameters, Ranks, Findings tabs"),
        ("?", "this help"),
        ("ctrl+p", "command palette: go to a param, exclude frozen, merge, validate, …"),
        ("ctrl+g", "go to a param by name"),
        ("m", "merge (fp32, bf16 or fp16; safetensors, torch or a PEFT adapter), with the current exclusions"),
        ("v", "validate again: re-read the checkpoint from disk"),
        ("d", "deep check: read every byte (zip CRCs, NaN/Inf per param); escape cancels"),
        ("a", "statistics per param and the L2 norm per layer, read in a worker; escape cancels"),
        ("f", "exclude all frozen params (again: include them)"),
        ("s / l", "save / load the selection file (`zinspect merge --selection FILE`)"),
        ("q", "quit"),
    ]),
    ("Parameters", [
        ("/", "filter by the words a name contains, as you type (escape clears)"),
        ("space", "exclude the param or the whole module under the cursor (again: include)"),
        ("enter", "expand a module, or open a param's fragments"),
        ("t", "module tree or flat table"),
        ("o", "sort: model order, name, size, numel"),
        ("marks", "x excluded · F frozen · T tied · ! has findings"),
    ]),
    ("Findings", [("enter", "jump to the param or rank the finding names")]),
    ("Merge", [("escape", "cancel a running merge (nothing is left on disk)")]),
]


def keys_table() -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", min_width=10)
    table.add_column()
    for section, rows in KEYS:
        table.add_row(f"[u]{section}[/u]", "")
        for key, what in rows:
            table.add_row(key, what)
        table.add_row("", "")
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,question_mark,q", "dismiss", "Close", id="close-help"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help", classes="dialog") as box:
            box.border_title = "zinspect keys"
            box.border_subtitle = "escape, ? or q closes"
            yield Static(keys_table())
