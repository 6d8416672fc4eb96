"""A bar across a param's elements: which rank holds which part, where padding and gaps sit."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from zinspect.core.coverage import cover
from zinspect.core.model import Fragment

RANK_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22", "#7f7f7f"]
PAD_STYLE = "#808080 on #303030"
MISSING_STYLE = "bold white on #a00000"


def coverage_segments(numel: int, fragments: list[Fragment]) -> list[tuple[str, int | None, int]]:
    """(kind, rank, elements) in element order; kind is "rank", "pad" or "missing"."""
    return cover(numel, fragments).segments


def _widths(lengths: list[int], width: int) -> list[int]:
    """Share `width` columns in proportion to `lengths`, at least one column each."""
    total = sum(lengths) or 1
    widths = [max(1, round(n * width / total)) for n in lengths]
    while sum(widths) > width and max(widths) > 1:
        widths[widths.index(max(widths))] -= 1
    while sum(widths) < width and widths:
        widths[widths.index(max(widths))] += 1
    return widths


def rank_color(rank: int) -> str:
    return RANK_COLORS[rank % len(RANK_COLORS)]


class CoverageBar(Widget):
    """One line of coloured blocks labelled with rank numbers, and a legend under it."""

    DEFAULT_CSS = """
    CoverageBar { height: 2; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.segments: list[tuple[str, int | None, int]] = []
        self.note = ""  # shown instead of the bar, e.g. while the fragments are being read

    def show(self, numel: int, fragments: list[Fragment]) -> None:
        self.segments, self.note = coverage_segments(numel, fragments), ""
        self.refresh()

    def show_note(self, note: str) -> None:
        self.segments, self.note = [], note
        self.refresh()

    def render(self) -> Text:
        bar = Text()
        if self.note:
            return Text(self.note, style="dim")
        if not self.segments:
            return Text("no fragments", style="dim")
        widths = _widths([n for _, _, n in self.segments], max(1, self.size.width))
        for (kind, rank, _), width in zip(self.segments, widths, strict=False):
            if kind == "rank":
                label = f"r{rank}"[:width].center(width)
                bar.append(label, style=f"bold white on {rank_color(rank)}")
            elif kind == "pad":
                bar.append("░" * width, style=PAD_STYLE)
            else:
                bar.append("✗".center(width, " "), style=MISSING_STYLE)
        legend = Text("\n")
        for rank in sorted({r for k, r, _ in self.segments if k == "rank"}):
            legend.append("■", style=rank_color(rank))
            legend.append(f" rank {rank}  ")
        if any(k == "pad" for k, _, _ in self.segments):
            legend.append("░", style=PAD_STYLE)
            legend.append(" padding  ")
        if any(k == "missing" for k, _, _ in self.segments):
            legend.append("✗", style=MISSING_STYLE)
            legend.append(" held by no rank")
        return bar + legend
