"""Human-readable numbers, shared by the CLI and the app (humanize, binary units)."""

from __future__ import annotations

import humanize


def size(nbytes: int | float) -> str:
    return humanize.naturalsize(nbytes, binary=True, format="%.1f")


def count(n: int) -> str:
    return humanize.intcomma(n)


def short_count(n: int) -> str:
    """6.0 thousand -> 6.0k, 1.2 billion -> 1.2B: compact for tables."""
    for div, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def rate(nbytes_per_s: float) -> str:
    return f"{size(nbytes_per_s)}/s"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def progress(done: int, total: int, seconds: float) -> str:
    """'8.6 KiB of 26.4 KiB · 10.2 KiB/s · ETA 1.8s' for a byte-counting progress display."""
    speed = done / seconds if seconds > 0 else 0.0
    eta = f" · ETA {duration((total - done) / speed)}" if speed else ""
    return f"{size(done)} of {size(total)} · {rate(speed)}{eta}"
