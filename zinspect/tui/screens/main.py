"""The main screen: a loading state, an error state, or the four tabs over a loaded checkpoint."""

from __future__ import annotations

from dataclasses import replace

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Container, Vertical
from textual.screen import Screen
from textual.widgets import Label, LoadingIndicator, Static, TabbedContent, TabPane

from zinspect.core.fmt import shown
from zinspect.tui.errors import Problem
from zinspect.tui.footer import KeyFooter
from zinspect.tui.inspection import Inspection
from zinspect.tui.keys import binding, key_of
from zinspect.tui.widgets.findings_pane import FindingsPane
from zinspect.tui.widgets.header import Header
from zinspect.tui.widgets.overview import Overview
from zinspect.tui.widgets.params_pane import ParamsPane
from zinspect.tui.widgets.ranks_pane import RanksPane

TABS = ("overview", "params", "ranks", "findings")


def findings_label(view: Inspection) -> str:
    """The Findings tab's title: how many root causes (knock-ons fold under them), ! on errors."""
    if not view.validated:
        return "Findings (…)"
    roots = sum(f.cause is None for f in view.folded)
    return f"Findings ({roots})" + (" !" if view.ckpt.errors else "")


class Inspector(Container):
    """The four tabs over one loaded checkpoint."""

    def __init__(self, view: Inspection, initial: str) -> None:
        super().__init__(id="inspector")
        self.view = view
        self.initial = initial

    def compose(self) -> ComposeResult:
        view = self.view
        with TabbedContent(initial=f"tab-{self.initial}", id="tabs"):
            with TabPane("Overview", id="tab-overview"):
                yield Overview(view, id="overview")
            with TabPane("Parameters", id="tab-params"):
                yield ParamsPane(view, id="params")
            with TabPane("Ranks", id="tab-ranks"):
                yield RanksPane(view, id="ranks")
            with TabPane(findings_label(view), id="tab-findings"):
                yield FindingsPane(view, id="findings")

    async def show_findings(self) -> None:
        """Redraw, in place, what shows the findings (validation has ended, or a deep check
        replaced some): the Parameters tab keeps its filter, cursor and open modules."""
        tabs = self.query_one(TabbedContent)
        tabs.get_tab("tab-findings").label = findings_label(self.view)
        self.query_one(Overview).refresh_facts()
        self.query_one(ParamsPane).refresh_marks()
        screen, tab = self.screen, self.screen.active_tab
        focused = screen.focused
        lost = focused is None or any(isinstance(w, RanksPane | FindingsPane)
                                      for w in focused.ancestors_with_self)
        await self.query_one(RanksPane).recompose()
        await self.query_one(FindingsPane).recompose()
        if lost and tab in ("ranks", "findings"):  # on a tab drawn anew: focus its table
            screen.call_after_refresh(screen.focus_tab_content, tab)


#: the tab keys share one line in the help
TAB_KEYS = Binding.Group("Overview, Parameters, Ranks, Findings tabs")


class MainScreen(Screen):
    BINDINGS = [
        Binding(str(i + 1), f"show_tab('{tab}')", tab.title(), show=False, id=f"tab-{tab}",
                tooltip=f"the {tab.title()} tab", group=TAB_KEYS)
        for i, tab in enumerate(TABS)
    ] + [
        # a priority binding: the screen moves the focus to the filter as it reads `/`, so the
        # keys typed right behind it go into the filter (else they went to the tree, whose
        # space excluded a param). Names hold no `/`, so the filter field does not need it.
        Binding("slash", "app.filter", "Filter", id="filter", key_display="/", priority=True,
                tooltip="filter the parameters by the words a name contains, as you type"),
        Binding("a", "statistics", "Statistics", show=False, id="statistics",
                 tooltip="statistics per param and the L2 norm per layer, read in a worker; "
                         "escape cancels")]

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.last_tab = "overview"  # shown again after a reload

    def compose(self) -> ComposeResult:
        yield Header()
        with Container(id="body"):
            yield self.loading_view()
        yield KeyFooter()

    async def _replace_body(self, *widgets) -> None:
        """Swap what the screen shows; awaited, so the old widgets (and their ids) are gone
        before the new ones arrive."""
        body = self.query_one("#body")
        await body.remove_children()
        await body.mount(*widgets)
        if self.focused is not None and not self.focused.is_attached:
            # This screen resumed (a dialog closed) while the old body was being removed:
            # Textual's auto focus chose one of the old widgets, and every key sent to a removed
            # widget is lost (the app looked frozen after `d`). Focus the new body instead.
            self.set_focus(None)
            self.call_after_refresh(self.focus_tab_content)

    def loading_view(self, again: bool = False) -> Vertical:
        """`again`: `v` reads the files again (escape goes back to the tabs read before)."""
        leave = key_of(self.app, binding(type(self.app), "quit"))
        hint = (f"escape: back   {leave}: quit" if again else f"{leave} / escape: quit") + \
            "   (keys typed meanwhile act once it is read)"
        return Vertical(Center(Label(Text(f"Reading {self.what} …"), id="loading-label")),
                        LoadingIndicator(), Center(Label(Text(hint), id="loading-keys")),
                        id="loading")

    def show_load_progress(self, done: int, total: int, name: str) -> None:
        labels = self.query("#loading-label")
        if labels:
            labels.first(Label).update(Text(
                f"Reading {self.what} … {done} of {total} files ({shown(name, 80)})"))

    async def show_loading(self, again: bool = False) -> None:
        self.last_tab = self.active_tab or self.last_tab
        await self._replace_body(self.loading_view(again))

    async def show_error(self, problem: Problem) -> None:
        """The checkpoint could not be opened: what, where, what to try, and the keys."""
        text = replace(problem, title="Cannot open the checkpoint").text()
        app = type(self.app)
        again, leave = (key_of(self.app, binding(app, name)) for name in ("validate", "quit"))
        text.append(f"\n\n{again}: try again   {leave}: quit", style="dim")
        await self._replace_body(Static(text, id="load-error"))

    async def show_inspection(self, view: Inspection) -> None:
        """Build the tabs for a freshly loaded checkpoint, keeping the tab the user was on."""
        self.last_tab = self.active_tab or self.last_tab
        await self._replace_body(Inspector(view, self.last_tab))

    async def show_findings(self) -> None:
        for inspector in self.query(Inspector):
            await inspector.show_findings()

    @property
    def active_tab(self) -> str | None:
        tabs = self.query(TabbedContent)
        return tabs.first().active.removeprefix("tab-") if tabs else None

    def action_statistics(self) -> None:
        view = getattr(self.app, "view", None)
        if view is not None and self.query(TabbedContent):
            from zinspect.tui.screens.stats import StatisticsScreen

            self.app.push_screen(StatisticsScreen(view.ckpt))

    def action_show_tab(self, tab: str, focus_content: bool = True) -> None:
        if self.query(TabbedContent):
            self.query_one(TabbedContent).active = f"tab-{tab}"
            if focus_content:
                self.call_after_refresh(self.focus_tab_content)

    def focus_tab_content(self, tab: str | None = None) -> None:
        """Focus what the active tab shows (only if it is still `tab`, when given: focusing
        a widget of another tab's pane would switch back to that tab)."""
        pane = self.query_one(TabbedContent).active_pane
        if pane is None or (tab is not None and pane.id != f"tab-{tab}"):
            return
        if pane.id == "tab-params":
            self.query_one(ParamsPane).current_view().focus()
        else:
            focusable = [w for w in pane.query("*") if w.focusable]
            if focusable:
                focusable[0].focus()
