"""300k parameter names in the real app on a real pseudo-terminal: the tabs come, a filter typed
at full speed ends on the last key's rows, a sort and the tree still answer, and q quits.

The checkpoint is synthetic metadata (tests/test_tui_scale.py), handed to the real app in place
of the loaded one; everything else (the terminal, the workers, the drawing) is the app's own.
"""

from __future__ import annotations

from conftest import FIXTURES
from test_tui_pty_flows import ESCAPE, PtyApp

#: the app as `zinspect PATH` runs it, on the synthetic 300k-name checkpoint
SCALE_APP = """
import sys
sys.path.insert(0, {tests!r})
from test_tui_scale import synthetic_checkpoint
from zinspect.tui import app
ckpt = synthetic_checkpoint()
app.load_checkpoint = lambda path, tag=None, progress=None: ckpt
app.validate = lambda c: c.findings
from zinspect.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_300k_names_filter_typed_fast_sort_and_tree_in_the_terminal(tmp_path):
    code = SCALE_APP.format(tests=str(FIXTURES.parent))
    app = PtyApp([str(FIXTURES / "s2_w2_bf16")], cwd=tmp_path, size=(80, 24), code=code)
    try:
        app.wait_for("Overview", "316,801")  # the Contents counts
        app.wait_for("Findings (0)")  # validated once the tabs were drawn
        app.press("2")
        app.wait_for("model  316,801 params")
        app.press("/experts.63. w3")  # one write: the filter gets every key typed behind `/`
        shown = app.wait_for("1,600 of 316,801 match")
        assert "mlp.e…s.63.w3.weight" in shown or ".63.w3.weight" in shown
        app.press("\x7f" * 3)  # backspace: "experts.63." is wider again
        app.wait_for("4,800 of 316,801 match")
        app.press(ESCAPE)
        shown = app.wait_for("316,801 params · sort: model")
        assert "0 (0 Bytes)" in shown  # nothing excluded: no key went to the tree (its space)
        app.press("t")
        app.wait_for("model.embed_tokens.weight")
        app.press("o")  # by name: 307k names sorted by a worker
        app.wait_for("sort: name")
        app.press("t")
        app.wait_for("model  316,801 params")
        assert app.quit() == 0
    finally:
        app.close()
