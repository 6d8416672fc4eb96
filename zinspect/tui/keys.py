"""The keys as the bindings declare them: read by the help screen, the command palette and
every on-screen key hint, so that a key is written once (in a BINDINGS list)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from textual.binding import Binding
from textual.widgets import Input

if TYPE_CHECKING:
    from textual.app import App


#: tab and shift+tab in a form, as priority bindings: the app moves the focus as it reads the key.
#: Textual's own (the screen's) run in the focused widget's turn, after the app has handed that
#: widget every key that came in the same read: a fast typist's, a paste's or a script's space
#: meant for a checkbox went into the field behind it (and replaced its selected text).
FORM_BINDINGS = [
    Binding("tab", "app.focus_next", "Next field", show=False, priority=True, id="next-field"),
    Binding("shift+tab", "app.focus_previous", "Previous field", show=False, priority=True,
            id="previous-field"),
]


def path_field(path: str, field_id: str) -> Input:
    """A form's path field, opened with its cursor after the path and nothing selected: a field
    that selects its text when focused (Textual's default) lost the whole default path to the
    first key typed into it (`?`, `q`, any letter)."""
    return Input(path, id=field_id, select_on_focus=False)


def own_bindings(cls: type) -> list[Binding]:
    """The bindings `cls` itself declares (not those it inherits), as Binding objects."""
    return [b if isinstance(b, Binding) else Binding(*b) for b in cls.__dict__.get("BINDINGS", [])]


def binding(cls: type, binding_id: str) -> Binding:
    return next(b for b in own_bindings(cls) if b.id == binding_id)


def key_of(app: App, b: Binding) -> str:
    """How the footer writes its key(s): `?`, `^g`, `escape / ? / q`."""
    return " / ".join(app.get_key_display(replace(b, key=k.strip())) for k in b.key.split(","))


def what_it_does(b: Binding) -> str:
    """The long form (the tooltip), else the footer's short description; a sentence."""
    text = b.tooltip or b.description
    return text[:1].upper() + text[1:]


def key_for_action(app: App, cls: type, action: str) -> str:
    """The key of an action a widget class binds, its own or Textual's (the tree's enter)."""
    for klass in cls.__mro__:
        for b in Binding.make_bindings(klass.__dict__.get("BINDINGS", [])):
            if b.action == action:
                return key_of(app, b)
    raise LookupError(f"{cls.__name__} binds no {action!r}")
