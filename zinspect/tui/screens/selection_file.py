"""Ask for a path: the selection file to save or load, the other side of a diff."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from zinspect.tui.keys import FORM_BINDINGS, path_field

DEFAULT_SELECTION_FILE = "zinspect-selection.json"


class PathScreen(ModalScreen[str | None]):
    """Returns the path typed, or None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel", id="cancel-path",
                        tooltip="close without doing anything"), *FORM_BINDINGS]

    def __init__(self, title: str, prompt: str, verb: str, path: str, input_id: str) -> None:
        super().__init__()
        self.dialog_title, self.prompt, self.verb = title, prompt, verb
        self.path, self.input_id = path, input_id

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as box:
            box.border_title = self.dialog_title
            yield Static(self.prompt, markup=False)
            yield path_field(self.path, self.input_id)
            with Horizontal(classes="buttons"):
                yield Button(self.verb, variant="primary", id="path-ok")
                yield Button("Cancel", id="path-cancel")

    def on_mount(self) -> None:
        self.query_one(Input).focus()  # typing goes into the field, not to the app's keys

    @on(Input.Submitted)
    @on(Button.Pressed, "#path-ok")
    def _ok(self) -> None:
        path = self.query_one(Input).value.strip()
        self.dismiss(path or None)

    @on(Button.Pressed, "#path-cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


def selection_file_screen(verb: str, path: str) -> PathScreen:
    return PathScreen(f"{verb} selection", "Selection file (what `zinspect merge --selection FILE` "
                      "reads):", verb, path, "selection-path")
