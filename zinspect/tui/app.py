"""ZinspectApp: open a checkpoint in a thread worker, then browse, choose and merge it."""

from __future__ import annotations

import gc
import os
import time
from functools import partial
from typing import Any

from textual import events, on, work
from textual.app import App
from textual.binding import Binding
from textual.command import CommandPalette
from textual.css.query import NoMatches
from textual.widgets import TabbedContent
from textual.worker import get_current_worker

from zinspect.core import gc_paused
from zinspect.core.fmt import shown
from zinspect.core.load import load_checkpoint
from zinspect.core.model import Finding
from zinspect.core.selection import Selection
from zinspect.core.validate import validate
from zinspect.tui.commands import ActionCommands, ParamCommands
from zinspect.tui.errors import Problem, WorkerOutcomes
from zinspect.tui.inspection import (
    Inspection,
    default_output_dir,
    display_path,
    split_ahead,
)
from zinspect.tui.keys import binding
from zinspect.tui.messages import (
    ExclusionToggled,
    FindingChosen,
    Loaded,
    LoadProgress,
    ParamChosen,
)
from zinspect.tui.opening import TypeAhead, ahead_keys, outlived
from zinspect.tui.screens.help import HelpScreen
from zinspect.tui.screens.main import Inspector, MainScreen
from zinspect.tui.screens.param_detail import ParamDetailScreen
from zinspect.tui.screens.selection_file import PathScreen, SelectionFileActions
from zinspect.tui.widgets.params_pane import ParamsPane
from zinspect.tui.widgets.ranks_pane import RanksPane, grid_cells
from zinspect.tui.widgets.virtual_table import ROWS_AT_ONCE

#: seconds without a key before a worker splits the tree's largest modules ahead
IDLE = 0.5


