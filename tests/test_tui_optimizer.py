"""The optimizer view (`p`): driven with a Pilot on real fixtures (the numbers equal torch's
computations from torch.load of the optimizer files; sorting; enter; escape cancels; a failure
is shown in place) and once in a real terminal."""

from __future__ import annotations

import time

import pytest
from conftest import FIXTURES
from test_optimizer import close, expected
from test_tui_app import SIZE, settle

from zinspect.core import open_checkpoint
from zinspect.core.optimizer import read_optimizer
from zinspect.errors import MergeCancelled, UnreadableFile
from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens.optimizer import COLS, OptimizerScreen, OptimizerTable, column

torch = pytest.importorskip("torch")


def drawn(widget) -> list[str]:
    """The widget's lines as they are drawn now."""
    return [strip.text for strip in widget.render_lines(widget.region.reset_offset)]


def label_text(screen, selector: str) -> str:
    from textual.widgets import Label

    return str(screen.query_one(selector, Label).content)


async def open_view(app, pilot) -> OptimizerScreen:
    await settle(app, pilot)
    await pilot.press("p")
    await settle(app, pilot)
    assert isinstance(app.screen, OptimizerScreen)
    return app.screen


@pytest.mark.parametrize("name", ["s2_w4_fp16", "s1_w2_bf16_bf16opt", "s3_w2_fp32"])
async def test_view_numbers_equal_torch_and_sort_outliers_first(name):
    ckpt = open_checkpoint(FIXTURES / name)
    opt = read_optimizer(ckpt)
    want = expected(ckpt, opt)
    app = ZinspectApp(str(FIXTURES / name))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_view(app, pilot)
        head = label_text(screen, "#optim-summary")
        assert head.startswith("AdamW (") and ", step 2" in head.splitlines()[0]
        assert "group 2: lr 0.005, betas (0.9, 0.95), eps 1e-08, weight_decay 0" in head
        assert ("loss scale 256, dynamic" in head) == (name == "s2_w4_fp16")
        table = screen.query_one(OptimizerTable)
        assert table.row_count == len(want) and "no NaN or Inf" in label_text(screen, "#optim-facts")
        for row in table.rows:
            x, m, v = want[row.name]
            u = m.abs() / (v.sqrt() + 1e-8)
            assert close(row.master_l2, x.norm().item()) and close(row.exp_avg_l2, m.norm().item())
            assert close(row.sqrt_exp_avg_sq_l2, v.sqrt().norm().item())
            assert close(row.update_mean, u.mean().item()) and close(row.update_max, u.max().item())
            assert close(row.master_max_abs, x.abs().max().item())
        # drawn as the numbers say, largest update first
        def torch_max(name):
            _, m, v = want[name]
            return (m.abs() / (v.sqrt() + 1e-8)).max().item()

        cells = table.row_cells(0)
        assert close(torch_max(cells[0]), max(map(torch_max, want)))
        assert float(cells[column("upd max")]) == pytest.approx(table.rows[0].update_max, rel=1e-3)
        maxima = [r.update_max for r in table.rows]
        assert maxima == sorted(maxima, reverse=True)
        assert screen.sub_title == "sorted by upd max ↓"
        await pilot.click("#optim-table", offset=(2, 0))  # the name header: by name
        await pilot.pause()
        assert [r.name for r in table.rows] == sorted(want)
        for step in range(1, 4):  # o: the next columns, numbers largest first
            await pilot.press("o")
            await pilot.pause()
            values = [COLS[step].value(r) for r in table.rows]
            assert values == sorted(values, reverse=True)
            assert screen.sub_title == f"sorted by {COLS[step].column.label} ↓"
        await pilot.press("enter")  # that param's detail, escape comes back
        await pilot.pause()
        from zinspect.tui.screens.param_detail import ParamDetailScreen

        assert isinstance(app.screen, ParamDetailScreen) and app.screen.param_name == table.rows[0].name
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is screen
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, OptimizerScreen)


async def test_sgd_is_named_and_its_masters_and_momentum_shown():
    """Was: the masters' norms only. Now the 'L2 m' column holds SGD's momentum_buffer (the head
    says so); no update columns (they are Adam's)."""
    app = ZinspectApp(str(FIXTURES / "optim" / "sgd_s2_w2_fp32"))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_view(app, pilot)
        head = label_text(screen, "#optim-summary")
        assert head.startswith("SGD (momentum) (ZeRO-1/2)")
        assert "keeps no Adam moments (momentum_buffer): 'L2 m' is its momentum_buffer, no update" \
            in label_text(screen, "#optim-note")  # a sentence of its own, which may wrap
        table = screen.query_one(OptimizerTable)
        assert table.row_count == 25 and screen.sub_title == "sorted by L2 master ↓"
        assert table.row_cells(0)[column("upd max")] == "-"
        for i, r in enumerate(table.rows):
            assert r.states["momentum_buffer"] > 0 and table.row_cells(i)[column("L2 m")] != "-"


