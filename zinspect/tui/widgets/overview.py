"""The Overview tab: what the checkpoint is, how big, which files, how healthy."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from zinspect.core import fmt, peft
from zinspect.core.model import ERROR, INFO, WARNING, Checkpoint, short_dtype
from zinspect.report import totals
from zinspect.tui.inspection import Inspection, display_path

LAYOUT_NAMES = {"zero": "ZeRO optimizer", "bf16_optimizer": "BF16_Optimizer"}
SEVERITY_STYLES = {ERROR: "bold red", WARNING: "yellow", INFO: "blue"}


def _facts(title: str, rows: list[tuple[str, RenderableType]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.title = title
    table.title_justify = "left"
    table.title_style = "bold"
    table.add_column(style="dim", min_width=14)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def checkpoint_facts(ckpt: Checkpoint) -> Table:
    others = [t for t in ckpt.tags if t != ckpt.tag]
    tag = Text(ckpt.tag)
    if others:
        tag.append(f"   (also: {', '.join(others[:8])}{' …' if len(others) > 8 else ''})",
                   style="dim")
    return _facts("Checkpoint", [
        ("path", display_path(ckpt.path)),
        ("tag", tag),
        ("layout", f"ZeRO stage {'?' if ckpt.stage is None else ckpt.stage} · "
                   f"{LAYOUT_NAMES.get(ckpt.layout, ckpt.layout)}"),
        ("world size", str(ckpt.world_size) if ckpt.world_size is not None else "?"),
        ("dtypes", f"training {short_dtype(ckpt.dtype)} · master {short_dtype(ckpt.master_dtype)}"),
        ("DeepSpeed", ckpt.ds_version or "?"),
        *_peft_row(ckpt),
    ])


def _peft_row(ckpt: Checkpoint) -> list[tuple[str, RenderableType]]:
    """A PEFT run's adapter (type, rank, targets, trainable vs base), as `zinspect info` says it."""
    summary = peft.summary(ckpt)
    return [] if summary is None else [("PEFT", Text(peft.describe(summary)))]


def size_facts(view: Inspection) -> Table:
    t = totals(view.ckpt)
    out = view.output
    return _facts("Contents", [
        ("params", f"{fmt.count(t['params'])}: {fmt.count(t['trainable'])} trainable · "
                   f"{fmt.count(t['frozen'])} frozen · {fmt.count(t['tied'])} tied"),
        ("buffers", fmt.count(t["buffers"])),
        ("elements", f"{fmt.count(t['numel'])} ({fmt.short_count(t['numel'])})"),
        ("fp32 output", f"{fmt.size(out.nbytes + out.excluded_nbytes)}"),
        ("files", f"{t['files']}, {fmt.size(t['file_bytes'])} on disk"),
    ])


def findings_facts(ckpt: Checkpoint) -> Table:
    counts = ckpt.counts()
    line = Text()
    for severity, n in counts.items():
        plural = "s" if n != 1 and severity != INFO else ""  # "2 errors", "2 info"
        line.append(f"{n} {severity}{plural}",
                    style=SEVERITY_STYLES[severity] if n else "dim")
        line.append("   ")
    verdict = (Text("errors: a merge would be wrong; see the Findings tab", style="bold red")
               if counts[ERROR] else Text("consistent: every param is fully covered", style="green"))
    return _facts("Validation", [("findings", line), ("", verdict)])


#: the Overview lists at most this many files (those with problems first); the Ranks tab has all
MAX_FILES_SHOWN = 32


def files_table(ckpt: Checkpoint) -> Table:
    table = Table(title="Files", title_justify="left", title_style="bold", expand=False,
                  show_edge=False, header_style="bold dim", box=box.SIMPLE_HEAD)
    table.add_column("rank", justify="right")
    table.add_column("kind")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("status")
    files = sorted(ckpt.files, key=lambda f: (not (f.error or f.recovered), f.rank is None,
                                              f.rank or 0, f.kind, f.name))
    for f in files[:MAX_FILES_SHOWN]:
        status = (Text(f.error, style="red") if f.error
                  else Text("recovered", style="yellow") if f.recovered else Text("ok", style="green"))
        table.add_row("" if f.rank is None else str(f.rank), f.kind, f.name, fmt.size(f.size),
                      status)
    if len(files) > MAX_FILES_SHOWN:
        table.caption = (f"… and {len(files) - MAX_FILES_SHOWN} more files, all readable "
                         "(the Ranks tab lists every rank)")
        table.caption_justify = "left"
    return table


class Overview(VerticalScroll):
    """Facts about the checkpoint as a whole."""

    def __init__(self, view: Inspection, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = view

    def compose(self) -> ComposeResult:
        yield Static(id="overview-body")

    def on_mount(self) -> None:
        self.refresh_facts()

    def refresh_facts(self) -> None:
        ckpt = self.view.ckpt
        top = Table.grid(padding=(0, 4))
        top.add_row(checkpoint_facts(ckpt), Group(size_facts(self.view), Text(),
                                                  findings_facts(ckpt)))
        self.query_one("#overview-body", Static).update(Group(top, Text(), files_table(ckpt)))
