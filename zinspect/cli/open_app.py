"""`zinspect PATH`: the terminal app, or the info summary when not on a terminal."""

from __future__ import annotations

import os
import sys

from zinspect.cli.common import open_checkpoint, readable_at_all
from zinspect.report import human_info


def run(args) -> int:
    from zinspect.core.discover import locate

    locate(args.path, args.tag)  # fail fast with exit 2 before starting the app
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            from zinspect.tui.app import run_app
        except ImportError as e:
            print(f"zinspect: the terminal app is not available ({e}); printing the summary",
                  file=sys.stderr)
        else:
            code = run_app(args.path, args.tag)
            # The app has ended and its workers have finished (a merge cleans up before the
            # app returns): skip freeing the checkpoint's objects, seconds at 300k params.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 0)
    ckpt = open_checkpoint(args)
    human_info(ckpt)
    return 0 if readable_at_all(ckpt) else 2
