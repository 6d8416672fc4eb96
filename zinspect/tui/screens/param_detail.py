"""One parameter in full: its facts, a coverage bar and where each fragment lives.

A tied param (`lm_head.weight` tied to `model.embed_tokens.weight`) has no storage of its own:
DeepSpeed saves its owner once. Its screen says so and shows the owner's fragments, which are
what the merge writes under both names; `o` opens the owner.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Label, Static

from zinspect.core import fmt
from zinspect.core.model import Buffer, Checkpoint, Fragment, Param, short_dtype
from zinspect.tui.errors import Problem, WorkerOutcomes
from zinspect.tui.footer import KeyFooter
from zinspect.tui.inspection import Inspection
from zinspect.tui.keys import binding, key_of
from zinspect.tui.messages import ExclusionToggled
from zinspect.tui.text import literal
from zinspect.tui.widgets.coverage_bar import CoverageBar
from zinspect.tui.widgets.header import Header
from zinspect.tui.widgets.overview import SEVERITY_STYLES

READING = "reading the ranks' model states…"
DIM_WORDS = {0: "rows", 1: "columns"}


def placement(ckpt: Checkpoint, p: Param, fragments: list[Fragment] | None) -> list[tuple[str, Text]]:
    """Where a param lives in a parallel run: its tensor-parallel shards (which tp rank holds
    which rows or columns), the pipeline stage(s) and expert-parallel rank(s) of the files that
    hold its fragments. Nothing for a plain ZeRO run."""
    rows: list[tuple[str, Text]] = []
    if p.shards:
        text = Text()
        for tp, shard in sorted(p.shards.items()):
            text.append("\n" if tp != min(p.shards) else "")
            text.append(f"tp {tp}: ", style="bold")
            text.append(shard_text(p, shard))
        rows.append(("shards", text))
    topo = ckpt.topology
    if fragments and (topo.pp > 1 or topo.ep > 1):
        files = {f.name: f for f in ckpt.files}
        coords = [files[f.file].coords for f in fragments if f.file in files]
        text = Text()
        for axis, word in (("pp", "pipeline stage"), ("ep", "expert-parallel rank")):
            values = sorted({getattr(c, axis) for c in coords})
            if getattr(topo, axis) > 1 and values:
                text.append((" · " if text else "") + word + "s" * (len(values) > 1) + " "
                            + ", ".join(map(str, values)))
        experts = sorted({c.expert for c in coords if c.expert is not None})
        if experts:
            text.append(f" · expert{'s' * (len(experts) > 1)} {', '.join(map(str, experts))}")
        if text:
            rows.append(("held at", text))
    return rows


def shard_space(p: Param, fragments: list[Fragment]) -> tuple[int, list[Fragment]]:
    """The elements the fragments index, and the fragments placed in them: a tp-sharded param's
    fragments index its shards (`Fragment.shard`), laid end to end in tp order for the coverage
    bar (a replicated param's every copy counts); else the param's own elements."""
    if not p.shards:
        return p.numel, fragments
    starts, total = {}, 0
    for tp, shard in sorted(p.shards.items()):
        starts[tp] = total
        total += math.prod(shard.shape)
    return total, [replace(f, start=starts.get(f.shard, 0) + f.start) for f in fragments]


def shard_text(p: Param, shard) -> str:
    """`rows 8..16 of 16 (8×16)`, `columns 0..8 of 16`, or `whole (replicated)`."""
    if shard.replicated:
        return "the whole tensor (replicated: the merge writes tp 0's and compares the others)"
    parts = []
    for _, full in shard.maps:
        cut = [(d, o, n) for d, (o, n) in enumerate(zip(full.offsets, full.sizes, strict=True))
               if n != p.shape[d]]
        parts.append(", ".join(f"{DIM_WORDS.get(d, f'dim {d}')} {fmt.count(o)}..{fmt.count(o + n)}"
                               f" of {fmt.count(p.shape[d])}" for d, o, n in cut) or "all of it")
    shape = "×".join(map(str, shard.shape))
    return f"{'; '.join(parts)} ({shape} shard)"


class ParamDetailScreen(WorkerOutcomes, Screen):
    """Shown on enter in the tree or table, from the palette, or from a finding."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="back",
                tooltip="back to where this param was opened from"),
        Binding("space", "toggle_exclude", "Exclude", id="exclude-param",
                tooltip="exclude this param from the merge, or include it again"),
        Binding("o", "open_owner", "Owner", id="open-owner",
                tooltip="a tied param: open the param that owns its values"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.param_name = name
        self.fragments: list[Fragment] | None = []  # the holder's; None while read in a thread
        self.aliases: list[str] = []  # the params tied to this one

    @property
    def view(self) -> Inspection:
        """The app's current view, not the one this screen opened on: `v` replaces it and `d`
        updates its findings while the screen stays open."""
        return self.app.view  # type: ignore[attr-defined]

    @property
    def param(self) -> Param | None:
        return self.view.ckpt.params.get(self.param_name)

    @property
    def buffer(self) -> Buffer | None:
        """A buffer's name (running stats, a step counter): written as saved, no fragments."""
        return None if self.param is not None else self.view.ckpt.buffers.get(self.param_name)

    @property
    def owner(self) -> Param | None:
        """The param whose saved values this one shares, when it is tied and the owner exists."""
        p = self.param
        return self.view.ckpt.params.get(p.tied_to) if p is not None and p.tied_to else None

    @property
    def holder(self) -> Param | None:
        """Whose fragments hold the values: the owner for a tied param, else the param."""
        return self.owner or self.param

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="param-detail"):
            yield Static(id="param-facts")
            yield Label(classes="section-title", id="coverage-title")
            yield CoverageBar(id="coverage")
            yield Label(classes="section-title", id="fragments-title")
            yield DataTable(id="fragment-table", cursor_type="row", zebra_stripes=True)
        yield KeyFooter()

    def on_mount(self) -> None:
        self.title = fmt.shown(self.param_name, 120)
        self.query_one("#fragment-table", DataTable).add_columns(
            "rank", "file", "group", "elements", "offset", "length", "pad", "saved as", "bytes")
        self.show_param()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """`o` is offered only where there is an owner to open."""
        return self.owner is not None if action == "open_owner" else True

    def show_param(self) -> None:
        """Fill the screen from the app's current view (again after `v` re-read the checkpoint).
        Fragments that need the ranks' files read come from a thread; the rest at once."""
        self.refresh_bindings()
        buffer = self.buffer
        for part in ("#coverage-title", "#coverage", "#fragments-title", "#fragment-table"):
            self.query_one(part).display = buffer is None  # a buffer is one record, as saved
        owner, holder = self.owner, self.holder
        self.aliases = self.view.aliases.get(self.param_name, [])
        whose = Text("Coverage of its elements by rank")
        if holder is not None and holder.shards:  # the bar lays the shards end to end
            whose = Text(f"Coverage of its tp shards, tp 0 to {max(holder.shards)} end to end, "
                         "by data-parallel rank")
        if owner is not None:
            whose = Text.assemble("Coverage of its owner ", literal(owner.name, 120),
                                  " by rank (the same values)")
        self.query_one("#coverage-title", Label).update(whose)
        self.query_one("#fragments-title", Label).update(
            Text.assemble("Fragments of ", literal(owner.name, 120)) if owner else Text("Fragments"))
        if holder is None or not self.view.slow_fragments(holder.name):
            self.show_fragments([] if holder is None else list(holder.fragments))
            return
        self.fragments = None
        self.refresh_facts()
        self.query_one("#coverage", CoverageBar).show_note(READING)
        self.query_one("#fragment-table", DataTable).clear()
        self.read_fragments(holder)

    @work(thread=True, exclusive=True, exit_on_error=False, group="fragments",
          description=READING.rstrip("…"))
    def read_fragments(self, p: Param) -> list[Fragment]:
        return list(p.fragments)

    def worker_succeeded(self, group: str, result: Any) -> None:
        self.show_fragments(result)

    def worker_failed(self, group: str, problem: Problem) -> bool:
        """Shown where the bar would be: the rest of the screen stays usable."""
        note = f"{problem.title}: {problem.message}" + (f" (hint: {problem.hint})" if problem.hint else "")
        self.query_one("#coverage", CoverageBar).show_note(note)
        return True

    def show_fragments(self, fragments: list[Fragment]) -> None:
        self.fragments = fragments
        self.refresh_facts()
        holder = self.holder
        total, laid = (0, []) if holder is None else shard_space(holder, fragments)
        self.query_one("#coverage", CoverageBar).show(total, laid)
        table = self.query_one("#fragment-table", DataTable)
        table.clear()
        for f in fragments:
            table.add_row(
                str(f.rank), literal(f.file, 80), "" if f.group is None else str(f.group),
                f"{fmt.count(f.start)}..{fmt.count(f.start + f.numel)}",
                "missing" if f.offset is None else fmt.count(f.offset),
                fmt.size(f.nbytes), fmt.count(f.padding), f"{short_dtype(f.dtype)} {f.source}",
                Text("ok", style="green") if f.intact else Text("NOT IN FILE", style="bold red"),
            )

    def facts(self) -> Table | Text:
        view, name, fragments = self.view, self.param_name, self.fragments
        p = self.param
        if p is None and self.buffer is not None:
            return self.buffer_facts(self.buffer)
        if p is None:
            return Text.assemble(literal(name, 120),
                                 " is not in the checkpoint as re-read from disk", style="yellow")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", min_width=12)
        grid.add_column()
        grid.add_row("param", literal(name, 400, style="bold"))
        grid.add_row("shape", Text(f"{tuple(p.shape)} · {fmt.count(p.numel)} elements"))
        saved = "…" if fragments is None else short_dtype(fragments[0].dtype if fragments else None)
        grid.add_row("dtype", Text(f"{short_dtype(p.dtype)} in training · saved as {saved}"))
        grid.add_row("group", Text("—" if p.group is None else
                                   f"param group {p.group} · flat group {p.sub_group}"))
        for key, value in placement(view.ckpt, self.holder or p, fragments):
            grid.add_row(key, value)
        grid.add_row("kind", self.kind_text(p))
        excluded = name in view.excluded
        grid.add_row("merge", Text("excluded", style="red") if excluded else
                     Text(f"included, {fmt.size(view.sizes[name][1])} of fp32", style="green"))
        grid.add_row("coverage", self.coverage_text())
        self.add_findings(grid)
        return grid

    def add_findings(self, grid: Table) -> None:
        if not self.view.validated:  # the app refreshes this screen when they are in
            grid.add_row("findings", Text("validating the checkpoint …", style="dim"))
            return
        for f in self.view.ckpt.findings_for(self.param_name):
            grid.add_row(Text(f.severity, style=SEVERITY_STYLES[f.severity]),
                         Text.assemble(literal(f.message, 600),
                                       ("\nhint: " + fmt.shown(f.hint, 600)) if f.hint else ""))

    def buffer_facts(self, b: Buffer) -> Table:
        view, name = self.view, self.param_name
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", min_width=12)
        grid.add_column()
        grid.add_row("buffer", literal(name, 400, style="bold"))
        grid.add_row("shape", Text(f"{tuple(b.shape)} · {fmt.count(b.numel)} elements"))
        grid.add_row("dtype", Text(f"{short_dtype(b.dtype)}, written as saved"))
        grid.add_row("kind", Text("buffer: module state, not trained by the optimizer (saved "
                                  "once, in the model states)"))
        where = Text.assemble(literal(b.file or "?", 120), f" at byte {fmt.count(b.offset)}"
                              if b.offset is not None else "")
        if not b.intact:
            where.append("  NOT ALL IN THE FILE", style="bold red")
        grid.add_row("saved in", where)
        grid.add_row("merge", Text("excluded", style="red") if name in view.excluded else
                     Text(f"included, {fmt.size(view.sizes[name][1])}", style="green"))
        self.add_findings(grid)
        return grid

    def kind_text(self, p: Param) -> Text:
        text = Text("frozen" if p.frozen else "trainable")
        if self.aliases:
            text.append(", owner of the tied ")
            text.append_text(literal(", ".join(self.aliases[:5]), 300, style="bold"))
            text.append(" (the merge writes these values under each name)")
        if p.tied_to is None:
            return text
        text.append(", tied to ")
        text.append_text(literal(p.tied_to, 200, style="bold"))
        if self.owner is None:
            text.append(" (which is not in this checkpoint)", style="yellow")
            return text
        key = key_of(self.app, binding(ParamDetailScreen, "open-owner"))
        text.append(": saved once, as its owner; the merge writes the owner's values under "
                    f"this name too ({key}: open the owner)")
        return text

    def coverage_text(self) -> Text:
        fragments, holder = self.fragments, self.holder
        if fragments is None or holder is None:
            return Text("…")
        total, _ = shard_space(holder, [])
        what = f"elements of its {len(holder.shards)} tp shards" if holder.shards else "elements"
        text = Text(f"{fmt.count(sum(f.numel for f in fragments))} of {fmt.count(total)} "
                    f"{what} in {len(fragments)} fragment(s)")
        if holder is not self.param:
            text.append(" of the owner")
        return text

    def action_toggle_exclude(self) -> None:
        self.app.post_message(ExclusionToggled([self.param_name], self.param_name))

    def action_open_owner(self) -> None:
        """Over this screen, so that escape comes back to the tied param."""
        owner = self.owner
        if owner is not None:
            self.app.push_screen(ParamDetailScreen(owner.name))

    def refresh_facts(self) -> None:
        self.query_one("#param-facts", Static).update(self.facts())
