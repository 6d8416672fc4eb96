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
from zinspect.core.fmt import shown
from zinspect.core.model import ERROR, INFO, WARNING, Checkpoint, Finding, RankFile, short_dtype
from zinspect.tui.inspection import Inspection, display_path
from zinspect.tui.text import Squeezed

LAYOUT_NAMES = {"zero": "ZeRO optimizer", "bf16_optimizer": "BF16_Optimizer",
                "pipeline": "pipeline parallel", "tensor_parallel": "tensor parallel",
                "moe": "mixture of experts", "zero0": "ZeRO-0 (no partitioning)",
                "tensor_parallel_zero0": "tensor parallel, ZeRO-0",
                "pipeline_tp": "pipeline × tensor parallel", "universal": "universal checkpoint"}
FEATURE_NAMES = {"offload": "CPU offload", "hpz": "ZeRO++ hpZ"}


def topology_text(ckpt: Checkpoint) -> Text:
    """pp x tp x dp x ep, the axes of size 1 dimmed: where the world size comes from."""
    text = Text()
    for i, axis in enumerate(("pp", "tp", "dp", "ep")):
        n = getattr(ckpt.topology, axis)
        text.append(" × " if i else "", style="dim")
        text.append(f"{axis} {n}", style="" if n > 1 else "dim")
    return text
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


def checkpoint_facts(view: Inspection) -> Table:
    ckpt = view.ckpt
    others = [t for t in ckpt.tags if t != ckpt.tag]
    tag = Text(ckpt.tag)
    if others:
        tag.append(f"   (also: {', '.join(others[:8])}{' …' if len(others) > 8 else ''})",
                   style="dim")
    return _facts("Checkpoint", [
        ("path", Squeezed(display_path(ckpt.path), 400)),
        ("tag", tag),
        ("layout", f"ZeRO stage {'?' if ckpt.stage is None else ckpt.stage} · "
                   f"{LAYOUT_NAMES.get(ckpt.layout, ckpt.layout)}"),
        ("world size", str(ckpt.world_size) if ckpt.world_size is not None else "?"),
        ("topology", topology_text(ckpt)),
        *([("features", Text(", ".join(FEATURE_NAMES.get(f, f) for f in ckpt.features)))]
          if ckpt.features else []),
        ("dtypes", f"training {short_dtype(ckpt.dtype)} · master {short_dtype(ckpt.master_dtype)}"),
        ("DeepSpeed", ckpt.ds_version or "?"),
        *_peft_row(view),
    ])


def _peft_row(view: Inspection) -> list[tuple[str, RenderableType]]:
    """A PEFT run's adapter (type, rank, targets, trainable vs base), as `zinspect info` says it."""
    return [] if view.peft is None else [("PEFT", Text(peft.describe(view.peft)))]


#: a value the load worker is still working out (it validates once the tabs are drawn)
PENDING = Text("…", style="dim")


def size_facts(view: Inspection) -> Table:
    t = view.totals
    out = view.output
    if not t:  # counted after validation, with it
        return _facts("Contents", [
            ("params", f"{fmt.count(len(view.ckpt.params))}: counting …"),
            ("buffers", fmt.count(len(view.ckpt.buffers))),
            ("elements", PENDING),
            ("fp32 output", f"{fmt.size(out.nbytes + out.excluded_nbytes)}"),
            ("files", f"{len(view.ckpt.files)}, "
                      f"{fmt.size(sum(f.size for f in view.ckpt.files))} on disk"),
        ])
    return _facts("Contents", [
        ("params", f"{fmt.count(t['params'])}: {fmt.count(t['trainable'])} trainable · "
                   f"{fmt.count(t['frozen'])} frozen · {fmt.count(t['tied'])} tied"),
        ("buffers", fmt.count(t["buffers"])),
        ("elements", f"{fmt.count(t['numel'])} ({fmt.short_count(t['numel'])})"),
        ("fp32 output", f"{fmt.size(out.nbytes + out.excluded_nbytes)}"),
        ("files", f"{t['files']}, {fmt.size(t['file_bytes'])} on disk"),
    ])


def findings_facts(view: Inspection) -> Table:
    if not view.validated:
        return _facts("Validation", [("findings", Text("validating …", style="dim"))])
    counts = view.ckpt.counts()
    line = Text()
    for severity, n in counts.items():
        plural = "s" if n != 1 and severity != INFO else ""  # "2 errors", "2 info"
        line.append(f"{n} {severity}{plural}",
                    style=SEVERITY_STYLES[severity] if n else "dim")
        line.append("   ")
    verdict = (Text("errors: a merge would be wrong; see the Findings tab", style="bold red")
               if counts[ERROR] else Text("consistent: every param is fully covered", style="green"))
    return _facts("Validation", [("findings", line), ("", verdict)])


#: below this many columns the facts stack (one above the other)
WIDE = 100

