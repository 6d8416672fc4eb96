"""The screens' header: Textual's, with the subtitle cut in its middle to fit."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Header as TextualHeader
from textual.widgets._header import HeaderTitle

from zinspect.tui.text import middle

#: the header's icon (8 cells) and the clock space (10) beside the centred title
SIDES = 18


class Header(TextualHeader):
    """The subtitle is a path (the checkpoint, the compared file): at 80 columns Textual cut it
    at its end, which is the checkpoint's name. Here it gives up its middle, and is cut again
    when the terminal is resized."""

    def __init__(self) -> None:
        super().__init__(icon="◆")

    def format_title(self) -> Content:
        title, sub = self.screen_title, self.screen_sub_title
        room = self.size.width - SIDES - len(title) - len(" — ")
        if sub and len(sub) > room >= 12:  # narrower: Textual's own ellipsis at the end
            sub = middle(sub, room)
        return self.app.format_title(title, sub)

    def on_resize(self) -> None:
        self.query_one(HeaderTitle).update(self.format_title())
