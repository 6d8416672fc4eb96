"""Command palette providers: app actions, and "go to param" over every name."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from zinspect.tui.app import ZinspectApp

#: (title, help, action name on the app)
ACTIONS = [
    ("Exclude frozen params", "leave every frozen param out of the merge (again: include)",
     "exclude_frozen"),
    ("Merge to fp32", "write safetensors or torch files with the current exclusions", "merge"),
    ("Validate again", "re-read the checkpoint from disk and re-run the checks", "validate"),
    ("Deep check", "read every byte: zip CRCs, NaN/Inf per param (d)", "deep_check"),
    ("Statistics", "min/max/mean/std/L2, NaN/Inf per param, L2 per layer (a)",
     "screen.statistics"),
    ("Save selection", "write the exclusions for `zinspect merge --selection FILE`",
     "save_selection"),
    ("Load selection", "read exclusions from a selection file", "load_selection"),
    ("Go to param", "find a parameter by name", "goto_param"),
    ("Show findings", "the validation results", "screen.show_tab('findings')"),
    ("Show ranks", "files and partitions per rank", "screen.show_tab('ranks')"),
    ("Help", "what every key does", "help"),
]


class ActionCommands(Provider):
    """zinspect's own actions, listed when the palette opens."""

    @property
    def zapp(self) -> ZinspectApp:
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        for title, help_text, action in ACTIONS:
            yield DiscoveryHit(title, partial(self.zapp.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, action in ACTIONS:
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), partial(self.zapp.run_action, action),
                          help=help_text)


class ParamCommands(Provider):
    """Every parameter name. A substring pre-filter keeps 300k names fast; hits are capped."""

    MAX_HITS = 100

    @property
    def zapp(self) -> ZinspectApp:
        return self.app  # type: ignore[return-value]

    async def startup(self) -> None:
        view = self.zapp.view
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
                yield Hit(matcher.match(name) or 0.01, matcher.highlight(name),
                          partial(self.zapp.goto_param, name), text=name, help="go to param")
                hits += 1
                if hits >= self.MAX_HITS:
                    return
