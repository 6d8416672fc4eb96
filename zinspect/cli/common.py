"""What every subcommand shares: the parser pieces, opening the checkpoint, JSON and error output,
Ctrl-C as a polite stop, and the progress bar. Imports stay lazy: `info --json` and
`validate --json` import neither torch, textual nor rich."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from zinspect.errors import ZinspectError
from zinspect.report import console


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def add_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH",
                   help="the checkpoint dir (holding `latest`) or one of its tag dirs")
    p.add_argument("--tag", metavar="TAG",
                   help="tag dir to read instead of the one `latest` names (e.g. global_step500)")


def open_checkpoint(args):
    from zinspect.core import open_checkpoint as open_ckpt

    return open_ckpt(args.path, args.tag)


def readable_at_all(ckpt) -> bool:
    """False when not one file of the tag dir could be parsed: nothing to show."""
    return any(f.readable for f in ckpt.files)


def unreadable(ckpt) -> int:
    from zinspect.core.fmt import shown

    print(f"zinspect: {shown(ckpt.path)}: no file in it can be read as a checkpoint file",
          file=sys.stderr)
    print("  hint: every file is damaged or not a torch.save file; `zinspect info` lists them",
          file=sys.stderr)
    return 2


def print_json(obj) -> None:
    """Indented for a terminal; compact when piped (json's C encoder: 4x faster at 300k params)."""
    indent = 1 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(obj, indent=indent, default=str))
    sys.stdout.write("\n")
    sys.stdout.flush()


def print_error(e: ZinspectError) -> None:
    """Message and hint with control characters escaped (they quote names, `latest`, pickle
    content); a line break inside becomes an indented line, never one that looks like ours."""
    from zinspect.core.fmt import shown

    lines = [shown(line, 600) for line in e.message.split("\n")]
    print("\n".join([f"zinspect: {lines[0]}"] + [
        line if line.startswith(" ") else "  " + line for line in lines[1:]]), file=sys.stderr)
    if e.hint:
        print(f"  hint: {shown(e.hint, 600)}", file=sys.stderr)


def silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def cancelled(what: str) -> ZinspectError:
    from zinspect.errors import MergeCancelled

    return MergeCancelled(f"{what} was cancelled", "nothing was written")


class Stop:
    """A should_stop() callable that turns the first SIGINT (Ctrl-C), SIGTERM (`timeout`, SLURM,
    systemd) or SIGHUP (the terminal closed) into a polite stop request; a second one interrupts
    at once. A MergeCancelled leaving the block then exits 128 + the signal's number (130, 143,
    129), as a shell reports a process killed by it."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if signum == signal.SIGINT:
            print("\nzinspect: stopping... (Ctrl-C again to abort at once)", file=sys.stderr)
        else:
            print(f"\nzinspect: {signal.Signals(signum).name} received, stopping...",
                  file=sys.stderr)

    def __enter__(self) -> Stop:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from zinspect.errors import MergeCancelled

        for sig, old in self._old.items():
            if old is not None:  # None: a handler not set from Python, nothing to restore
                signal.signal(sig, old)
        self._old = {}
        if isinstance(exc, MergeCancelled) and self.signum is not None:
            exc.exit_code = 128 + self.signum


class Bar:
    """A rich progress bar on stderr (bytes, rate, ETA, current name); update(done, total, name)
    is the progress callback of merge and deep_check. It appears only once the work has taken
    SHOW_AFTER seconds: a bar that would flash for a moment is noise (and rich costs an import)."""

    SHOW_AFTER = 0.3

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.progress = None
        self.task = None
        self.created = time.monotonic()

    def __enter__(self) -> Bar:
        return self

    def _start(self) -> None:
        """Created at the first update after SHOW_AFTER, so a merge refused up front prints no bar."""
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn(f"[bold]{self.label}[/]"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(),
            TextColumn("[dim]{task.fields[name]}[/]"),
            console=console(stderr=True), transient=False)
        self.progress.__enter__()
        self.task = self.progress.add_task(self.label, total=self.total or None, name="")

    def update(self, done: int, total: int, name: str = "") -> None:
        if self.progress is None:
            if time.monotonic() - self.created < self.SHOW_AFTER:
                return
            self._start()
        from rich.markup import escape

        from zinspect.core.fmt import shown

        name = escape(shown(name, 48))
        self.progress.update(self.task, completed=done, total=total or None, name=name)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
