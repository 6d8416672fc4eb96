"""The app on every parallel layout (issue 10): the overview says the topology (pp x tp x dp x ep)
and the features, the Ranks tab is a grid over the axes with a status per cell, a param's detail
says which tp rank holds which rows or columns, which stage and which expert-parallel rank.
Real DeepSpeed fixtures (tests/fixtures/parallel), damaged copies, and 512 synthetic ranks."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from test_tui_polish import drawn, settle
from test_tui_scale import serve

from zinspect.core.model import Checkpoint, Coords, Param, ParamGroup, RankFile, Topology
from zinspect.tui.app import ZinspectApp
from zinspect.tui.widgets.overview import files_table
from zinspect.tui.widgets.ranks_pane import RankGrid

PARALLEL = Path(__file__).parent / "fixtures" / "parallel"
#: (pp, tp, dp, ep) as the generators were asked for them (the fixture names say so)
TOPOLOGY = {
    "hpz_s3_w4": (1, 1, 4, 1), "offload_s3_w2": (1, 1, 2, 1),
    "moe_ep2_w4_s1_top2_res": (1, 1, 4, 2), "moe_ep2_w4_s2_fp32": (1, 1, 4, 2),
    "pp2_dp1_s0_bf16": (2, 1, 1, 1), "pp2_dp2_s1_bf16_pmd": (2, 1, 2, 1),
    "pp2_dp2_s1_fp32": (2, 1, 2, 1), "pp3_dp1_s0_fp32": (3, 1, 1, 1),
    "tp2_dp2_s1_toy": (1, 2, 2, 1), "tp2_dp2_s2_llama_bf16_tied": (1, 2, 2, 1),
    "tp2_dp2_s2_toy": (1, 2, 2, 1), "tp2_dp2_s3_toy": (1, 2, 2, 1),
    "z0_bf16": (1, 1, 2, 1), "z0_fp16": (1, 1, 2, 1), "z0_fp32": (1, 1, 2, 1),
}
FEATURES = {"hpz_s3_w4": "ZeRO++ hpZ", "offload_s3_w2": "CPU offload"}
SIZE = (120, 36)


@pytest.mark.parametrize("name", sorted(TOPOLOGY))
async def test_overview_topology_and_a_ranks_grid_cell_per_rank(name):
    pp, tp, dp, ep = TOPOLOGY[name]
    app = ZinspectApp(str(PARALLEL / name))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        overview = "\n".join(drawn(app.screen.query_one("#overview-body")))
        assert f"pp {pp} × tp {tp} × dp {dp} × ep {ep}" in overview
        if name in FEATURES:
            assert f"features        {FEATURES[name]}" in overview
        else:
            assert "features" not in overview
        await pilot.press("3")
        grid = app.screen.query_one("#rank-table", RankGrid)
        assert grid.row_count == pp * tp * dp
        cells = [(c.pp, c.tp, c.dp) for c in grid.cells]
        assert cells == [(p, t, d) for p in range(pp) for t in range(tp) for d in range(dp)]
        statuses = [grid.row_cells(i)[-1] for i in range(grid.row_count)]
        assert all(s.startswith("ok") for s in statuses), statuses
        if name.startswith(("tp", "pp", "moe")) and "_s0_" not in name:
            assert all(c.held and c.groups == c.slice_groups for c in grid.cells)
            header = drawn(grid)[0].split()
            assert header[:len(grid.axes)] == grid.axes


async def test_a_missing_tp_rank_file_is_its_cell_and_only_its_cell(tmp_path):
    shutil.copytree(PARALLEL / "tp2_dp2_s2_toy", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "global_step2" / "zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()
    app = ZinspectApp(str(tmp_path / "ckpt"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("3")
        grid = app.screen.query_one("#rank-table", RankGrid)
        status = {(c.tp, c.dp): grid.row_cells(i)[-1] for i, c in enumerate(grid.cells)}
        assert status.pop((1, 1)) != "ok"
        assert set(status.values()) == {"ok"}, status
        console = Console(width=160, record=True, file=io.StringIO())
        console.print(files_table(app.view))  # the Overview's Files table
        files = [line for line in console.export_text().splitlines() if "missing:" in line]
        assert len(files) == 1 and files[0].split()[1] == "optim", files
        assert "zero_pp_rank_1_mp_rank_01_optim_states.pt" in files[0]


async def test_param_detail_says_which_tp_rank_holds_which_rows_or_columns():
    app = ZinspectApp(str(PARALLEL / "tp2_dp2_s1_toy"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        expect = {
            "model.layers.0.mlp.gate_up_proj.weight": [  # two sub-params, split by rows each
                "tp 0: rows 0..12 of 48; rows 24..36 of 48 (24×16 shard)",
                "tp 1: rows 12..24 of 48; rows 36..48 of 48 (24×16 shard)"],
            "model.layers.0.self_attn.o_proj.weight": [  # a row-parallel linear: columns
                "tp 0: columns 0..8 of 16 (16×8 shard)", "tp 1: columns 8..16 of 16"],
            "model.norm.weight": ["tp 0: the whole tensor (replicated"],
        }
        for name, lines in expect.items():
            app.goto_param(name)
            await settle(app, pilot)
            facts = "\n".join(drawn(app.screen.query_one("#param-facts")))
            for line in lines:
                assert line in facts, (name, line, facts)
            p = app.view.ckpt.params[name]
            assert f"of its {len(p.shards)} tp shards" in facts
            await pilot.press("escape")


@pytest.mark.parametrize(("name", "param", "says"), [
    ("pp2_dp2_s1_fp32", "6.down.bias", "pipeline stage 1"),
    ("pp2_dp2_s1_fp32", "3.up.bias", "pipeline stage 0"),
    ("moe_ep2_w4_s2_fp32", "layers.1.moe.deepspeed_moe.experts.deepspeed_experts.2.fc2.weight",
     "expert-parallel rank 1"),
    ("moe_ep2_w4_s2_fp32", "layers.1.moe.deepspeed_moe.experts.deepspeed_experts.0.fc2.weight",
     "expert-parallel rank 0"),
])
async def test_param_detail_says_its_stage_and_expert_rank(name, param, says):
    app = ZinspectApp(str(PARALLEL / name))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        app.goto_param(param)
        await settle(app, pilot)
        facts = "\n".join(drawn(app.screen.query_one("#param-facts")))
        assert f"held at       {says}" in facts, facts


def grid_checkpoint(tp: int = 8, pp: int = 4, dp: int = 16) -> Checkpoint:
    """Metadata of a tp 8 x pp 4 x dp 16 run (512 ranks): an optimizer file per rank, two flat
    groups per (tp, pp) slice, a param per slice."""
    files, groups, params = [], [], {}
    for p in range(pp):
        for t in range(tp):
            for d in range(dp):
                name = f"zero_pp_rank_{d}_mp_rank_{p * tp + t:02d}_optim_states.pt"
                files.append(RankFile(Path("grid/global_step1") / name, "optim", rank=d,
                                      mp_rank=p * tp + t, size=1 << 20, format="zip",
                                      coords=Coords(dp=d, tp=t, pp=p)))
            for i in range(2):
                groups.append(ParamGroup(i, i, [f"{p}.{t}.w{i}"], 1024 * dp,
                                         {d: 1024 for d in range(dp)}, coords=Coords(tp=t, pp=p)))
                params[f"{p}.{t}.w{i}"] = Param(f"{p}.{t}.w{i}", (32, 32 * dp), "bfloat16",
                                               group=i, sub_group=i)
    return Checkpoint(path=Path("grid/global_step1"), tag="global_step1", stage=1,
                      world_size=tp * pp * dp, layout="pipeline", dtype="bfloat16",
                      master_dtype="float32", files=files, groups=groups, params=params,
                      topology=Topology(dp=dp, tp=tp, pp=pp, files=files))


async def test_512_ranks_grid_draws_and_scrolls(monkeypatch):
    """No timing is asserted: a grid that built a widget or a DataTable row per cell eagerly
    would crawl here (the grid draws only the rows on screen)."""
    ckpt = grid_checkpoint()
    serve(monkeypatch, ckpt)
    app = ZinspectApp("grid")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        overview = "\n".join(drawn(app.screen.query_one("#overview-body")))
        assert "pp 4 × tp 8 × dp 16 × ep 1" in overview
        await pilot.press("3")
        grid = app.screen.query_one("#rank-table", RankGrid)
        assert grid.row_count == 512 and grid.axes == ["pp", "tp", "dp"]
        assert all(c.held == 2048 and c.groups == c.slice_groups == 2 for c in grid.cells)
        grid.focus()
        await pilot.press("end")
        assert grid.cursor == 511
        rows = [line.split() for line in drawn(grid)[1:] if line.strip()]
        assert rows[-1][:3] == ["3", "7", "15"] and rows[-1][-1] == "ok"
        await pilot.press("home", "pagedown")
        assert grid.cursor > 0
