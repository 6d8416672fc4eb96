"""The footer of every full screen: at narrow widths (80 columns) it packs the keys and leaves
the palette entry out (the help lists ctrl+p), so that no key is cut off."""

from __future__ import annotations

from textual import events
from textual.widgets import Footer

#: below this many columns the footer is compact
NARROW = 100


class KeyFooter(Footer):
    def on_resize(self, event: events.Resize) -> None:
        narrow = event.size.width < NARROW
        if narrow != self.compact:
            self.compact = narrow
            self.show_command_palette = not narrow
            self.call_after_refresh(self.recompose)
