"""Ask for a path: the selection file to save or load, the other side of a diff; the app's
save and load of the selection file."""

from __future__ import annotations

from collections.abc import Callable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from zinspect.core.fmt import shown
from zinspect.core.selection import Selection
from zinspect.errors import UsageError, ZinspectError
from zinspect.tui.errors import explain
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


class SelectionFileActions:
    """Mixed into the app (before its Textual base class): `s` and `l` save and load the
    exclusions (the file `zinspect merge --selection FILE` reads)."""

    selection_file = DEFAULT_SELECTION_FILE  # the last one saved or loaded

    def action_save_selection(self) -> None:
        self.ask_selection_file("Save", self.save_selection)

    def action_load_selection(self) -> None:
        self.ask_selection_file("Load", self.load_selection)

    def ask_selection_file(self, verb: str, then: Callable[[str], None]) -> None:
        """The selection file's dialog; `then(path)` unless it was cancelled."""
        def chosen(path: str | None) -> None:
            if path is not None and self.browsing is not None:
                then(path)

        if self.browsing is not None:
            self.push_screen(selection_file_screen(verb, self.selection_file), chosen)

    def selection_file_failed(self, doing: str, message: str) -> None:
        explain(UsageError(message, "give another path"), doing).notify(self)

    def save_selection(self, path: str) -> None:
        try:
            self.view.selection.save(path)
        except (OSError, ValueError) as e:  # ValueError: e.g. a NUL in the path
            self.selection_file_failed("saving the selection", f"cannot write {path}: "
                                       f"{getattr(e, 'strerror', None) or e}")
            return
        self.selection_file = path
        self.notify(f"saved {len(self.view.excluded)} exclusion(s) to {shown(path, 120)}")

    def load_selection(self, path: str) -> None:
        try:
            selection = Selection.load(path)
        except ZinspectError as e:
            explain(e, "loading the selection file").notify(self)
            return
        except (OSError, ValueError) as e:  # e.g. a NUL in the path, an undecodable file
            self.selection_file_failed("loading the selection file",
                                       f"{path}: not a selection file ({e})")
            return
        self.selection_file = path
        self.view.set_selection(selection)
        unknown = [n for n in selection.exclude if n not in self.view.ckpt.params
                   and n not in self.view.ckpt.buffers]
        note = f"; {len(unknown)} name(s) are not in this checkpoint" if unknown else ""
        self.notify(f"loaded {shown(path, 120)}: {len(self.view.excluded)} excluded{note}",
                    severity="warning" if unknown else "information")
        self.selection_changed()
