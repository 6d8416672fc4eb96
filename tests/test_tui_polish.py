"""The app at 80 and 160 columns and what it shows of every file and name (issue 14 leftovers):
names get the table's width (cut in their middle), paths are cut in the middle, the merge
form's checkboxes are whole, every Files status says what the findings say, buffers are listed
and excludable, the group column is the optimizer's param group, and the tree keeps what is
open across `t` and a sort chosen in the table. Real fixtures and damaged copies of them."""

from __future__ import annotations

import shutil
from contextlib import suppress
from pathlib import Path

import pytest
from damage import malicious_pickle
from textual.widget import Widget
from textual.worker import WorkerFailed

from zinspect.tui.app import ZinspectApp
from zinspect.tui.screens.param_detail import ParamDetailScreen
from zinspect.tui.text import middle
from zinspect.tui.widgets.param_table import ParamTable
from zinspect.tui.widgets.param_tree import ParamTree

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
SAMPLE = TESTS.parent / "zinspect" / "sample"


async def settle(app: ZinspectApp, pilot) -> None:
    with suppress(WorkerFailed):
        await app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.pause()


def drawn(widget: Widget) -> list[str]:
    """The lines of `widget` as drawn on its screen (borders included)."""
    r = widget.region
    strips = widget.screen._compositor.render_strips()
    return [strip.crop(r.x, r.right).text for strip in strips[r.y:r.bottom]]


def expanded(tree: ParamTree) -> set[str]:
    out, stack = set(), list(tree.root.children)
    while stack:
        node = stack.pop()
        if node.is_expanded:
            out.add(node.data.path)
            stack.extend(node.children)
    return out


def test_middle_keeps_both_ends():
    name = "model.layers.31.self_attn.q_proj.weight"
    assert middle(name, 100) == name
    cut = middle(name, 20)
    assert len(cut) == 20 and cut.startswith("model.") and cut.endswith("proj.weight")
    assert "…" in cut


async def test_names_get_the_width_before_numbers_at_80_columns():
    """At 80 columns every name of the sample is whole (the table used to keep 24 columns
    for it, `encoder.blocks.0.attn.p…`, while numel/size/group kept theirs)."""
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("2", "t")
        table = app.screen.query_one(ParamTable)
        lines = drawn(table)
        for i, name in enumerate(table.names[:len(lines) - 1]):
            assert f" {name} " in lines[i + 1], (name, lines[i + 1])
        assert "numel" in lines[0]


