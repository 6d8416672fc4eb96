"""While a checkpoint is read (seconds at 300k names): the keys typed meanwhile wait for its tabs
and then act on them, in the order typed; the keys that leave act at once, and the reading runs
in a thread that the process's exit never waits for."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from textual import events
from textual.binding import Binding
from textual.worker import Worker

T = TypeVar("T")

#: keys that leave the app at once while it reads (Textual's ctrl+c only says how to quit)
LEAVE = frozenset({"ctrl+c", "ctrl+q"})
#: keys that leave a text field
CLOSES_TEXT = frozenset({"enter", "escape", "tab", "shift+tab"})


@dataclass(frozen=True)
class AheadKeys:
    """What the keys typed ahead do, from the app's bindings (a key is written once there):
    `leave_unless_typing` leave at once too, unless a key typed ahead of them opened a text field
    (then they are its text, a name holds `q`: `/q_proj`, or close it) and wait with the rest;
    `opens_text` open a text field once the tabs are there (the filter, go to param, the palette,
    the selection file's and the comparison's path), `dialogs` those that open a dialog with a
    text field whatever has the focus (its field gets it once the dialog is mounted)."""

    leave_unless_typing: frozenset[str]
    opens_text: frozenset[str]
    dialogs: frozenset[str]
    focus_now: frozenset[str]  # the filter's: moves the focus as the app reads it (priority)

    def typing_after(self, typing: bool, key: events.Key) -> bool:
        """Whether a text field has the keys after `key` (`typing`: it had `key`)."""
        if key.key in CLOSES_TEXT:
            return False
        return typing or key.key in self.opens_text

    def typing_text(self, keys: list[events.Key], typing: bool = False) -> bool:
        """Whether `keys`, acted on in order, end in a text field."""
        for key in keys:
            typing = self.typing_after(typing, key)
        return typing

    def ends_batch(self, typing: bool, key: events.Key) -> bool:
        """Whether the keys after `key` wait for what it does to be drawn: it leaves a text
        field, opens a dialog, or acts outside a text field (a tab key focuses its table after a
        refresh, enter moves from the filter to the table by a message the filter sends, `s`
        opens a dialog). Only the filter's key moves the focus as the app reads it."""
        if key.key in CLOSES_TEXT or key.key in self.dialogs:
            return True
        return key.key not in self.focus_now and not typing


def ahead_keys(quit_: Binding, filter_: Binding, text: list[Binding], dialogs: list[Binding],
               palette: str) -> AheadKeys:
    """AheadKeys of the app's bindings: `quit_` (and escape) leave unless typing; `filter_`,
    `text`, `dialogs` and the command palette's key (`palette`) open a text field."""
    def keys(*bindings: Binding) -> frozenset[str]:
        return frozenset(k.strip() for b in bindings for k in b.key.split(","))
    dialog_keys = keys(*dialogs) | {palette}
    return AheadKeys(keys(quit_) | {"escape"}, keys(filter_, *text) | dialog_keys, dialog_keys,
                     keys(filter_))


def outlived(worker: Worker, work: Callable[[], T], poll: float = 0.05) -> T | None:
    """`work()`, run in a daemon thread while `worker`'s thread waits for it; None at once when
    `worker` is cancelled meanwhile (the app ends: Textual's thread workers are threads of the
    event loop's executor, which the exit waits for, so `q` waited for the whole open). `work`
    only reads: left running, it holds nothing the exit needs. It runs in this thread's context
    (the worker's: `get_current_worker()` and posting messages work there too)."""
    done = threading.Event()
    out: list = []

    def run() -> None:
        try:
            out.append((True, work()))
        except BaseException as error:  # handed to the worker, which reports it
            out.append((False, error))
        finally:
            done.set()

    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(run,), daemon=True,
                     name=f"{worker.name or 'worker'} (outlived)").start()
    while not done.wait(poll):
        if worker.is_cancelled:
            return None
    ok, value = out[0]
    if not ok:
        raise value
    return value


class TypeAhead:
    """Mixed into the app (before App): keys typed while a checkpoint is read (`reading`, from
    `start_reading` until `shown_read` or `read_failed`) are kept and replayed once its tabs are
    shown (a `/` and the words behind it, `2`, `t`, `o` ... were lost: every key acted on a
    loading screen where nothing was bound); q, escape, ctrl+c and ctrl+q leave at once
    (`leave_reading`). Replayed as typed, a batch at a time: the keys after one that moves the
    focus or opens a dialog wait until the screen has drawn it (`ends_batch`). The app gives
    `ahead_keys` (made from its bindings)."""

    ahead_keys: AheadKeys

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reading = False
        self._ahead: list[events.Key] = []  # typed while reading (or replaying), not acted on
        self._replaying: list[events.Key] = []  # posted again, not yet come back
        self._typing = False  # whether a text field has the keys after those replayed

    def start_reading(self) -> None:
        self.reading = True
        self._typing = False

    def shown_read(self) -> None:
        """The tabs of what was read are mounted: the keys typed meanwhile go to them."""
        self.reading = False
        self.call_after_refresh(self.replay_ahead)

    def read_failed(self) -> None:
        """The reading failed (its error is on screen): the keys were meant for tabs that never
        came (`v` and `q` act on the error screen as usual)."""
        self.reading = False
        self._ahead.clear()

    async def on_event(self, event: events.Event) -> None:
        if not isinstance(event, events.Key) or event.is_forwarded:  # (not one bubbling back)
            await super().on_event(event)
            return
        replayed = any(event is k for k in self._replaying)
        if replayed:
            self._replaying = [k for k in self._replaying if k is not event]
        if self.reading:
            if replayed or not self.leaves(event):  # (`v` replayed: the rest waits again)
                self._ahead.append(event)
            return
        if not replayed and (self._ahead or self._replaying):  # the keys typed ahead go first
            self._ahead.append(event)
            return
        await super().on_event(event)
        if replayed and not self._replaying:  # a batch done: the next once it is drawn (what
            # it does after a refresh, as focusing a tab's table, is asked for in its widgets'
            # turn: after the app's own next refresh)
            self.call_after_refresh(self.call_after_refresh, self.replay_ahead)

    def leaves(self, key: events.Key) -> bool:
        """Leave at once (True) on a key that leaves, unless it is meant for a text field."""
        keys = self.ahead_keys
        if key.key in LEAVE or (key.key in keys.leave_unless_typing and
                                not keys.typing_text(self._ahead)):
            self.call_later(self.leave_reading, key.key)
            return True
        return False

    async def leave_reading(self, key: str) -> None:
        """Quit; escape while `v` reads the files again goes back to the tabs read before."""
        view = self.view
        if key != "escape" or view is None:
            self.exit()
        elif self.reading:  # (not if the new tabs came meanwhile)
            self.workers.cancel_group(self, "load")
            await self.main.show_inspection(view)
            self.shown_read()
            self.notify("reading again cancelled: these are the tabs read before", timeout=3)

    def replay_ahead(self) -> None:
        """Post the next batch of the keys typed ahead again, once the tabs take keys."""
        if self.reading or self._replaying or not self._ahead:
            return
        if self.browsing is None:  # the tabs are still being mounted
            self.call_after_refresh(self.replay_ahead)
            return
        while self._ahead:
            key = self._ahead.pop(0)
            again = events.Key(key.key, key.character)
            self._replaying.append(again)
            self.post_message(again)
            typing, self._typing = self._typing, self.ahead_keys.typing_after(self._typing, key)
            if self.ahead_keys.ends_batch(typing, key):
                return
