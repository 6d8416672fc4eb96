"""Strings from a checkpoint on screen: escaped, and never read as markup.

A `str` given to a Label, a Static, a DataTable cell, a Rich table cell or the command palette
is parsed as markup: a param named `[@click=app.quit]x` would become a link that quits. Every
name, tag, path or message quoting pickle content goes through `literal` (or `fmt.shown` into
a Text/Content built by hand) before it is shown.
"""

from __future__ import annotations

from rich.text import Text

from zinspect.core.fmt import SHOWN_CHARS, shown


def literal(value: object, limit: int = SHOWN_CHARS, style: str = "") -> Text:
    """`value` with control characters escaped and shortened to `limit` (fmt.shown), as a Text
    that no widget parses for markup."""
    return Text(shown(value, limit), style=style)
