"""The Ranks tab: per rank its files and partitions, and a ranks × groups matrix."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Label

from zinspect.core import fmt
from zinspect.core.model import Checkpoint

#: groups shown as matrix columns; ZeRO-3 sub-groups can number thousands
MATRIX_MAX_GROUPS = 64


def rank_status(ckpt: Checkpoint, rank: int, file_names: set[str]) -> str:
    """"ok" only when no finding names the rank or one of its files: a missing optimizer
    file is a finding about the rank, not a file of it that failed to read."""
    found = [f for f in ckpt.findings if f.rank == rank or f.file in file_names]
    if not found:
        return "ok"
    worst = next((f for f in found if f.severity == "error"), found[0])
    more = f" +{len(found) - 1}" if len(found) > 1 else ""
    return f"{worst.severity}: {worst.code}{more}"


def rank_numbers(ckpt: Checkpoint) -> list[int]:
    ranks = {f.rank for f in ckpt.files if f.rank is not None}
    if ckpt.world_size:
        ranks.update(range(ckpt.world_size))
    return sorted(ranks)


class RanksPane(Vertical):
    """Two tables: one row per rank, then the partition numel of each rank in each group."""

    def __init__(self, ckpt: Checkpoint, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ckpt = ckpt

    def compose(self) -> ComposeResult:
        yield Label("Ranks", classes="section-title")
        yield DataTable(id="rank-table", cursor_type="row", zebra_stripes=True)
        groups = len(self.ckpt.groups)
        note = f" (first {MATRIX_MAX_GROUPS} of {groups})" if groups > MATRIX_MAX_GROUPS else ""
        yield Label(f"Partition elements per rank × group, + padding{note}",
                    classes="section-title")
        yield DataTable(id="rank-matrix", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        ckpt = self.ckpt
        ranks = rank_numbers(ckpt)
        table = self.query_one("#rank-table", DataTable)
        table.add_columns("rank", "files", "total", "groups", "partition numel", "padding", "status")
        for r in ranks:
            files = [f for f in ckpt.files if f.rank == r]
            held = [g for g in ckpt.groups if r in g.partition_numel]
            status = rank_status(ckpt, r, {f.name for f in files})
            table.add_row(
                str(r),
                " · ".join(f"{f.kind} {fmt.size(f.size)}" for f in files) or "—",
                fmt.size(sum(f.size for f in files)),
                str(len(held)),
                fmt.count(sum(g.partition_numel[r] for g in held)),
                fmt.count(sum(g.padding.get(r, 0) for g in held)),
                status,
                key=str(r),
            )
        matrix = self.query_one("#rank-matrix", DataTable)
        shown = ckpt.groups[:MATRIX_MAX_GROUPS]
        matrix.add_columns("rank", *(f"group {g.index}" for g in shown))
        for r in ranks:
            cells = []
            for g in shown:
                n = g.partition_numel.get(r)
                pad = g.padding.get(r, 0)
                cells.append("—" if n is None else fmt.count(n) + (f" +{pad}" if pad else ""))
            matrix.add_row(str(r), *cells, key=str(r))

    def show_rank(self, rank: int) -> None:
        table = self.query_one("#rank-table", DataTable)
        if str(rank) in table.rows:
            table.move_cursor(row=table.get_row_index(str(rank)))
        table.focus()
