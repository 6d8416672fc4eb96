"""One parameter in full: its facts, a coverage bar and where each fragment lives."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, Static
from textual.worker import Worker, WorkerState

from zinspect.core import fmt
from zinspect.core.model import Fragment, Param, short_dtype
from zinspect.tui.inspection import Inspection
from zinspect.tui.messages import ExclusionToggled
from zinspect.tui.widgets.coverage_bar import CoverageBar
from zinspect.tui.widgets.overview import SEVERITY_STYLES

READING = "reading the ranks' model states…"


class ParamDetailScreen(Screen):
    """Shown on enter in the tree or table, from the palette, or from a finding."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="back"),
        Binding("space", "toggle_exclude", "Exclude", id="exclude-param",
                tooltip="Exclude this param from the merge, or include it again"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.param_name = name
        self.fragments: list[Fragment] | None = []  # None while read in a thread

    @property
    def view(self) -> Inspection:
        """The app's current view, not the one this screen opened on: `v` replaces it and `d`
        updates its findings while the screen stays open."""
        return self.app.view  # type: ignore[attr-defined]

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with VerticalScroll(id="param-detail"):
            yield Static(id="param-facts")
            yield Label("Coverage of its elements by rank", classes="section-title")
            yield CoverageBar(id="coverage")
            yield Label("Fragments", classes="section-title")
            yield DataTable(id="fragment-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.title = self.param_name
        self.query_one("#fragment-table", DataTable).add_columns(
            "rank", "file", "group", "elements", "offset", "length", "pad", "saved as", "bytes")
        self.show_param()

    def show_param(self) -> None:
        """Fill the screen from the app's current view (again after `v` re-read the checkpoint).
        Fragments that need the ranks' files read come from a thread; the rest at once."""
        p = self.view.ckpt.params.get(self.param_name)
        if p is None or not self.view.slow_fragments(p.name):
            self.show_fragments([] if p is None else list(p.fragments))
            return
        self.fragments = None
        self.refresh_facts()
        self.query_one("#coverage", CoverageBar).show_note(READING)
        self.query_one("#fragment-table", DataTable).clear()
        self.read_fragments(p)

    @work(thread=True, exclusive=True, exit_on_error=False, group="fragments",
          description=READING)
    def read_fragments(self, p: Param) -> list[Fragment]:
        return list(p.fragments)

    @on(Worker.StateChanged)
    def fragments_read(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "fragments":
            return
        if event.state == WorkerState.SUCCESS:
            self.show_fragments(event.worker.result)
        elif event.state == WorkerState.ERROR:
            error = event.worker.error
            self.query_one("#coverage", CoverageBar).show_note(
                f"cannot read the ranks' model states: {type(error).__name__}: {error}")

    def show_fragments(self, fragments: list[Fragment]) -> None:
        self.fragments = fragments
        self.refresh_facts()
        p = self.view.ckpt.params.get(self.param_name)
        self.query_one("#coverage", CoverageBar).show(0 if p is None else p.numel, fragments)
        table = self.query_one("#fragment-table", DataTable)
        table.clear()
        for f in fragments:
            table.add_row(
                str(f.rank), f.file, "" if f.group is None else str(f.group),
                f"{fmt.count(f.start)}..{fmt.count(f.start + f.numel)}",
                "missing" if f.offset is None else fmt.count(f.offset),
                fmt.size(f.nbytes), fmt.count(f.padding), f"{short_dtype(f.dtype)} {f.source}",
                Text("ok", style="green") if f.intact else Text("NOT IN FILE", style="bold red"),
            )

    def facts(self) -> Table | Text:
        view, name, fragments = self.view, self.param_name, self.fragments
        p = view.ckpt.params.get(name)
        if p is None:
            return Text(f"{name} is not in the checkpoint as re-read from disk", style="yellow")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", min_width=12)
        grid.add_column()
        grid.add_row("param", Text(name, style="bold"))
        grid.add_row("shape", f"{tuple(p.shape)} · {fmt.count(p.numel)} elements")
        saved = "…" if fragments is None else short_dtype(fragments[0].dtype if fragments else None)
        grid.add_row("dtype", f"{short_dtype(p.dtype)} in training · saved as {saved}")
        grid.add_row("group", "—" if p.group is None else
                     f"param group {p.group} · flat group {p.sub_group}")
        state = ["frozen" if p.frozen else "trainable"]
        if p.tied_to:
            state.append(f"tied to {p.tied_to} (its values are {p.tied_to}'s)")
        grid.add_row("kind", ", ".join(state))
        excluded = name in view.excluded
        grid.add_row("merge", Text("excluded", style="red") if excluded else
                     Text(f"included, {fmt.size(view.sizes[name][1])} of fp32", style="green"))
        grid.add_row("coverage", "…" if fragments is None else
                     f"{fmt.count(sum(f.numel for f in fragments))} of {fmt.count(p.numel)} "
                     f"elements in {len(fragments)} fragment(s)")
        for f in view.ckpt.findings_for(name):
            grid.add_row(Text(f.severity, style=SEVERITY_STYLES[f.severity]),
                         f"{f.message}" + (f"\nhint: {f.hint}" if f.hint else ""))
        return grid

    def action_toggle_exclude(self) -> None:
        self.app.post_message(ExclusionToggled([self.param_name], self.param_name))

    def refresh_facts(self) -> None:
        self.query_one("#param-facts", Static).update(self.facts())
