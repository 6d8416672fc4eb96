"""Which elements of a param its fragments cover: the one walk that validation, the merge plan
and the app's coverage bar all read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from zinspect.core.model import Fragment


@dataclass
class Coverage:
    """A param's fragments laid over its `numel` elements, in order."""

    numel: int
    #: (kind, rank, elements) in element order: "rank" (held by `rank`), "pad" (padding after
    #: `rank`'s elements, not part of the param) or "missing" (held by nobody)
    segments: list[tuple[str, int | None, int]] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) held by nobody
    overlaps: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) held twice

    @property
    def missing(self) -> int:
        return sum(b - a for a, b in self.gaps)


def cover(numel: int, fragments: Iterable[Fragment]) -> Coverage:
    """Lay `fragments` over elements [0, numel). A fragment of no elements (a ZeRO-3 rank past
    the param's end) adds only its padding."""
    out = Coverage(numel)
    pos = 0
    for f in sorted(fragments, key=lambda f: (f.start, f.rank)):
        if f.numel:
            if f.start > pos:
                out.gaps.append((pos, f.start))
                out.segments.append(("missing", None, f.start - pos))
            elif f.start < pos:
                out.overlaps.append((f.start, min(pos, f.start + f.numel)))
            out.segments.append(("rank", f.rank, f.numel))
            pos = max(pos, f.start + f.numel)
        if f.padding:
            out.segments.append(("pad", f.rank, f.padding))
    if pos < numel:
        out.gaps.append((pos, numel))
        out.segments.append(("missing", None, numel - pos))
    return out


def first_problem(numel: int, fragments: list[Fragment]) -> str | None:
    """Why `fragments` do not hold elements [0, numel) exactly once with all their bytes in
    their files, the first problem in element order (None: they do)."""
    cov = cover(numel, fragments)
    problems = [(a, 0, f"elements {a:,}..{b:,} are missing") for a, b in cov.gaps]
    problems += [(a, 1, f"elements {a:,}..{b:,} are held twice") for a, b in cov.overlaps]
    problems += [(f.start, 2, f"rank {f.rank}'s bytes are not all in {f.file} (truncated?)")
                 for f in fragments if f.numel and (not f.intact or f.offset is None)]
    return min(problems)[2] if problems else None
