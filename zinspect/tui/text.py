"""Strings from a checkpoint on screen: escaped, and never read as markup.

A `str` given to a Label, a Static, a DataTable cell, a Rich table cell or the command palette
is parsed as markup: a param named `[@click=app.quit]x` would become a link that quits. Every
name, tag, path or message quoting pickle content goes through `literal` (or `fmt.shown` into
a Text/Content built by hand) before it is shown.
"""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text

from zinspect.core.fmt import SHOWN_CHARS, count, shown


def literal(value: object, limit: int = SHOWN_CHARS, style: str = "") -> Text:
    """`value` with control characters escaped and shortened to `limit` (fmt.shown), as a Text
    that no widget parses for markup."""
    return Text(shown(value, limit), style=style)


def explained(text: Text, message: str, aside: str = "", hint: str = "", gap: str = "\n") -> Text:
    """`text` followed by a message, a dim line about it (where it came from, what caused it)
    and `hint: …` after `gap`: how the app words a problem, a refusal and a finding. Every
    string is escaped by the caller."""
    text.append(message)
    if aside:
        text.append(f"\n{aside}", style="dim")
    if hint:
        text.append(f"{gap}hint: ", style="bold")
        text.append(hint)
    return text


def counted(n: int, word: str) -> str:
    """`1 buffer`, `4 buffers`, `1,200 params`."""
    return f"{count(n)} {word}{'s' * (n != 1)}"


def params_and_buffers(params: int, buffers: int) -> str:
    """`27 params + 4 buffers`, `19 params + 1 buffer`, `47 params` (no buffers: not said)."""
    return counted(params, "param") + (f" + {counted(buffers, 'buffer')}" if buffers else "")


def middle(text: str, width: int) -> str:
    """`text` in `width` cells, giving up its middle: paths and dotted names differ at their
    ends (`…/global_step2`, `….norm.weight` vs `….norm.bias`), which an end cut would hide."""
    if len(text) <= width:
        return text
    if width < 2:
        return "…"[:width]
    head = (width - 1) * 2 // 5
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


class Squeezed:
    """One line of (escaped) text in a Rich table cell or grid: as wide as it is when there is
    room, else cut in the middle (`middle`) to the width the table gives it, never wrapped."""

    def __init__(self, value: object, limit: int = SHOWN_CHARS, style: str = "",
                 least: int = 12) -> None:
        self.text = shown(value, limit)
        self.style = style
        self.least = least

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(self.least, len(self.text)), len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(middle(self.text, options.max_width), style=self.style, no_wrap=True)
