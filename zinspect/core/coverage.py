"""Which elements of a param its fragments cover: the walk that validation, the merge plan and
the app's coverage bar all read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from zinspect.core.model import Fragment


@dataclass
class Coverage:
    """A param's fragments laid over its `numel` elements, in order."""

    numel: int
    #: (kind, rank, elements) in element order: kind "rank" (held by `rank`) or "missing"
    segments: list[tuple[str, int | None, int]] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) held by nobody
    overlaps: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) held twice

    @property
    def missing(self) -> int:
        return sum(b - a for a, b in self.gaps)


def cover(numel: int, fragments: Iterable[Fragment]) -> Coverage:
    out = Coverage(numel)
    pos = 0
    for f in sorted(fragments, key=lambda f: (f.start, f.rank)):
        if not f.numel:
            continue
        if f.start > pos:
            out.gaps.append((pos, f.start))
            out.segments.append(("missing", None, f.start - pos))
        elif f.start < pos:
            out.overlaps.append((f.start, min(pos, f.start + f.numel)))
        out.segments.append(("rank", f.rank, f.numel))
        pos = max(pos, f.start + f.numel)
    if pos < numel:
        out.gaps.append((pos, numel))
        out.segments.append(("missing", None, numel - pos))
    return out
