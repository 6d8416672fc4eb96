"""`zinspect PATH`: the terminal app, or the info summary when not on a terminal."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from zinspect.cli.common import open_checkpoint, readable_at_all
from zinspect.core.discover import locate
from zinspect.errors import CheckpointNotFound
from zinspect.report import human_info


def run(args) -> int:
    on_terminal = sys.stdin.isatty() and sys.stdout.isatty()
    tags: list[str] = []
    try:
        locate(args.path, args.tag)  # fail fast with exit 2 before starting the app
    except CheckpointNotFound:
        if on_terminal and args.tag is None:  # several tags, no `latest`: the app asks which
            tags = tags_to_pick(args.path)
        if not tags:
            raise
    if on_terminal:
        try:
            from zinspect.tui.app import run_app
        except ImportError as e:
            if tags:
                raise CheckpointNotFound(f"{args.path}: has several tag dirs and no `latest`",
                                         f"pick one with --tag: {', '.join(tags)}") from e
            print(f"zinspect: the terminal app is not available ({e}); printing the summary",
                  file=sys.stderr)
        else:
            code = run_app(args.path, args.tag, tags)
            # The app has ended and its workers have finished (a merge cleans up before the
            # app returns): skip freeing the checkpoint's objects, seconds at 300k params.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 0)
    ckpt = open_checkpoint(args)
    human_info(ckpt)
    return 0 if readable_at_all(ckpt) else 2


def tags_to_pick(path: str | Path) -> list[str]:
    """The tag dirs of `path` when it has several and no `latest`, else [] (one tag, or
    `latest`, opens directly; anything else is an error the CLI reports)."""
    root = Path(path).expanduser()
    if not root.is_dir() or (root / "latest").exists():
        return []
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    for sub in subdirs:
        try:
            found = locate(sub)
        except CheckpointNotFound:
            continue
        if found.tag_dir == sub:  # a tag dir: its Location lists its siblings that are too
            return found.tags if len(found.tags) > 1 else []
    return []