#: the Overview lists at most this many files (those with problems first); the Ranks tab has all
MAX_FILES_SHOWN = 32


def files_table(view: Inspection) -> Table:
    """Every file with a status that says what the findings say about it (an unsafe pickle is
    not "ok" because it parsed), and a row for each file a finding says is missing."""
    ckpt = view.ckpt
    table = Table(title="Files", title_justify="left", title_style="bold", expand=False,
                  show_edge=False, header_style="bold dim", box=box.SIMPLE_HEAD)
    axes = [a for a in ("pp", "tp", "ep") if getattr(ckpt.topology, a) > 1]
    parallel = bool(axes) or any(f.coords.layer is not None or f.coords.expert is not None
                                 for f in ckpt.files)
    table.add_column("rank", justify="right")
    if parallel:
        table.add_column("at")  # where the file sits on the other axes
    table.add_column("kind")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("status")
    rows = [(file_status(f, view.file_findings.get(f.name, []), view.validated), f)
            for f in ckpt.files]
    rows += [(Text(f"missing: {f.code}", style="bold red"), f) for f in view.missing_files]
    rows.sort(key=lambda r: (r[0].plain == "ok", r[1].rank is None, r[1].rank or 0, _kind(r[1]),
                             getattr(r[1], "name", "")))
    for status, f in rows[:MAX_FILES_SHOWN]:
        rank = "" if f.rank is None else str(f.rank)
        at = [] if not parallel else [""] if isinstance(f, Finding) else [coords_text(f, axes)]
        if isinstance(f, Finding):  # a missing file: the finding names its rank and kind
            name = Squeezed(f.file, 200, style="red") if f.file else Text("—", style="dim")
            table.add_row(rank, *at, _kind(f), name, "—", status)
        else:
            table.add_row(rank, *at, f.kind, Squeezed(f.name, 200), fmt.size(f.size), status)
    if len(rows) > MAX_FILES_SHOWN:
        table.caption = (f"… and {len(rows) - MAX_FILES_SHOWN} more files, all ok "
                         "(the Ranks tab lists every rank)")
        table.caption_justify = "left"
    return table


def coords_text(f: RankFile, axes: list[str]) -> str:
    """`pp 1 tp 0`, `pp 1 layer 3`, `ep 1 expert 2`: a file's place beyond its dp rank (a
    layer file's stage is the one that owns the layer: the layouts place it)."""
    parts = [f"{a} {getattr(f.coords, a)}" for a in axes]
    parts += [f"{k} {v}" for k, v in (("layer", f.coords.layer), ("expert", f.coords.expert))
              if v is not None]
    return " ".join(parts)


def file_status(f: RankFile, found: list[Finding], validated: bool = True) -> Text:
    """Why the file could not be read, else the worst of the findings naming it (`found`,
    errors first; +N more), else ok (… while the checkpoint is being validated)."""
    if f.error:
        return Text(shown(f.error, 80), style="red")
    if not validated:
        return PENDING
    if found:
        codes = list(dict.fromkeys(x.code for x in found))
        more = f" +{len(codes) - 2}" if len(codes) > 2 else ""
        return Text(f"{found[0].severity}: {', '.join(codes[:2])}{more}",
                    style=SEVERITY_STYLES[found[0].severity])
    if f.recovered:
        return Text("recovered", style="yellow")
    return Text("ok", style="green")


#: the kind a `missing-KIND-file` finding names, as RankFile.kind says it
MISSING_KINDS = {"optimizer": "optim", "optim": "optim", "model-states": "model"}


def _kind(f: RankFile | Finding) -> str:
    if isinstance(f, Finding):
        kind = f.code.removeprefix("missing-").removesuffix("-file")
        return MISSING_KINDS.get(kind, kind)
    return f.kind


class Overview(VerticalScroll):
    """Facts about the checkpoint as a whole."""

    def __init__(self, view: Inspection, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view = view
        self.narrow = False

    def compose(self) -> ComposeResult:
        yield Static(id="overview-body")

    def on_mount(self) -> None:
        self.refresh_facts()

    def _is_narrow(self) -> bool:
        # before the first layout the widget has no size yet: the terminal's width decides
        return (self.size.width or self.app.size.width) < WIDE

    def on_resize(self) -> None:
        if self.narrow != self._is_narrow():
            self.refresh_facts()

    def refresh_facts(self) -> None:
        """Facts side by side, or one above the other below WIDE columns (at 80 the path and
        the counts would each get a third of the screen)."""
        self.narrow = self._is_narrow()
        parts = (checkpoint_facts(self.view),
                 Group(size_facts(self.view), Text(), findings_facts(self.view)))
        if self.narrow:
            top = Group(parts[0], Text(), parts[1])
        else:
            top = Table.grid(padding=(0, 4))
            top.add_row(*parts)
        self.query_one("#overview-body", Static).update(Group(top, Text(), files_table(self.view)))
