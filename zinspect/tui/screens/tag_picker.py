"""Several tag dirs and no `latest` (DeepSpeed writes it last: a copy cut short, or saves from
two runs): pick the tag to open instead of being sent back to the shell for `--tag`."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from zinspect.tui.inspection import display_path
from zinspect.tui.keys import key_for_action, key_of, own_bindings
from zinspect.tui.text import literal


class TagPickerScreen(ModalScreen[str | None]):
    """Returns the tag chosen, or None (escape: the app quits)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Quit", id="quit-tag-picker",
                        tooltip="open no tag: quit")]

    def __init__(self, path: str, tags: list[str]) -> None:
        super().__init__()
        self.path = path
        self.tags = tags

    def compose(self) -> ComposeResult:
        with Vertical(id="tag-picker", classes="dialog") as box:
            box.border_title = "Which tag?"
            yield Static(Text(f"{display_path(self.path)} has no `latest` file and "
                             f"{len(self.tags)} tag dirs (`latest` is written last: the copy "
                             "may be incomplete). Open:"))
            yield OptionList(*(Option(literal(t, 120), id=str(i)) for i, t in enumerate(self.tags)),
                             id="tag-list")
            enter = key_for_action(self.app, OptionList, "select")
            escape = key_of(self.app, own_bindings(TagPickerScreen)[0])
            yield Static(f"{enter}: open   {escape}: quit   (zinspect PATH --tag TAG opens one "
                        "directly)", classes="dim", markup=False)

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.tags[int(event.option.id or 0)])
