"""A table that renders only the rows on screen (Line API): fast for hundreds of thousands."""

from __future__ import annotations

from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.events import Click
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from zinspect.tui.text import middle

#: up to this many rows a table's rows are filtered or sorted at once; beyond, a thread worker
#: finds them while keys keep coming (a newer key cancels it)
ROWS_AT_ONCE = 20_000


@dataclass
class Column:
    label: str
    width: int  # of a flex column: the least it gets
    right: bool = False  # right-aligned (numbers)
    flex: bool = False  # widened to the width the other columns leave (one per table)
    #: left out, lowest first, when the flex column would be narrower than its contents need
    #: (0: always shown)
    drop: int = 0
    #: cut in the middle, not at the end: dotted names and paths differ at their ends
    middle: bool = False

    def fit(self, text: str, width: int) -> str:
        if len(text) > width:
            return middle(text, width) if self.middle else text[: width - 1] + "…"
        return text.rjust(width) if self.right else text.ljust(width)


class VirtualTable(ScrollView, can_focus=True):
    """Rows are fetched by index from `row_cells`; only visible lines are ever formatted.

    Line 0 is the header and stays put; row i is drawn on line i + 1 - scroll offset."""

    COMPONENT_CLASSES = {"virtual-table--header", "virtual-table--cursor"}

    DEFAULT_CSS = """
    VirtualTable { height: 1fr; }
    VirtualTable > .virtual-table--header { text-style: bold; background: $panel; }
    VirtualTable > .virtual-table--cursor { background: $block-cursor-blurred-background; }
    VirtualTable:focus > .virtual-table--cursor {
        background: $block-cursor-background; color: $block-cursor-foreground;
    }
    """

    BINDINGS = [
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
        Binding("enter", "choose", "Open", show=False),
    ]

    cursor: reactive[int] = reactive(0, init=False)
    """Index of the highlighted row."""

    class TableMessage(Message):
        """A message about one table (its `control`, for `@on(..., "#id")`)."""

        def __init__(self, table: VirtualTable) -> None:
            super().__init__()
            self.table = table

        @property
        def control(self) -> VirtualTable:
            return self.table

    class RowHighlighted(TableMessage):
        def __init__(self, table: VirtualTable, index: int) -> None:
            super().__init__(table)
            self.index = index

    class RowChosen(RowHighlighted):
        """Enter or a click on a row."""

    class HeaderClicked(TableMessage):
        """A click on a column's header (e.g. to sort by it)."""

        def __init__(self, table: VirtualTable, column: int) -> None:
            super().__init__(table)
            self.column = column

    def __init__(self, columns: list[Column], row_count: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.columns = columns
        self.row_count = row_count
        #: how wide the flex column's contents are (its text is cut in the middle below that,
        #: and droppable columns make room first); the subclass sets it with its rows
        self.flex_wants = 0
        #: columns left out whatever the width (a subclass's columns that hold nothing here)
        self.hidden: set[int] = set()
        self._resize()

    # -- to override ----------------------------------------------------------------------
    def row_cells(self, index: int) -> list[str]:
        raise NotImplementedError

    def row_style(self, index: int) -> Style:
        return Style()

    def cell_style(self, index: int, column: int) -> Style | None:
        """A style over the row's for one cell (e.g. a severity's colour), or None."""
        return None

    # -- data -----------------------------------------------------------------------------
    def set_row_count(self, row_count: int, cursor: int = 0) -> None:
        self.row_count = row_count
        self._resize()
        self.set_reactive(VirtualTable.cursor, max(0, min(cursor, row_count - 1)))
        self._show_cursor()
        self.refresh()

    def _resize(self) -> None:
        """Scrolls sideways only when the columns that are always shown do not fit."""
        width = sum(c.width + 1 for i, c in enumerate(self.columns)
                    if not c.drop and i not in self.hidden)
        self.virtual_size = Size(width, self.row_count + 1)

    # -- drawing --------------------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        x = self.scroll_offset.x
        width = self.size.width
        if y == 0:
            style = self.get_component_rich_style("virtual-table--header")
            return self._strip([c.label for c in self.columns], style, x + width).crop(x, x + width)
        index = self.scroll_offset.y + y - 1
        if index >= self.row_count:
            return Strip.blank(width, self.rich_style)
        style = self.rich_style + self.row_style(index)
        if index == self.cursor:
            style += self.get_component_rich_style("virtual-table--cursor")
        strip = self._strip(self.row_cells(index), style, x + width, index)
        return strip.crop(x, x + width)

    def _widths(self) -> list[int | None]:
        """Column widths as drawn (None: left out). A flex column takes the room left beside
        the scrollbar; when that is less than its contents want, droppable columns give way
        (lowest `drop` first), so names get the width before sizes and dtypes do."""
        room = self.scrollable_content_region.width
        widths: list[int | None] = [None if i in self.hidden else c.width
                                    for i, c in enumerate(self.columns)]
        flex = next((i for i, c in enumerate(self.columns) if c.flex), None)

        def spare() -> int:
            return room - sum(w + 1 for w in widths if w is not None)

        if flex is not None:
            for i in sorted((i for i, c in enumerate(self.columns) if c.drop and widths[i]),
                            key=lambda i: self.columns[i].drop):
                if widths[flex] + spare() >= self.flex_wants:
                    break
                widths[i] = None
            widths[flex] += max(0, spare())
        return widths

    def _strip(self, cells: list[str], style: Style, width: int, index: int | None = None) -> Strip:
        """Cells fitted to their columns, one space apart, padded to `width`."""
        segments = []
        widths = self._widths()
        for i, (column, text) in enumerate(zip(self.columns, cells, strict=False)):
            if widths[i] is None:
                continue
            extra = None if index is None else self.cell_style(index, i)
            segments.append(Segment(column.fit(text, widths[i]) + " ",
                                    style + extra if extra else style))
        used = sum(len(s.text) for s in segments)
        if used < width:
            segments.append(Segment(" " * (width - used), style))
        return Strip(Segment.simplify(segments))

    # -- cursor ---------------------------------------------------------------------------
    def watch_cursor(self, index: int) -> None:
        self._show_cursor()
        self.refresh()
        self.post_message(self.RowHighlighted(self, index))

    def _show_cursor(self) -> None:
        page = max(1, self.size.height - 1)
        top = self.scroll_offset.y
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + page:
            self.scroll_to(y=self.cursor - page + 1, animate=False, immediate=True)

    def action_move(self, delta: int) -> None:
        if self.row_count:
            self.cursor = max(0, min(self.row_count - 1, self.cursor + delta))

    def action_page(self, direction: int) -> None:
        self.action_move(direction * max(1, self.size.height - 1))

    def action_jump(self, where: int) -> None:
        if self.row_count:
            self.cursor = 0 if where == 0 else self.row_count - 1

    def action_choose(self) -> None:
        if self.row_count:
            self.post_message(self.RowChosen(self, self.cursor))

    def on_click(self, event: Click) -> None:
        if event.y == 0:  # the header: which column's cells lie under the pointer
            x, start = self.scroll_offset.x + event.x, 0
            for i, width in enumerate(self._widths()):
                if width is not None:
                    if start <= x < start + width + 1:
                        self.post_message(self.HeaderClicked(self, i))
                        return
                    start += width + 1
            return
        index = self.scroll_offset.y + event.y - 1
        if event.y >= 1 and 0 <= index < self.row_count:
            self.cursor = index
            if event.chain > 1:
                self.post_message(self.RowChosen(self, index))
