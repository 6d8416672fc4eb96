"""`?`: what every key does, read from the bindings themselves (keys and tooltips), so that
the help cannot disagree with what the keys do."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from zinspect.tui.keys import key_for_action, key_of, own_bindings, what_it_does


def widget_keys() -> list[tuple[str, type, str, str]]:
    """What widgets' own keys mean here: (section, widget class, action, text)."""
    from zinspect.tui.widgets.findings_pane import FindingTable
    from zinspect.tui.widgets.param_tree import ParamTree

    return [("Parameters", ParamTree, "select_cursor", "Expand a module, or open a param's fragments"),
            ("Findings", FindingTable, "choose", "Jump to the param or rank the finding names")]


KEY_WIDTH = 11
#: the marks the tree and table draw (not keys)
MARKS = "x excluded · F frozen · T tied · ! has findings"


def sections() -> list[tuple[str, list[type]]]:
    """(title, the classes whose own bindings it lists); imported here, when help opens, since
    the screens import the app's modules."""
    from zinspect.tui.app import ZinspectApp
    from zinspect.tui.screens.deep_check import DeepCheckScreen
    from zinspect.tui.screens.diff import DiffScreen
    from zinspect.tui.screens.main import MainScreen
    from zinspect.tui.screens.merge import MergeScreen
    from zinspect.tui.screens.optimizer import OptimizerScreen
    from zinspect.tui.screens.param_detail import ParamDetailScreen
    from zinspect.tui.screens.stats import StatisticsScreen
    from zinspect.tui.widgets.param_tree import ParamTree
    from zinspect.tui.widgets.params_pane import ParamsPane

    return [
        ("Anywhere", [MainScreen, ZinspectApp]),
        ("Parameters", [ParamsPane, ParamTree]),
        ("A param's detail", [ParamDetailScreen]),
        ("Merge", [MergeScreen]),
        ("Deep check", [DeepCheckScreen]),
        ("Statistics", [StatisticsScreen]),
        ("Compare", [DiffScreen]),
        ("Optimizer", [OptimizerScreen]),
        ("Findings", []),
    ]


def _rows(app: App, classes: list[type]) -> list[tuple[str, str]]:
    """One row per binding; bindings of one group (the tab keys) share a row."""
    rows: list[tuple[str, str]] = []
    seen: dict[object, int] = {}
    for cls in classes:
        for b in own_bindings(cls):
            key = key_of(app, b)
            if b.group is not None and b.group in seen:
                i = seen[b.group]
                rows[i] = (f"{rows[i][0]} {key}", rows[i][1])
                continue
            if b.group is not None:
                seen[b.group] = len(rows)
            rows.append((key, b.group.description if b.group else what_it_does(b)))
    return rows


def keys_table(app: App) -> Group:
    """A heading and a two-column grid per section (a heading in the grid would widen the
    key column to its own length)."""
    parts: list[Text | Table] = []
    for title, classes in sections():
        rows = _rows(app, classes)
        if title == "Anywhere":
            rows.insert(1, (app.get_key_display(Binding(app.COMMAND_PALETTE_BINDING, "")),
                            "Command palette: every action here, and go to a param by name"))
        rows += [(key_for_action(app, cls, action), text)
                 for section, cls, action, text in widget_keys() if section == title]
        if title == "Parameters":
            rows.append(("marks", MARKS))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", width=KEY_WIDTH)
        grid.add_column()
        for key, what in rows:
            grid.add_row(Text(key), Text(what))
        parts += [Text(title, style="bold underline"), grid, Text()]
    return Group(*parts[:-1])


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,question_mark,q", "dismiss", "Close", id="close-help",
                tooltip="close this help"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help", classes="dialog") as box:
            box.border_title = "zinspect keys"
            box.border_subtitle = f"{key_of(self.app, own_bindings(HelpScreen)[0])} closes"
            yield Static(keys_table(self.app))
