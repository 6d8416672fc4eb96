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


#: longest text shown for one string from a checkpoint in human output (names, tags, messages)
SHOWN_CHARS = 200
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
_CONTROL.update({0x09: "\\t", 0x0a: "\\n", 0x0d: "\\r", 0x1b: "\\e"})
# line/paragraph separators and the bidi overrides/isolates can forge lines or reorder text
_CONTROL.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202a, 0x202f),
                                            *range(0x2066, 0x206a), 0xfeff)})


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """A string that came from a checkpoint (a name, tag, path, `latest`, a message quoting
    pickle content), made safe for a terminal: control characters (ANSI/OSC escapes, newlines,
    bidi overrides) are written as visible escapes, and a long one keeps its start and end
    around '...'. `--json` output must not use it: JSON escaping keeps the value exact.
    The one escaping rule of the CLI and the app."""
    text = str(text)
    if len(text) > limit * 4:  # cut before translating: a 24 MiB name costs no time
        text = text[:limit * 2] + text[-limit * 2:]
    text = text.translate(_CONTROL)
    if len(text) > limit:
        head = (limit - 3) * 2 // 3
        text = text[:head] + "..." + text[len(text) - (limit - 3 - head):]
    return text
