"""Keys typed while the real app reads a checkpoint, on a real pseudo-terminal: they act on the
tabs once shown (they were lost), and q leaves at once, without waiting for the reading (the
process waited for its thread: seconds at 300k names). The reading is held until a file
appears; everything else is the app's own."""

from __future__ import annotations

import time

import pytest
from conftest import FIXTURES
from test_tui_pty_flows import ESCAPE, STEP, PtyApp

#: `zinspect PATH` whose reading waits until the file {flag} exists
HELD_APP = """
import os, sys, time
from zinspect.tui import app
real = app.load_checkpoint
def held(*args, **kwargs):
    while not os.path.exists({flag!r}):
        time.sleep(0.02)
    return real(*args, **kwargs)
app.load_checkpoint = held
from zinspect.cli import main
sys.exit(main(sys.argv[1:]))
"""


def held_app(tmp_path, fixture: str = "s2_w2_bf16") -> tuple[PtyApp, object]:
    flag = tmp_path / "release"
    app = PtyApp([str(FIXTURES / fixture)], cwd=tmp_path, size=(120, 36),
                 code=HELD_APP.format(flag=str(flag)))
    try:
        app.wait_for("Reading", "quit")  # the loading screen, with its keys
    except AssertionError:
        app.close()
        raise
    return app, flag


@pytest.mark.parametrize(("fixture", "keys", "answer", "rows"), [
    # one write, as a paste or a fast typist
    ("s2_w2_bf16", "2/blocks.1 down", "2 of 31 match",
     ["encoder.blocks.1.mlp.down.weight", "encoder.blocks.1.mlp.down.bias"]),
    # q typed into the filter is its text, not quit
    ("hf_llama_s2_w2_bf16", "/q_proj", "2 of 21 match",
     ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]),
])
def test_keys_typed_while_reading_act_once_the_tabs_are_shown(tmp_path, fixture, keys, answer,
                                                             rows):
    app, flag = held_app(tmp_path, fixture)
    try:
        app.press(keys)
        time.sleep(0.3)
        assert "Reading" in app.shown() and app.proc.poll() is None
        flag.touch()
        shown = app.wait_for(answer)
        assert all(row in shown for row in rows)
        app.press(ESCAPE)
        app.wait_gone("match")
        assert app.quit() == 0
    finally:
        app.close()


def test_q_while_reading_quits_at_once_without_waiting_for_the_reading(tmp_path):
    for keys in ("q", "2\x03"):  # q; a tab key then ctrl+c
        app, flag = held_app(tmp_path)
        try:
            app.press(keys)
            start = time.monotonic()
            while app.proc.poll() is None and time.monotonic() - start < STEP:
                time.sleep(0.02)
            assert app.proc.poll() == 0, f"{keys!r} did not quit; the screen:\n{app.shown()}"
            assert not flag.exists()  # the reading never ended: the exit did not wait for it
        finally:
            app.close()