async def test_a_narrow_table_cuts_names_in_the_middle():
    """At 46 columns names must be cut: their ends (.weight / .bias) stay, the middle goes."""
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=(46, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("2", "t")
        table = app.screen.query_one(ParamTable)
        lines = drawn(table)
        assert "group" not in lines[0] and "dtype" not in lines[0]  # made way for names
        rows = [line for line in lines[1:] if line.strip()[:1].isalpha()]
        long = [(i, n) for i, n in enumerate(table.names[:len(rows)]) if n not in rows[i]]
        assert long  # some are cut ...
        for i, name in long:  # ... keeping their ends
            assert "…" in rows[i] and f".{name.rsplit('.', 1)[-1]} " in rows[i], rows[i]
        assert table.virtual_size.width <= table.scrollable_content_region.width  # no h-scroll


async def test_the_overview_path_is_cut_in_its_middle_at_80_columns(tmp_path):
    deep = tmp_path / "a_directory_with_a_rather_long_name" / "and_another_one_below_it"
    shutil.copytree(SAMPLE, deep / "sample")
    app = ZinspectApp(str(deep / "sample"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        body = app.screen.query_one("#overview-body")
        path_line = next(line for line in drawn(body) if line.strip().startswith("path"))
        assert "…" in path_line and path_line.rstrip().endswith("sample/global_step2")
        assert path_line.split()[1].startswith(str(tmp_path)[:8])


async def test_the_merge_forms_checkboxes_are_whole_at_160_and_80_columns(tmp_path):
    shutil.copytree(FIXTURES / "s2_w2_bf16", tmp_path / "ckpt")
    next((tmp_path / "ckpt" / "global_step2").glob("*rank_1_*optim*")).unlink()
    for size in ((160, 48), (80, 24)):
        app = ZinspectApp(str(tmp_path / "ckpt"))
        async with app.run_test(size=size) as pilot:
            await settle(app, pilot)
            await pilot.press("m")
            await pilot.pause()
            for box, label in (("#merge-salvage", "salvage: skip params that cannot be rebuilt"),
                               ("#merge-force", "overwrite an existing output")):
                assert label in "".join(drawn(app.screen.query_one(box))), (size, box)


async def test_files_list_a_missing_file_and_an_unsafe_pickle_is_not_ok(tmp_path):
    root = malicious_pickle(tmp_path, tmp_path / "marker")
    next((root / "global_step2").glob("*rank_3_*optim*")).unlink()
    app = ZinspectApp(str(root))
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        lines = drawn(app.screen.query_one("#overview-body"))
        model = next(line for line in lines if " mp_rank_00_model_states.pt" in line)
        assert "unsafe-pickle" in model and "error" in model and " ok" not in model
        missing = [line for line in lines if "missing: missing-optim" in line]
        assert len(missing) == 1 and missing[0].split()[:2] == ["3", "optim"]
    assert not (tmp_path / "marker").exists()


async def test_buffers_are_listed_opened_and_excluded_like_params():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        buffers = list(app.view.ckpt.buffers)
        assert "bn.running_mean" in buffers
        await pilot.press("2")
        tree = app.screen.query_one(ParamTree)
        assert "3 buffers" in str(next(n for n in tree.root.children if n.data.path == "bn").label)
        await pilot.press("t")
        table = app.screen.query_one(ParamTable)
        assert set(buffers) <= set(table.names)
        table.cursor = table.names.index("bn.running_mean")
        before = app.view.output
        await pilot.press("space")
        assert "bn.running_mean" in app.view.excluded
        assert app.view.output.buffers == before.buffers - 1
        assert app.view.output.nbytes == before.nbytes - 15 * 4
        assert app.view.marks(app.view.names.index("bn.running_mean")) == "xB  "
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ParamDetailScreen)
        facts = "".join(drawn(app.screen.query_one("#param-facts")))
        assert "buffer" in facts and "excluded" in facts
        assert not app.screen.query_one("#fragment-table").display
        await pilot.press("escape", "t")
        await pilot.pause()
        assert tree.cursor_node.data.path == "bn.running_mean"
        await pilot.press("shift+left")  # up to the bn module: space excludes its params and buffers
        assert tree.cursor_node.data.path == "bn"
        await pilot.press("space")
        assert {"bn.weight", "bn.running_mean", "bn.num_batches_tracked"} <= app.view.excluded


async def test_the_group_column_is_the_optimizers_param_group_not_the_zero3_sub_group():
    app = ZinspectApp(str(FIXTURES / "s3_w3_fp16_sub"))
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        params = app.view.ckpt.params
        assert any(p.sub_group != p.group for p in params.values())  # sub-groups split groups
        await pilot.press("2", "t")
        table = app.screen.query_one(ParamTable)
        for i, name in enumerate(table.names):
            p = params.get(name)
            assert table.row_cells(i)[-1] == ("" if p is None or p.group is None else str(p.group))


async def test_t_and_a_sort_chosen_in_the_table_keep_the_trees_open_modules():
    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        await pilot.pause()
        tree = app.screen.query_one(ParamTree)
        assert tree.cursor_node.data.path == "embed"
        await pilot.press("down", "enter", "down", "down", "enter")  # encoder, encoder.blocks
        await pilot.pause()
        opened = expanded(tree)
        assert opened == {"encoder", "encoder.blocks"}
        await pilot.press("t", "o", "o", "t")  # the table, sorted by name then size, the tree
        assert expanded(tree) == opened
        # the table's row is where the tree comes back to
        await pilot.press("t")
        table = app.screen.query_one(ParamTable)
        table.cursor = table.names.index("encoder.blocks.1.mlp.down.bias")
        await pilot.press("t")
        await pilot.pause()
        assert tree.cursor_node.data.path == "encoder.blocks.1.mlp.down.bias"


async def test_compare_says_nan_and_inf_as_stats_and_the_deep_check_do(tmp_path):
    import torch
    from safetensors.torch import save_file

    from zinspect.tui.screens.diff import DiffScreen

    ckpt = FIXTURES / "s2_w2_fp32_plain"
    sd = {k: v.clone() for k, v in torch.load(ckpt / "reference_fp32.pt").items()}
    sd["encoder.cube"][0, 0, 0] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    app = ZinspectApp(str(ckpt))
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        app.compare_with(str(tmp_path / "nan.safetensors"))
        await settle(app, pilot)
        assert isinstance(app.screen, DiffScreen)
        summary = str(app.screen.query_one("#diff-summary").content)
        assert "DIFFERENT" in summary and "NaN/Inf in 1 param(s)" in summary
        assert [f.code for f in app.screen.result.findings()] == ["nan-values"]


async def test_statistics_become_columns_of_the_parameter_table():
    """Issue 13: once `a` computed them, L2 / max|x| / NaN-Inf are columns of the table (equal
    to torch's on the reference); a reload drops them."""
    import torch

    from zinspect.tui.screens.stats import StatisticsScreen

    name = "s3_w2_fp32"
    ref = torch.load(FIXTURES / name / "reference_fp32.pt")
    app = ZinspectApp(str(FIXTURES / name))
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        await pilot.press("2", "t")
        table = app.screen.query_one(ParamTable)
        assert "L2" not in [c.label for c in table.columns]
        await pilot.press("a")
        await settle(app, pilot)
        assert isinstance(app.screen, StatisticsScreen)
        await pilot.press("escape")
        await pilot.pause()
        labels = [c.label for c in table.columns]
        assert labels[-3:] == ["L2", "max|x|", "NaN/Inf"]
        assert "L2" in drawn(table)[0]
        for i, pname in enumerate(table.names):
            if pname in ref and ref[pname].is_floating_point():
                l2 = float(table.row_cells(i)[labels.index("L2")])
                assert l2 == pytest.approx(ref[pname].double().norm().item(), rel=1e-3), pname
        await pilot.press("v")
        await settle(app, pilot)
        table = app.screen.query_one(ParamTable)
        assert "L2" not in [c.label for c in table.columns]


async def test_the_layer_norms_are_drawn_from_zero():
    """The sample's two layers' L2 norms are within 1% of each other: both bars reach the top
    (the Sparkline scaled min..max and drew the lower one as empty: a layer "out of line"
    that was not)."""
    from textual.widgets import Sparkline

    app = ZinspectApp(str(SAMPLE))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("a")
        await settle(app, pilot)
        spark = app.screen.query_one("#stats-layers", Sparkline)
        low, high = sorted(spark.data)
        assert 0.99 < low / high < 1
        lines = drawn(spark)
        assert len(lines) == 3 and " " not in lines[0], lines  # every bar reaches the top row


@pytest.mark.parametrize(("fixture", "said"), [
    ("z0_bf16", "19 params + 1 buffer"),  # was `1 buffers` (the tree said it right)
    ("moe_ep2_w4_s2_fp32", "47 params"),  # no buffers: was `+ 0 buffers` beside `47 params`
])
async def test_params_and_buffers_are_counted_in_words(fixture, said):
    """The status line, the output summary and the merge plan say the counts as the tree does."""
    app = ZinspectApp(str(FIXTURES / "parallel" / fixture))
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        await pilot.pause()
        status = "".join(drawn(app.screen.query_one("#output-summary")))
        assert f"{said} · sort" in status and f"output: {said}, " in status, status
        assert "1 buffers" not in status and "0 buffers" not in status
        await pilot.press("m")
        await pilot.pause()
        plan = "".join(drawn(app.screen.query_one("#merge-plan")))
        assert f"Writes {said}, " in plan and "0 buffers" not in plan, plan


async def test_the_header_cuts_a_long_path_in_its_middle_and_keeps_it_cut_after_a_resize(tmp_path):
    """The header's subtitle is the checkpoint's path: at 80 columns its end (the checkpoint's
    name) was cut off (`…/parallel/moe_ep2_w4_…`); it gives up its middle instead."""
    deep = tmp_path / "a_directory_with_a_rather_long_name" / "and_another_one_below_it"
    shutil.copytree(SAMPLE, deep / "my_checkpoint")
    app = ZinspectApp(str(deep / "my_checkpoint"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        from textual.widgets import Header

        header = "".join(drawn(app.screen.query_one(Header))).rstrip()
        assert header.endswith("…/my_checkpoint") or "…" in header and \
            header.endswith("my_checkpoint"), header
        assert "zinspect · global_step2 — " in header
        await pilot.resize_terminal(120, 24)
        await pilot.pause()
        wide = "".join(drawn(app.screen.query_one(Header))).rstrip()
        assert wide.endswith("my_checkpoint") and len(wide) > len(header), wide


async def test_a_universal_checkpoints_ranks_tab_says_it_has_no_rank_partitions():
    """A universal checkpoint keeps every param's states whole under zero/: its Ranks tab said
    "1 layer/expert files", rank 1 "ok (a replica: not saved)" and 0 elements held per rank."""
    from zinspect.tui.widgets.ranks_pane import RanksPane

    app = ZinspectApp(str(FIXTURES / "universal" / "s2_w2_bf16"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("3")
        await pilot.pause()
        shown = "\n".join(drawn(app.screen.query_one(RanksPane)))
        assert "universal checkpoint" in shown and "zero/" in shown, shown
        assert "replica" not in shown and "layer/expert" not in shown
        app.screen.query_one(RanksPane).show_rank(0)  # a finding's rank: nothing to show, no error


#: every committed checkpoint fixture (plain, parallel, tp_extra, optim, ...; universal ones
#: have no manifest)
ALL_FIXTURES = sorted([p.parent for p in FIXTURES.glob("**/manifest.json")] +
                      [p.parent for p in FIXTURES.glob("universal/*/latest_universal")])


def test_every_fixtures_layout_has_a_name_in_the_overview():
    """A layout the app has no words for was shown by its code name (`pipeline_tp`)."""
    from zinspect.core import open_checkpoint
    from zinspect.tui.widgets.overview import LAYOUT_NAMES

    layouts = {open_checkpoint(p).layout for p in ALL_FIXTURES}
    assert {"pipeline_tp", "tensor_parallel_zero0", "moe", "universal"} <= layouts
    assert layouts <= set(LAYOUT_NAMES), layouts - set(LAYOUT_NAMES)


async def test_a_layer_file_says_its_stage_in_the_files_table():
    """Layer files carry the stage that owns the layer now (pipeline layouts): the Files table
    says `pp 1 layer 5` (it left pp out: it used to be 0 for every layer file)."""
    from zinspect.core import open_checkpoint

    path = FIXTURES / "parallel" / "pp2_dp2_s1_fp32"
    stage = {f.name: f.coords.pp for f in open_checkpoint(path).files if f.kind == "layer"}
    assert set(stage.values()) == {0, 1}
    app = ZinspectApp(str(path))
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        body = "\n".join(drawn(app.screen.query_one("#overview-body")))
        for name, pp in stage.items():
            row = next(line for line in body.splitlines() if name in line)
            layer = int(name.split("_")[1].split("-")[0])
            assert f"pp {pp} layer {layer}" in row, row


async def test_no_groups_no_empty_partition_matrix():
    """A checkpoint whose groups could not be described (an unsupported layout) drew the
    'Partition elements per rank × group' heading over a matrix with no group column."""
    from zinspect.tui.widgets.ranks_pane import GroupMatrix, RankGrid, RanksPane

    app = ZinspectApp(str(FIXTURES / "parallel" / "z0_fp32"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        pane = app.screen.query_one(RanksPane)
        assert pane.query(GroupMatrix)  # groups: the matrix
        pane.ckpt.groups = []
        await pane.recompose()
        await pilot.pause()
        assert pane.query(RankGrid) and not pane.query(GroupMatrix)
        assert "Partition elements" not in "\n".join(drawn(pane))


async def test_a_non_adam_optimizer_view_leaves_out_the_update_columns():
    """SGD has no update size and no √v: 'upd max', 'upd mean' and 'L2 √v' were columns of '-'
    at 80 columns while its momentum_buffer ('L2 m') was left out for want of room."""
    from zinspect.tui.screens.optimizer import OptimizerTable

    app = ZinspectApp(str(FIXTURES / "optim" / "sgd_s2_w2_fp32"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("p")
        await settle(app, pilot)
        header = drawn(app.screen.query_one(OptimizerTable))[0]
        assert "L2 m " in header and "L2 master" in header and "max|x|" in header, header
        assert "upd" not in header and "√v" not in header
        await pilot.press("o")  # the next sort skips the columns left out
        await pilot.pause()
        assert "upd" not in app.screen.sub_title


def test_a_pipelines_layers_are_its_leading_indices():
    """PipelineModule names start with the layer index (`3.up.weight`): the per-layer L2 line
    was missing for every pipeline checkpoint (only `.N.` inside a name counted)."""
    from zinspect.core import open_checkpoint
    from zinspect.core.stats import TensorStats
    from zinspect.tui.screens.stats import layer_norms

    names = list(open_checkpoint(FIXTURES / "parallel" / "pp2_dp2_s1_fp32").params)
    stats = [TensorStats(n, "float32", (1,), 1, sumsq=4.0) for n in names]
    layers = [i for i, _ in layer_norms(stats)]
    assert layers == sorted({int(n.split(".")[0]) for n in names if n.split(".")[0].isdigit()})
    assert len(layers) >= 2
    assert [i for i, _ in layer_norms([TensorStats("model.layers.7.mlp.w", "float32", (1,), 1,
                                                   sumsq=1.0)])] == [7]