async def test_escape_cancels_the_reading(monkeypatch):
    from zinspect.core import optimizer_stats as module

    def slow(ckpt, opt, progress=None, should_stop=None):
        for step in range(2000):
            progress(step, 2000, "x")
            if should_stop():
                raise MergeCancelled("optimizer statistics cancelled", "nothing was changed")
            time.sleep(0.005)
        raise AssertionError("never cancelled")

    monkeypatch.setattr(module, "optimizer_stats", slow)
    app = ZinspectApp(str(FIXTURES / "s2_w2_fp32_plain"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("p")
        await pilot.pause(0.3)
        assert isinstance(app.screen, OptimizerScreen)
        assert "AdamW" in label_text(app.screen, "#optim-summary")  # the head came first
        await pilot.press("escape")
        await settle(app, pilot)
        assert not isinstance(app.screen, OptimizerScreen)


async def test_a_failure_is_shown_in_place_under_the_head(monkeypatch):
    from test_tui_app import text_of
    from textual.widgets import Static

    from zinspect.core import optimizer_stats as module

    def broken(ckpt, opt, progress=None, should_stop=None):
        raise UnreadableFile("zero_pp_rank_1_mp_rank_00_optim_states.pt: cannot read",
                             "restore it from a copy")

    monkeypatch.setattr(module, "optimizer_stats", broken)
    app = ZinspectApp(str(FIXTURES / "s2_w2_fp32_plain"))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_view(app, pilot)
        shown = text_of(screen.query_one("#optim-error", Static))
        assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: cannot read" in shown
        assert "restore it from a copy" in shown and "AdamW" in label_text(screen, "#optim-summary")
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, OptimizerScreen)


async def test_key_in_help_and_palette():
    from zinspect.tui.commands import ActionCommands
    from zinspect.tui.screens.help import HelpScreen

    app = ZinspectApp(str(FIXTURES / "s2_w2_fp32_plain"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert any(b.id == "optimizer" and b.key == "p" for b, _ in ActionCommands(app.screen).actions())
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        from test_tui_app import text_of
        from textual.widgets import Static

        help_text = text_of(app.screen.query_one(Static))
        assert "Optimizer" in help_text and "Adam's update size" in help_text


def test_the_view_in_a_real_terminal(tmp_path):
    """open -> p -> the head and the table drawn -> escape -> q quits."""
    from test_tui_pty_flows import ESCAPE, PtyApp

    app = PtyApp([str(FIXTURES / "s2_w4_fp16")], cwd=tmp_path)
    try:
        app.wait_for("Overview", "Findings (", "zero_pp_rank_1")
        app.press("p")
        screen = app.wait_for("upd max", "loss scale 256, dynamic", "sorted by upd max")
        assert "AdamW (ZeRO-1/2), step 2" in screen
        app.press(ESCAPE)
        app.wait_gone("upd max")
        app.wait_footer("Validate")
        assert app.quit() == 0
    finally:
        app.close()


async def test_a_blown_up_param_comes_first_and_is_marked(tmp_path):
    """A diverging run in miniature: one param's exp_avg_sq collapsed to ~0 on disk (its bytes
    rewritten in a copy), so its Adam update is huge. It is the first row, marked."""
    import struct

    from conftest import copy_fixture

    from zinspect.tui.screens.optimizer import OUTLIER

    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    ckpt = open_checkpoint(tag)
    victim = "encoder.blocks.1.mlp.up.bias"
    for f in ckpt.state_fragments(victim, "exp_avg_sq"):
        with open(tag / f.file, "r+b") as out:
            out.seek(f.offset)
            out.write(struct.pack(f"<{f.numel}f", *[1e-30] * f.numel))
    app = ZinspectApp(str(tag))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_view(app, pilot)
        table = screen.query_one(OptimizerTable)
        assert table.rows[0].name == victim and table.rows[0].update_max > 1e4
        assert table.cell_style(0, column("upd max")) == OUTLIER
        assert all(table.cell_style(i, column("upd max")) is None for i in range(1, table.row_count))


async def test_names_get_the_width_at_80_columns():
    """Issue 14.1 for this view: at 80 columns the names were cut to 20 cells at their end
    (`model.layers.0.self…` on every row); the later columns make way and names stay whole."""
    app = ZinspectApp(str(FIXTURES / "parallel" / "tp2_dp2_s2_llama_bf16_tied"))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_view(app, pilot)
        table = screen.query_one(OptimizerTable)
        longest = max(len(r.name) for r in table.rows)
        widths = table._widths()
        assert widths[column("name")] >= longest
        assert widths[column("upd max")] is not None and widths[column("upd mean")] is not None
        shown = [table.row_cells(i)[column("name")] for i in range(len(table.rows))]
        assert all(COLS[column("name")].column.fit(n, widths[column("name")]).rstrip() == n
                   for n in shown)


async def test_moe_group_lines_name_the_group_first_and_never_wrap_at_80_columns():
    """A MoE run's expert groups are told apart by their names (`ep_size_2`): each group is one
    line that starts with its name; at 80 columns the line was wrapped, `name` ending one line
    and `ep_size_2` starting the next, read as a group of its own."""
    app = ZinspectApp(str(FIXTURES / "parallel" / "moe_ep2_w4_s1_top2_res"))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_view(app, pilot)
        head = label_text(screen, "#optim-summary").splitlines()
        assert head[3].startswith("group 2 ep_size_2: lr 0.01, betas (0.9, 0.95)")
        lines = [line.strip() for line in drawn(screen.query_one("#optim-summary"))]
        assert len(lines) == len(head)  # no line wrapped into another
        assert lines[3].startswith("group 2 ep_size_2: lr 0.01")
        assert not any(line.startswith("ep_size") for line in lines)
