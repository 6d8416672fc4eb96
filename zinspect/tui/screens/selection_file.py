"""Ask for the path of a selection file to save or load."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

DEFAULT_SELECTION_FILE = "zinspect-selection.json"


class SelectionFileScreen(ModalScreen[str | None]):
    """Returns the path typed, or None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel", id="cancel-selection-file")]

    def __init__(self, verb: str, path: str = DEFAULT_SELECTION_FILE) -> None:
        super().__init__()
        self.verb = verb
        self.path = path

    def compose(self) -> ComposeResult:
        with Vertical(id="selection-file", classes="dialog") as box:
            box.border_title = f"{self.verb} selection"
            yield Label("Selection file (what `zinspect merge --selection FILE` reads):")
            yield Input(self.path, id="selection-path")
            with Horizontal(classes="buttons"):
                yield Button(self.verb, variant="primary", id="selection-ok")
                yield Button("Cancel", id="selection-cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#selection-ok")
    def _ok(self) -> None:
        path = self.query_one(Input).value.strip()
        self.dismiss(path or None)

    @on(Button.Pressed, "#selection-cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