class ZinspectApp(SelectionFileActions, WorkerOutcomes, TypeAhead, App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "zinspect"
    COMMANDS = App.COMMANDS | {ActionCommands, ParamCommands}
    #: the help screen and the command palette are made from these (description, tooltip)
    BINDINGS = [
        Binding("q", "quit", "Quit", id="quit", tooltip="quit (a running merge is cancelled first)"),
        Binding("question_mark", "help", "Help", id="help", key_display="?",
                tooltip="this help: what every key does"),
        Binding("m", "merge", "Merge", id="merge",
                tooltip="merge with the current exclusions: fp32, bf16 or fp16; safetensors, "
                        "torch or a PEFT adapter"),
        Binding("v", "validate", "Validate", id="validate",
                tooltip="validate again: re-read the checkpoint from disk"),
        Binding("d", "deep_check", "Deep check", show=False, id="deep-check",
                tooltip="read every byte: zip CRCs, NaN/Inf per param; escape cancels"),
        Binding("f", "exclude_frozen", "Exclude frozen", show=False, id="exclude-frozen",
                tooltip="exclude every frozen param (again: include them)"),
        Binding("s", "save_selection", "Save selection", show=False, id="save-selection",
                tooltip="save the exclusions to the file `zinspect merge --selection FILE` reads"),
        Binding("l", "load_selection", "Load selection", show=False, id="load-selection",
                tooltip="load the exclusions from a selection file"),
        Binding("ctrl+g", "goto_param", "Go to param", show=False, id="goto-param",
                tooltip="go to a param by the words in its name"),
        Binding("c", "compare", "Compare", show=False, id="compare",
                tooltip="diff against another checkpoint, a merged output or a state dict, "
                        "param by param; escape cancels"),
        Binding("p", "optimizer", "Optimizer", show=False, id="optimizer",
                tooltip="the optimizer: step, hyper-parameters, loss scale; per param the norms "
                        "of master, exp_avg, sqrt(exp_avg_sq) and Adam's update size, read in a "
                        "worker; escape cancels"),
    ]

    def __init__(self, path: str, tag: str | None = None, tags: list[str] | None = None) -> None:
        """`tags`: PATH has several tag dirs and no `latest`; the user picks one first."""
        super().__init__()
        own = partial(binding, ZinspectApp)
        self.ahead_keys = ahead_keys(
            own("quit"), binding(MainScreen, "filter"),
            [own("save-selection"), own("load-selection"), own("compare")], [own("goto-param")],
            self.COMMAND_PALETTE_BINDING)
        self.path = path
        self.tag = tag
        self.tags_to_pick = tags or []
        self.view: Inspection | None = None
        #: the view a reload (`v`) replaced: what changed is said once the new one is validated
        self.replaced: Inspection | None = None
        self.sub_title = display_path(path)
        self.typed_at = 0.0  # when the last key came (the work ahead waits while keys come)

    def notify(self, message: str, *, title: str = "", severity: Any = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Never markup, whatever the caller asks: notifications quote names from the
        checkpoint, and `[@click=app.quit]` in a name must stay text (issue 8)."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def get_default_screen(self) -> MainScreen:
        return MainScreen(self.sub_title)

    @property
    def main(self) -> MainScreen:
        return self.screen_stack[0]  # type: ignore[return-value]

    @property
    def browsing(self) -> Inspection | None:
        """The view whose tabs are on screen; None while a checkpoint is read (again) or could
        not be: the screen shows a spinner or the error, and the keys that act on a view wait
        (`/` during `v`'s reading looked for a Parameters tab that was not there: a crash),
        also while a new Inspector's tabs are still being mounted (go to param there: a crash)."""
        view = self.view
        if view is None or not self.main.query(Inspector):
            return None
        try:
            self.main.query_one("#tabs", TabbedContent).get_tab("tab-params")
        except (NoMatches, ValueError):
            return None
        return view

    def on_mount(self) -> None:
        if self.tag is None and self.tags_to_pick:
            from zinspect.tui.screens.tag_picker import TagPickerScreen

            self.push_screen(TagPickerScreen(self.path, self.tags_to_pick), self.tag_picked)
        else:
            self.read(Selection())

    def on_unmount(self) -> None:
        gc.unfreeze()  # what the loads froze (see load) is the collector's again

    def tag_picked(self, tag: str | None) -> None:
        if tag is None:
            self.exit()
            return
        self.tag = tag
        self.read(Selection())

    # -- loading --------------------------------------------------------------------------
    async def action_validate(self) -> None:
        """Read the checkpoint (again) from disk in a thread; the screen shows a spinner."""
        await self.main.show_loading(again=self.view is not None)
        selection = self.view.selection if self.view is not None else Selection()
        self.read(selection)

    def read(self, selection: Selection) -> None:
        self.start_reading()  # the keys typed from now on wait for the tabs
        self.load(selection)

    @work(thread=True, exclusive=True, exit_on_error=False, group="load",
          description="reading the checkpoint's metadata")
    def load(self, selection: Selection) -> Inspection | None:
        """Read the checkpoint and hand it to the UI (`Loaded`: the tabs are drawn from it),
        then, while they are on screen, make the module tree, validate and work out what the
        findings mark; the result is that settled view (`worker_succeeded` shows the findings).
        All of it in a thread of its own, which `q` does not wait for (`outlived`)."""
        worker = get_current_worker()
        return outlived(worker, lambda: self._load(worker, selection))

    def _load(self, worker, selection: Selection) -> Inspection:

        def progress(done: int, total: int, name: str) -> None:
            if not worker.is_cancelled:
                self.post_message(LoadProgress(done, total, name))

        with gc_paused():  # the tree and sort orders are as many small objects again
            view = Inspection(load_checkpoint(self.path, self.tag, progress), selection)
            loaded = Loaded(view, worker)
            self.post_message(loaded)
            while not loaded.drawn.wait(0.05):  # the UI thread paints; ~5x slower beside us
                if worker.is_cancelled:  # `v` is reading the files again, or the app ended
                    return view
            view.tree  # noqa: B018 -- what the Parameters tab shows first
            if not worker.is_cancelled:
                validate(view.ckpt)
                view.settle()
                view.rank_cells = grid_cells(view.ckpt)
        # The checkpoint and the view hold no reference cycle (refcounting frees them on a
        # reload): kept out of the collector's full passes, which walked them all (~1M
        # objects at 297k names) and froze the UI for 0.4-1 s at some later key.
        gc.freeze()
        return view

    @on(LoadProgress)
    def load_progress(self, event: LoadProgress) -> None:
        self.main.show_load_progress(event.done, event.total, event.name)

    @on(Loaded)
    async def loaded(self, event: Loaded) -> None:
        """The checkpoint is read: its tabs now, its findings when the load worker ends."""
        if event.worker.is_cancelled:  # `v` started a newer load meanwhile
            return
        if self.view is not None and self.view.validated:  # `v`: say what changed, once known
            self.replaced = self.view
        self.view = event.view
        self.title = f"zinspect · {shown(self.view.ckpt.tag, 80)}"
        await self.main.show_inspection(self.view)
        for screen in self.detail_screens():
            screen.show_param()
        self.call_after_refresh(event.drawn.set)
        self.shown_read()  # the keys typed meanwhile act now

    async def worker_succeeded(self, group: str, result: Any) -> None:
        if group != "load" or result is not self.view:
            return
        result.validated = True
        await self.main.show_findings()
        for screen in self.detail_screens():
            screen.refresh_facts()
        if self.replaced is not None:
            self.notify(self.view.change_since(self.replaced), timeout=4)
            self.replaced = None
        self.typed_at = time.monotonic()  # as a key: the first keys often follow the findings
        self.work_ahead(self.view)

    @work(thread=True, exit_on_error=False, group="ahead",
          description="preparing the param look-ups and the tree's largest module")
    def work_ahead(self, view: Inspection) -> None:
        """After the findings (what the user sees first), each once no key is coming: the
        param look-ups by name, and the largest modules split off (the tree splits the next
        level when one is opened); not for a view `v` has replaced meanwhile."""
        idle = lambda: self.idle() and view is self.view  # noqa: E731
        view.prepare_lookups(idle)
        split_ahead(view.tree, ROWS_AT_ONCE, idle)

    def idle(self) -> bool:
        """In a worker: wait until no key has come for IDLE seconds; False if the worker was
        cancelled meanwhile (the app ends, or its widget is gone)."""
        worker = get_current_worker()
        while (wait := self.typed_at + IDLE - time.monotonic()) > 0 and not worker.is_cancelled:
            time.sleep(min(wait, 0.1))
        return not worker.is_cancelled

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key):
            self.typed_at = time.monotonic()
        await super().on_event(event)  # (TypeAhead's: a key typed while reading waits)

    async def worker_failed(self, group: str, problem: Problem) -> bool:
        if group != "load":
            return False
        await self.main.show_error(problem)
        self.read_failed()
        return True

    def validating(self) -> bool:
        """True, and says so, while the findings are still being made (the merge and the deep
        check want them: the merge refuses on errors, the deep check replaces some)."""
        if self.view is not None and not self.view.validated:
            self.notify("still validating the checkpoint: try again in a moment", timeout=3)
            return True
        return False

    def action_deep_check(self) -> None:
        if self.browsing is not None and not self.validating():
            from zinspect.tui.screens.deep_check import DeepCheckScreen

            self.push_screen(DeepCheckScreen(self.view.ckpt), self.deep_checked)

    async def deep_checked(self, found: list[Finding] | None) -> None:
        """Replace the findings of an earlier deep check with these, and redraw what shows
        them (the Parameters tab keeps its filter, cursor and open modules)."""
        if found is None or self.browsing is None:
            return
        from zinspect.core.deep import CODES

        ckpt = self.view.ckpt
        ckpt.findings = [f for f in ckpt.findings if f.code not in CODES] + found
        self.view.update_findings()
        self.view.rank_cells = grid_cells(ckpt)
        await self.main.show_findings()
        for screen in self.detail_screens():
            screen.refresh_facts()
        problems = [f for f in found if f.severity != "info"]
        self.notify(f"deep check: {len(problems)} problem(s) found" if problems
                    else "deep check: every CRC matches, no NaN or Inf",
                    severity="warning" if problems else "information")

    # -- navigation -----------------------------------------------------------------------
    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_filter(self) -> None:
        if self.browsing is None:
            return
        self.main.action_show_tab("params", focus_content=False)  # the filter gets the keys
        self.main.query_one(ParamsPane).focus_filter()

    def action_goto_param(self) -> None:
        if self.browsing is not None:
            self.push_screen(CommandPalette(providers=[ParamCommands],
                                            placeholder="Go to parameter: words in its name"))

    def goto_param(self, name: str, keep_tab: bool = False) -> None:
        """Show `name` in the tree and open its detail screen; with `keep_tab` (from a finding)
        the tab stays, so escape goes back to where the user came from."""
        if self.browsing is None or name not in self.view.ckpt.params:
            return
        while len(self.screen_stack) > 1:
            self.pop_screen()
        if not keep_tab:
            self.main.query_one("#tabs").active = "tab-params"
            self.main.query_one(ParamsPane).show_param(name)
        self.push_screen(ParamDetailScreen(name))

    def detail_screens(self) -> list[ParamDetailScreen]:
        """Param detail screens on the stack: redrawn when the view changes under them."""
        return [s for s in self.screen_stack if isinstance(s, ParamDetailScreen)]

    @on(ParamChosen)
    def param_chosen(self, event: ParamChosen) -> None:
        if self.browsing is not None:
            self.push_screen(ParamDetailScreen(event.name))

    @on(FindingChosen)
    def finding_chosen(self, event: FindingChosen) -> None:
        f = event.finding
        if f.param is not None and self.browsing is not None and f.param in self.view.ckpt.params:
            self.goto_param(f.param, keep_tab=True)
        elif f.rank is not None:
            self.main.action_show_tab("ranks")
            self.main.query_one(RanksPane).show_rank(f.rank)
        else:
            self.notify("this finding names no param or rank", timeout=3)

    # -- exclusion ------------------------------------------------------------------------
    @on(ExclusionToggled)
    def exclusion_toggled(self, event: ExclusionToggled) -> None:
        if self.browsing is None or not event.names:
            return
        including = all(n in self.view.excluded for n in event.names)
        self.view.toggle(event.names)
        if including and any(n in self.view.excluded for n in event.names):  # a glob keeps them
            self.notify(f"{shown(event.what, 120)}: still excluded by a pattern of the loaded "
                        "selection file", severity="warning")
        self.selection_changed()

    def action_exclude_frozen(self) -> None:
        if self.browsing is None:
            return
        self.view.toggle_frozen()  # the summary line says "frozen excluded"
        self.selection_changed()

    def selection_changed(self) -> None:
        self.main.query_one(ParamsPane).refresh_marks()
        if isinstance(self.screen, ParamDetailScreen):
            self.screen.refresh_facts()

    # -- merge ----------------------------------------------------------------------------
    def action_merge(self) -> None:
        if self.browsing is None or self.validating():
            return
        from zinspect.tui.screens.merge import MergeScreen  # the merge engine loads on demand

        self.push_screen(MergeScreen(self.view))


    def action_optimizer(self) -> None:
        if self.browsing is not None:
            from zinspect.tui.screens.optimizer import OptimizerScreen

            self.push_screen(OptimizerScreen(self.view.ckpt))

    # -- diff -----------------------------------------------------------------------------
    def action_compare(self) -> None:
        if self.browsing is None:
            return
        merged = default_output_dir(self.view.ckpt)
        self.push_screen(PathScreen(
            "Compare with", "Another checkpoint, a merged output (safetensors folder or file) or "
            "a .pt/.bin state dict:", "Compare", merged if os.path.exists(merged) else "",
            "compare-path"), self.compare_with)

    def compare_with(self, other: str | None) -> None:
        if other is not None and self.browsing is not None:
            from zinspect.tui.screens.diff import DiffScreen  # numpy loads on demand

            self.push_screen(DiffScreen(self.view.ckpt, other))


def run_app(path: str, tag: str | None = None, tags: list[str] | None = None) -> int:
    """Open the app on a checkpoint; returns the process exit code (0 after `q`; 143 / 129 when
    SIGTERM / SIGHUP ended a merge, see screens/merge.py)."""
    app = ZinspectApp(path, tag, tags)
    app.run()
    return app.return_code or 0
