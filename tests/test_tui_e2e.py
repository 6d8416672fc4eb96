"""`zinspect PATH` in a real pseudo-terminal: the CLI opens the app, which draws, then quits on q."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from conftest import FIXTURES, REPO


def read_until(fd: int, needle: bytes, seconds: float, stop=lambda: False) -> bytes:
    """Read the terminal until `needle` shows up or `stop()` (a hang guard, not a timing
    assertion). Reading also keeps the app from blocking on a full terminal buffer."""
    seen = b""
    deadline = time.monotonic() + seconds
    while needle not in seen and not stop() and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


def spawn_in_pty(args: list[str]) -> tuple[subprocess.Popen, int]:
    """`python ARGS` (e.g. ["-m", "zinspect", PATH]) on a 120x36 pty: (process, the pty's fd)."""
    main, child = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "36"}
    proc = subprocess.Popen([sys.executable, *args], stdin=child, stdout=child, stderr=child,
                            cwd=REPO, env=env, close_fds=True)
    os.close(child)
    return proc, main


def test_the_cli_opens_the_app_and_q_quits():
    proc, main = spawn_in_pty(["-m", "zinspect", str(FIXTURES / "s3_w4_bf16")])
    try:
        screen = read_until(main, b"Overview", 60)
        assert b"Overview" in screen, screen[-2000:]
        screen += read_until(main, b"zero_pp_rank_3", 30)
        assert b"zero_pp_rank_3" in screen  # the files table of the overview was drawn
        os.write(main, b"q")
        read_until(main, b"\x00never", 30, stop=lambda: proc.poll() is not None)  # keep draining
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
