"""The Parameters tab: the module tree or the flat table, a `/` filter and the output summary."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import ContentSwitcher, Input, Static
from textual.worker import get_current_worker

from zinspect.core import fmt
from zinspect.core.tree import SORT_KEYS
from zinspect.tui.errors import WorkerOutcomes
from zinspect.tui.inspection import Inspection
from zinspect.tui.rows import Rows, narrows
from zinspect.tui.text import params_and_buffers
from zinspect.tui.widgets.param_table import ParamTable
from zinspect.tui.widgets.param_tree import ParamTree
from zinspect.tui.widgets.virtual_table import ROWS_AT_ONCE


class ParamsPane(WorkerOutcomes, Vertical):
    """Tree view by default; typing a filter shows the matching params as a flat table."""

    BINDINGS = [
        Binding("t", "toggle_view", "Tree/table", id="toggle-view",
                tooltip="Switch between the module tree and the flat table"),
        Binding("o", "cycle_sort", "Sort", id="sort", tooltip="Sort by model order, name, size, numel"),
        Binding("escape", "clear_filter", "Clear filter", show=False, id="clear-filter"),
    ]

    def __init__(self, view: Inspection, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = view
        self.sort = "model"
        self.table_chosen = False  # the user picked the table with `t` (not just a filter)
        self._entered_at: str | None = None  # the table's row when `t` showed it
        #: the (sort, filter) the table's rows answer; while a worker looks for newer ones
        #: the old rows stay and the summary says so
        self._shown: tuple[str, str] = ("model", "")

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter: words the name contains", id="param-filter")
        with ContentSwitcher(initial="param-tree", id="param-views"):
            yield ParamTree(self.view, id="param-tree")
            yield ParamTable(self.view, id="param-table")
            yield Static(id="param-empty")
        yield Static(id="output-summary")

    def on_mount(self) -> None:
        self.query_one(Input).display = False
        self.query_one(ParamTable).set_rows(self.view.orders.rows(self.sort), self.view.longest)
        self.refresh_marks()

    @property
    def filter_text(self) -> str:
        return self.query_one(Input).value.strip()

    @property
    def searching(self) -> bool:
        """A worker is finding the rows of the current sort and filter."""
        return self._shown != (self.sort, self.filter_text)

    def focus_filter(self) -> None:
        """Show the filter and focus it now, not after a refresh: the keys typed right behind
        `/` (read with it) went to the tree, whose space excluded a param."""
        box = self.query_one(Input)
        box.display = True
        self.screen.set_focus(box)

    @on(Input.Changed, "#param-filter")
    def _filter_changed(self) -> None:
        self._show_rows()

    @on(Input.Submitted, "#param-filter")
    def _filter_submitted(self) -> None:
        self.query_one(ParamTable).focus()

    def _show_rows(self) -> None:
        """The rows of the current sort and filter: at once when they are known or few to
        search, else from a thread worker (the old rows stay until it answers)."""
        sort, text, orders = self.sort, self.filter_text, self.view.orders
        table = self.query_one(ParamTable)
        among = Rows(table.names, table.at) \
            if self._shown[0] == sort and narrows(self._shown[1], text) else None
        if not text.split() and orders.has(sort):
            self._show(sort, text, orders.rows(sort), self.view.longest)
        elif len(among.names if among is not None else self.view.names) <= ROWS_AT_ONCE:
            rows = orders.rows(sort, text, among)
            self._show(sort, text, rows, self._longest(rows))
        else:
            self._update_status()  # "searching…"
            # the worker starts once the key is drawn: its passes in C held the interpreter
            # from the filter's echo; a search older than this key stops now
            self.workers.cancel_group(self, "filter")
            self.call_after_refresh(self._search, sort, text, among)

    def _search(self, sort: str, text: str, among: Rows | None) -> None:
        if self.is_attached and (sort, text) == (self.sort, self.filter_text):
            self._find_rows(sort, text, among)

    @work(thread=True, exclusive=True, exit_on_error=False, group="filter",
          description="filtering the parameter names")
    def _find_rows(self, sort: str, text: str, among: Rows | None
                   ) -> tuple[str, str, Rows, int] | None:
        worker = get_current_worker()
        rows = self.view.orders.rows(sort, text, among, lambda: worker.is_cancelled)
        if rows is None:
            return None
        return sort, text, rows, self._longest(rows)

    def _longest(self, rows: Rows) -> int:
        """The longest name's length (the table's name column wants it): known when all
        match (the first key's letter is often in every name)."""
        if len(rows.names) == len(self.view.names):
            return self.view.longest
        return max(map(len, rows.names), default=0)

    def worker_succeeded(self, group: str, result) -> None:
        if group == "filter" and result is not None:
            self._show(*result)

    def _show(self, sort: str, text: str, rows: Rows, longest: int) -> None:
        """Show the rows found for (sort, text), unless the user has moved on since."""
        if (sort, text) != (self.sort, self.filter_text):
            return  # a newer key's rows are on their way
        self._shown = (sort, text)
        table = self.query_one(ParamTable)
        table.set_rows(rows, longest)
        use_table = self.table_chosen or bool(text)
        current = "param-table" if use_table else "param-tree"
        if text and not table.row_count:
            # an empty table reads as "nothing loaded"; say what matched nothing
            self.query_one("#param-empty", Static).update(Text(
                f"No param name contains every word of “{text}”.\n"
                "Edit the filter, or press escape to clear it."))
            current = "param-empty"
        self.query_one(ContentSwitcher).current = current
        self._update_status()

    def action_clear_filter(self) -> None:
        box = self.query_one(Input)
        box.value = ""
        box.display = False
        self._show_rows()
        self.current_view().focus()

    def action_toggle_view(self) -> None:
        """Tree <-> table at the same param: the row under the cursor in one is the other's."""
        tree, table = self.query_one(ParamTree), self.query_one(ParamTable)
        self.table_chosen = self.query_one(ContentSwitcher).current == "param-tree"
        if self.table_chosen:
            node = tree.cursor_node
            at = node.data.path if node is not None and node.data is not None else None
            self._show_rows()
            if at in table.names:
                table.cursor = table.names.index(at)
            self._entered_at = table.names[table.cursor] if table.names else None
        else:
            at = table.names[table.cursor] if table.names else None
            self.query_one(Input).value = ""
            self.query_one(Input).display = False
            self._show_rows()
            if at is not None and at != self._entered_at:  # moved in the table: follow it
                tree.reveal(at)
        self.current_view().focus()

    def action_cycle_sort(self) -> None:
        self.sort = SORT_KEYS[(SORT_KEYS.index(self.sort) + 1) % len(SORT_KEYS)]
        self.query_one(ParamTree).set_sort(self.sort)
        self._show_rows()
        self.notify(f"sorted by {self.sort}", timeout=2)

    def current_view(self) -> ParamTree | ParamTable:
        if self.query_one(ContentSwitcher).current != "param-tree":
            return self.query_one(ParamTable)
        return self.query_one(ParamTree)

    def show_param(self, name: str) -> None:
        """Put the cursor on `name` in the tree (leaving any filter)."""
        self.table_chosen = False
        self.query_one(Input).value = ""
        self.query_one(Input).display = False
        self._show_rows()
        tree = self.query_one(ParamTree)
        tree.reveal(name)
        tree.focus()

    def refresh_marks(self) -> None:
        """Redraw exclusion marks and the summary after the selection changed."""
        self.query_one(ParamTree).refresh_labels()
        self.query_one(ParamTable).refresh()
        self._update_status()

    def _update_status(self) -> None:
        s = self.view.output
        shown = self.query_one(ParamTable).row_count
        total = len(self.view.names)  # params and buffers: the rows the table can show
        params = self.view.param_count
        if self.searching:
            rows = (f"searching {fmt.count(total)} names …" if self.filter_text
                    else f"sorting {fmt.count(total)} names …")
        elif self.filter_text:
            rows = f"{fmt.count(shown)} of {fmt.count(total)} match"
        else:
            rows = params_and_buffers(params, total - params)
        frozen = " · frozen excluded" if self.view.selection.exclude_frozen else ""
        self.query_one("#output-summary", Static).update(
            f"{rows} · sort: {self.sort}  │  output: {params_and_buffers(s.params, s.buffers)}, "
            f"{fmt.size(s.nbytes)} · excluded: "
            f"{fmt.count(s.excluded)} ({fmt.size(s.excluded_nbytes)}){frozen}")
