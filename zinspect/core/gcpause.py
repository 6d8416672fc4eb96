"""The cyclic garbage collector paused while checkpoints are read (`gc_paused`)."""

from __future__ import annotations

import contextlib
import gc
import threading

_gc_lock = threading.Lock()
_gc_state = {"readers": 0, "was_enabled": False, "keep_frozen": False}


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off while pickles are read or a checkpoint is opened
    (nested and from several threads): a reader builds millions of objects and no cycles, and
    the collector's passes over them cost as much as the unpickling itself (1.9 s instead of
    3.1 s here). Reference counting still frees everything that is dropped.

    When the collector is turned back on, the objects built meanwhile are moved straight to
    the oldest generation (gc.freeze() then gc.unfreeze(): two list splices) instead of being
    walked by the next young collection (0.3-0.5 s at 297k names). Cyclic garbage made while
    paused is then freed by the next full collection instead: there is little (59 objects at
    297k names, since `plain` clears its memo; before that, the whole parsed model states).
    Not when something is frozen already (the app freezes a loaded checkpoint): gc.unfreeze()
    would give all of it back to the collector, whose full passes over it pause the UI."""
    with _gc_lock:
        if not _gc_state["readers"]:
            _gc_state["was_enabled"] = gc.isenabled()
            _gc_state["keep_frozen"] = gc.get_freeze_count() > 0
            gc.disable()
        _gc_state["readers"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_state["readers"] -= 1
            if not _gc_state["readers"] and _gc_state["was_enabled"]:
                if not _gc_state["keep_frozen"]:
                    gc.freeze()
                    gc.unfreeze()
                gc.enable()
