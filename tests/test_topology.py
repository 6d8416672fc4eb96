"""The topology in the model (issue 9): every file's coordinates from its name, the checkpoint's
sizes per axis from the pickles, the two cross-checked (topology-mismatch), and the per-axis
file check every layout shares. On the real fixtures and damaged copies of them."""

from __future__ import annotations

from pathlib import Path

import damage
import pytest
from conftest import FIXTURES

from zinspect.core import codes, open_checkpoint
from zinspect.core.layouts.gaps import missing_files, outside, stale
from zinspect.core.model import Coords, RankFile
from zinspect.report_json import info_json

PARALLEL = FIXTURES / "parallel"


@pytest.mark.parametrize(("name", "sizes"), [
    ("s2_w4_fp16", {"dp": 4, "tp": 1, "pp": 1, "ep": 1}),
    ("s3_w4_bf16", {"dp": 4, "tp": 1, "pp": 1, "ep": 1}),
    ("parallel/tp2_dp2_s2_toy", {"dp": 2, "tp": 2, "pp": 1, "ep": 1}),
    ("parallel/tp2_dp2_s3_toy", {"dp": 2, "tp": 2, "pp": 1, "ep": 1}),
    ("parallel/pp2_dp2_s1_fp32", {"dp": 2, "tp": 1, "pp": 2, "ep": 1}),
    ("parallel/pp3_dp1_s0_fp32", {"dp": 1, "tp": 1, "pp": 3, "ep": 1}),
])
def test_sizes_per_axis(name, sizes):
    ckpt = open_checkpoint(FIXTURES / name)
    assert ckpt.topology.sizes == sizes
    assert info_json(ckpt)["topology"] == sizes
    assert not any(f.code == "topology-mismatch" for f in ckpt.findings)


def test_every_file_has_its_coordinates():
    ckpt = open_checkpoint(PARALLEL / "tp2_dp2_s2_toy")
    optim = {f.name: f.coords for f in ckpt.files_of("optim")}
    assert optim == {f"zero_pp_rank_{d}_mp_rank_0{t}_optim_states.pt": Coords(dp=d, tp=t)
                     for d in (0, 1) for t in (0, 1)}
    assert [f.name for f in ckpt.topology.files_at(tp=1, kind="model")] == \
        ["mp_rank_01_model_states.pt"]
    assert {f.name for f in ckpt.topology.files_at(dp=1, tp=0)} == \
        {"zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def test_a_pipelines_mp_rank_is_its_stage():
    """With pp > 1, mp_rank SS = pp * tp + tp_rank: the stage moves to the pp axis (and a layer
    file sits at the stage that owns its layer: issue 10, was stage 0 for every layer file)."""
    ckpt = open_checkpoint(PARALLEL / "pp2_dp2_s1_fp32")
    stage1 = {f.name for f in ckpt.topology.files_at(pp=1)}
    assert stage1 == {"mp_rank_01_model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_01_optim_states.pt", "layer_05-model_states.pt",
                      "layer_06-model_states.pt", "layer_07-model_states.pt"}
    assert all(f.coords.tp == 0 for f in ckpt.files)


def test_discovery_keeps_layer_and_expert_ids():
    ckpt = open_checkpoint(PARALLEL / "moe_ep2_w4_s2_fp32")
    experts = {f.name: (f.coords.layer, f.coords.expert) for f in ckpt.files_of("expert")}
    assert experts == {f"layer_{L}_expert_{E}_mp_rank_00_model_states.pt": (L, E)
                       for L in (0, 1) for E in range(4)}
    layers = {f.coords.layer for f in open_checkpoint(PARALLEL / "pp2_dp2_s1_fp32").files
              if f.name.startswith("layer_")}
    assert layers == {1, 3, 4, 5, 6, 7}


def test_model_states_that_disagree_with_their_own_dimensions(tmp_path):
    root = damage.topology_mp_world_size(tmp_path)
    ckpt = open_checkpoint(root)
    found = [f for f in ckpt.findings if f.code == "topology-mismatch"]
    assert [(f.severity, f.file) for f in found] == [("error", "mp_rank_00_model_states.pt")]
    assert "mp_world_size is 2" in found[0].message and "pp 1 x tp 1" in found[0].message
    clean = open_checkpoint(FIXTURES / "s2_w4_fp16")
    assert [f.code for f in ckpt.findings if f.code != "topology-mismatch"] == \
        [f.code for f in clean.findings]


def test_a_tp_rank_file_whose_pickle_says_another_topology(tmp_path):
    root = damage.topology_tp_rank_beyond(tmp_path)
    found = [f for f in open_checkpoint(root).findings if f.code == "topology-mismatch"]
    assert [f.file for f in found] == ["mp_rank_01_model_states.pt"]
    assert "pp 1 x tp 1" in found[0].message and "pp 1 x tp 2" in found[0].message


def _file(name: str, **coords) -> RankFile:
    return RankFile(Path(name), "optim", rank=coords.get("dp"), coords=Coords(**coords))


def _grid_findings(files, grid) -> list:
    """gaps' two rules over `files` on `grid`, as validate and the layouts run them."""
    out = []

    def find(code, message, hint="", **where):
        out.append(codes.finding(code, message, hint, **where))

    axes = [a for a, _ in grid]
    missing_files(find, grid, {tuple(getattr(f.coords, a) for a in axes) for f in files},
                  "missing-optimizer-file", "optimizer files",
                  lambda *at: "f" + "".join(map(str, at)), "its partition is lost", "copy it")
    for f in files:
        at = [getattr(f.coords, a) for a in axes]
        if any(v >= n for v, (_, n) in zip(at, grid, strict=True)):
            stale(find, f, outside(grid, at))
    return out


def test_grid_findings_locate_missing_and_foreign_files_on_any_axis():
    files = [_file(f"d{d}t{t}", dp=d, tp=t) for d in range(2) for t in range(2)
             if (d, t) != (1, 0)] + [_file("d0t2", dp=0, tp=2)]
    out = _grid_findings(files, [("dp", 2), ("tp", 2)])
    assert [(f.code, f.rank, f.file) for f in out] == [
        ("missing-optimizer-file", 1, "f10"), ("stale-rank-file", 0, "d0t2")]
    assert out[0].message == "f10 is missing (dp rank 1, tp rank 0): its partition is lost"
    assert out[1].message == ("d0t2 does not belong to this checkpoint: it is at dp rank 0, tp "
                              "rank 2, outside this checkpoint's 2 dp ranks × 2 tp ranks")


def test_grid_findings_on_the_dp_axis_name_the_file_and_the_dp_rank():
    files = [_file(f"r{r}", dp=r) for r in (0, 1, 3, 7)]
    out = _grid_findings(files, [("dp", 4)])
    assert [(f.code, f.rank, f.file, f.message) for f in out] == [
        ("missing-optimizer-file", 2, "f2", "f2 is missing (dp rank 2): its partition is lost"),
        ("stale-rank-file", 7, "r7", "r7 does not belong to this checkpoint: it is at dp rank 7, "
         "outside this checkpoint's 4 dp ranks")]


def test_grid_findings_name_the_first_shown_then_count_the_rest():
    out = _grid_findings([_file("r0", dp=0)], [("pp", 10**7), ("dp", 10**7)])
    assert len(out) == 17 and [f.rank for f in out[:3]] == [1, 2, 3]
    assert out[-1].message == (f"{10**14 - 17} more optimizer files are missing (of 10000000 "
                               "stages × 10000000 dp ranks)") and out[-1].rank is None
