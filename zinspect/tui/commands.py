"""Command palette providers: the app's actions (read from the bindings: their description is
the title, their tooltip the help, their key shown beside it), and "go to param" over every
name (escaped, never read as markup)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.content import Content

from zinspect.core.fmt import shown
from zinspect.tui.keys import key_of, own_bindings, what_it_does

if TYPE_CHECKING:
    from textual.binding import Binding
    from textual.dom import DOMNode

    from zinspect.tui.app import ZinspectApp

#: actions the palette leaves to Textual's own commands
NOT_LISTED = {"quit"}


class ActionCommands(Provider):
    """zinspect's own actions, listed when the palette opens."""

    @property
    def zapp(self) -> ZinspectApp:
        return self.app  # type: ignore[return-value]

    def actions(self) -> list[tuple[Binding, DOMNode]]:
        """(binding, the node its action runs on): the app's, then the main screen's."""
        from zinspect.tui.screens.main import MainScreen

        app = self.zapp
        return [(b, node) for node, cls in ((app, type(app)), (app.main, MainScreen))
                for b in own_bindings(cls) if b.action not in NOT_LISTED]

    def _hit_parts(self, b: Binding, node: DOMNode):
        return (partial(self.zapp.run_action, b.action, node),
                f"{what_it_does(b)} ({key_of(self.zapp, b)})")

    async def discover(self) -> Hits:
        for b, node in self.actions():
            run, help_text = self._hit_parts(b, node)
            yield DiscoveryHit(Content(b.description), run, help=Content(help_text))

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for b, node in self.actions():
            score = matcher.match(b.description)
            if score > 0:
                run, help_text = self._hit_parts(b, node)
                yield Hit(score, matcher.highlight(b.description), run, help=Content(help_text))


def highlighted(matcher, name: str) -> Content:
    """`name` escaped, with the matched letters styled. Textual's own `highlight` parses the
    candidate as markup: a name holding `[@click=app.quit]` would become a link."""
    text = shown(name)
    content = Content(text)
    score, offsets = matcher.fuzzy_search.match(matcher.query, text)
    for offset in offsets if score else ():
        content = content.stylize(matcher.match_style, offset, offset + 1)
    return content


class ParamCommands(Provider):
    """Every parameter name. A substring pre-filter keeps 300k names fast; hits are capped."""

    MAX_HITS = 100

    @property
    def zapp(self) -> ZinspectApp:
        return self.app  # type: ignore[return-value]

    async def startup(self) -> None:
        view = self.zapp.browsing
        self.names = list(view.ckpt.params) if view is not None else []
        self.lowered = [n.lower() for n in self.names]

    async def search(self, query: str) -> Hits:
        words = query.lower().split()
        if not words:
            return
        matcher = self.matcher(query)
        hits = 0
        for name, lower in zip(self.names, self.lowered, strict=False):
            if all(w in lower for w in words):
                yield Hit(matcher.match(name) or 0.01, highlighted(matcher, name),
                          partial(self.zapp.goto_param, name), text=shown(name),
                          help=Content("go to param"))
                hits += 1
                if hits >= self.MAX_HITS:
                    return
