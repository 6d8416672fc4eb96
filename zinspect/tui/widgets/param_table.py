"""The flat parameter list: filtered and sorted names, drawn a screenful at a time."""

from __future__ import annotations

from rich.style import Style
from textual.binding import Binding

from zinspect.core import fmt
from zinspect.core.model import short_dtype
from zinspect.tui.inspection import Inspection
from zinspect.tui.messages import ExclusionToggled, ParamChosen
from zinspect.tui.rows import Rows
from zinspect.tui.widgets.virtual_table import Column, VirtualTable


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def param_columns(view: Inspection) -> list[Column]:
    """Columns as wide as the widest value this checkpoint has (from its distinct shapes and
    sizes, gathered by the load worker: a few even at 300k names), so that the name gets the
    rest; at 80 columns the group, dtype and size columns make way before a name is cut (then
    in its middle)."""
    d = view.distinct

    def widest(label: str, texts) -> int:
        return max([len(label), *map(len, texts)])

    return [
        Column("xFT!", 4),
        Column("name", 16, flex=True, middle=True),
        Column("shape", min(20, widest("shape", map(shape_text, d.shapes)))),
        Column("dtype", widest("dtype", {short_dtype(t) for t in d.dtypes}), drop=2),
        Column("numel", widest("numel", map(fmt.count, d.numels)), right=True),
        Column("size", widest("size", map(fmt.size, d.nbytes)), right=True, drop=3),
        Column("group", widest("group", map(str, d.groups)), right=True, drop=1),
    ]


STAT_LABELS = ("L2", "max|x|", "NaN/Inf")


def stat_columns(view: Inspection) -> list[Column]:
    """L2, max|x| and NaN/Inf, after the Statistics screen computed them (they make way at 80
    columns after group, dtype and size)."""
    if not view.stats:
        return []
    return [Column(label, width, right=True, drop=4 + i)
            for i, (label, width) in enumerate(zip(STAT_LABELS, view.stat_widths, strict=True))]


def stat_widths(stats) -> list[int]:
    """The statistics columns' widths: their widest cells (made by the statistics worker)."""
    widths = list(map(len, STAT_LABELS))
    for s in stats:
        widths = [max(w, len(c)) for w, c in zip(widths, stat_cells(s), strict=True)]
    return widths


def stat_cells(s) -> list[str]:
    def num(v: float) -> str:
        return "-" if v != v else f"{v:.4g}"
    return [num(s.l2), num(s.max_abs), f"{s.nan}/{s.inf}" if s.nan or s.inf else ""]


class ParamTable(VirtualTable):
    """One row per parameter (or buffer) name in `names`; marks: x excluded, F frozen,
    B buffer, T tied, ! findings. `group` is the optimizer's param group (not the ZeRO-3
    sub-group: the detail screen shows both)."""

    BINDINGS = [
        Binding("space", "toggle_exclude", "Exclude", id="exclude",
                tooltip="Exclude the param (or buffer) from the merge, or include it again"),
    ]

    def __init__(self, view: Inspection, **kwargs) -> None:
        super().__init__(param_columns(view) + stat_columns(view), **kwargs)
        self.view = view
        self.names: list[str] = []
        self.at: list[int] = []  # each name's place in view.names (its columns')

    def show_stats(self) -> None:
        """Add the statistics columns (or drop them after a reload)."""
        self.columns = param_columns(self.view) + stat_columns(self.view)
        self._resize()
        self.refresh()

    def set_rows(self, rows: Rows, longest: int) -> None:
        """Show `rows`; `longest`: the longest name's length (the caller knows it)."""
        self.names, self.at = rows
        self.flex_wants = longest
        self.set_row_count(len(self.names))

    def row_cells(self, index: int) -> list[str]:
        name, at = self.names[index], self.at[index]
        shape, dtype, numel, nbytes, group, tied_to = self.view.facts(at)
        cells = [
            self.view.marks(at),
            name,
            shape_text(shape),
            short_dtype(dtype),
            fmt.count(numel),
            fmt.size(nbytes),
            "" if group is None else str(group),
        ]
        if self.view.stats:  # a tied alias has its owner's values
            s = self.view.stats.get(name) or self.view.stats.get(tied_to or "")
            cells += stat_cells(s) if s is not None else ["", "", ""]
        return cells

    def row_style(self, index: int) -> Style:
        return Style(dim=True, strike=True) if self.names[index] in self.view.excluded else Style()

    def on_virtual_table_row_chosen(self, event: VirtualTable.RowChosen) -> None:
        event.stop()
        self.post_message(ParamChosen(self.names[event.index]))

    def action_toggle_exclude(self) -> None:
        if self.names:
            name = self.names[self.cursor]
            self.post_message(ExclusionToggled([name], name))
