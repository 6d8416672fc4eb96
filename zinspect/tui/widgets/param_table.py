"""The flat parameter list: filtered and sorted names, drawn a screenful at a time."""

from __future__ import annotations

from rich.style import Style
from textual.binding import Binding

from zinspect.core import fmt
from zinspect.core.model import short_dtype
from zinspect.tui.inspection import Inspection
from zinspect.tui.messages import ExclusionToggled, ParamChosen
from zinspect.tui.widgets.virtual_table import Column, VirtualTable

PARAM_COLUMNS = [
    Column("xFT!", 4),
    Column("name", 24, flex=True),
    Column("shape", 14),
    Column("dtype", 5),
    Column("numel", 12, right=True),
    Column("size", 10, right=True),
    Column("group", 5, right=True),
]


class ParamTable(VirtualTable):
    """One row per parameter name in `names`; marks: x excluded, F frozen, T tied, ! findings."""

    BINDINGS = [
        Binding("space", "toggle_exclude", "Exclude", id="exclude",
                tooltip="Exclude the param from the merge, or include it again"),
    ]

    def __init__(self, view: Inspection, **kwargs) -> None:
        super().__init__(PARAM_COLUMNS, **kwargs)
        self.view = view
        self.names: list[str] = []

    def set_names(self, names: list[str]) -> None:
        self.names = names
        self.set_row_count(len(names))

    def row_cells(self, index: int) -> list[str]:
        name = self.names[index]
        p = self.view.param(name)
        numel, nbytes = self.view.sizes[name]
        return [
            self.view.marks(name),
            name,
            "×".join(map(str, p.shape)) or "scalar",
            short_dtype(p.dtype),
            fmt.count(numel),
            fmt.size(nbytes),
            "" if p.sub_group is None else str(p.sub_group),
        ]

    def row_style(self, index: int) -> Style:
        return Style(dim=True, strike=True) if self.names[index] in self.view.excluded else Style()

    def on_virtual_table_row_chosen(self, event: VirtualTable.RowChosen) -> None:
        event.stop()
        self.post_message(ParamChosen(self.names[event.index]))

    def action_toggle_exclude(self) -> None:
        if self.names:
            name = self.names[self.cursor]
            self.post_message(ExclusionToggled([name], name))
