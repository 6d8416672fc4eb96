"""Tensor parallel (issue 10), damaged copies of the real AutoTP fixtures: every problem on the
tp axis located with its exact finding codes (file, dp rank (the tp rank is in the message), param).
The copies are made in tmp_path: files deleted, cut short, copied in from another run, or their
model-states pickles edited with torch."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_layout_tp import EXTRA, PARALLEL, manifest, tp_checkpoint


def damaged(tmp_path, name: str, damage) -> list:
    """Validate a copy of fixture `name` after `damage(tag_dir)`: [(code, file, rank, param)]."""
    from zinspect.core.validate import validate

    root = tmp_path / name
    shutil.copytree(PARALLEL / name, root)
    damage(root / manifest(name)["tag"])
    return sorted({(f.code, f.file, f.rank, f.param) for f in validate(tp_checkpoint(root))},
                  key=str)


def edit_model_states(path, change) -> None:
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


def both_tp_ranks(change):
    def damage(tag):
        for t in (0, 1):
            edit_model_states(tag / f"mp_rank_{t:02d}_model_states.pt", change)
    return damage


Q_PROJ = r"^model\.layers\.0\.self_attn\.q_proj\.weight$"


def test_a_missing_tp_rank_is_located(tmp_path):
    got = damaged(tmp_path, "tp2_dp2_s2_toy", lambda tag: (tag / "mp_rank_01_model_states.pt").unlink())
    assert got == [("missing-tp-rank", "mp_rank_01_model_states.pt", None, None)]  # no dp rank


def test_a_missing_zero3_tp_rank_is_located(tmp_path):
    got = damaged(tmp_path, "tp2_dp2_s3_toy",
                  lambda tag: (tag / "zero_pp_rank_0_mp_rank_01_model_states.pt").unlink())
    assert ("missing-tp-rank", "zero_pp_rank_0_mp_rank_01_model_states.pt", 0, None) in got
    assert {code for code, *_ in got} == {"missing-tp-rank"}


@pytest.mark.parametrize("name", ["tp2_dp2_s2_toy", "tp2_dp2_s3_toy", "tp2_dp2_s2_llama_bf16_tied"])
def test_a_missing_optimizer_file_of_tp_rank_1_is_located(tmp_path, name):
    prefix = "bf16_" if "bf16" in name else ""
    lost = f"{prefix}zero_pp_rank_1_mp_rank_01_optim_states.pt"
    got = damaged(tmp_path, name, lambda tag: (tag / lost).unlink())
    assert ("missing-optimizer-file", lost, 1, None) in got  # dp rank 1 (of tp rank 1)
    coverage = [(rank, param) for code, _, rank, param in got if code == "param-coverage"]
    assert coverage and {rank for rank, _ in coverage} == {1}  # dp rank 1 of tp rank 1
    assert {code for code, *_ in got} == {"missing-optimizer-file", "param-coverage"}


def test_a_truncated_optimizer_file_of_tp_rank_1_is_located(tmp_path):
    name = "zero_pp_rank_0_mp_rank_01_optim_states.pt"

    def cut(tag):
        data = (tag / name).read_bytes()
        (tag / name).write_bytes(data[: len(data) // 2])
    got = damaged(tmp_path, "tp2_dp2_s2_toy", cut)
    assert {code for code, *_ in got} == {"truncated-file", "param-truncated"}
    assert all(file == name for _, file, _, _ in got)
    assert {rank for code, _, rank, _ in got if code == "param-truncated"} == {0}  # dp 0 (tp 1)


def test_files_of_another_topology_are_stale(tmp_path):
    def damage(tag):
        source = tag / "zero_pp_rank_1_mp_rank_01_optim_states.pt"
        shutil.copy(source, tag / "zero_pp_rank_1_mp_rank_02_optim_states.pt")
        shutil.copy(source, tag / "zero_pp_rank_2_mp_rank_01_optim_states.pt")
    got = damaged(tmp_path, "tp2_dp2_s2_toy", damage)
    assert got == [("stale-rank-file", "zero_pp_rank_1_mp_rank_02_optim_states.pt", 1, None),
                   ("stale-rank-file", "zero_pp_rank_2_mp_rank_01_optim_states.pt", 2, None)]  # dp ranks


def test_a_shard_shape_that_breaks_its_rule_is_located(tmp_path):
    norm = "model.layers.0.input_layernorm.weight"
    got = damaged(tmp_path, "tp2_dp2_s2_toy", lambda tag: edit_model_states(
        tag / "mp_rank_01_model_states.pt",
        lambda s: s["param_shapes"][1].__setitem__(norm, torch.Size([4, 4]))))
    assert got == [("tp-shard-shape", None, None, norm)]


def test_shards_that_do_not_tile_are_located(tmp_path):
    def overlap(state):
        pieces = state["universal_checkpoint_info"]["affine_map"]["params"][Q_PROJ]["ranks"][1]["pieces"]
        pieces[0]["source"][0] = 0
    got = damaged(tmp_path, "tp2_dp2_s2_toy", both_tp_ranks(overlap))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert got == [("tp-coverage", None, None, q), ("tp-split-mismatch", None, None, q)]


def test_a_split_that_cannot_be_known_is_named_not_guessed(tmp_path):
    def unknowable(state):
        info = state["universal_checkpoint_info"]
        del info["affine_map"], info["sub_param_shard_widths"]
    got = damaged(tmp_path, "tp2_dp2_s2_toy", both_tp_ranks(unknowable))
    assert got == [("tp-split-unknown", None, None, f"model.layers.{i}.mlp.gate_up_proj.weight")
                   for i in (0, 1)]


def test_no_split_description_at_all_is_one_finding(tmp_path):
    got = damaged(tmp_path, "tp2_dp2_s2_toy",
                  both_tp_ranks(lambda state: state.pop("universal_checkpoint_info")))
    assert got == [("tp-split-unknown", "mp_rank_00_model_states.pt", None, None)]


def test_the_affine_map_wins_over_patterns_it_contradicts(tmp_path):
    """A row param listed as column too: the patterns join it on dim 0, the map on dim 1; the map
    is used (as DeepSpeed's converter does) and the disagreement is a warning."""
    def contradict(state):
        state["universal_checkpoint_info"]["parameter_with_row_parallelism_patterns"].remove(
            r"^model\.layers\.0\.self_attn\.o_proj\.weight$")
    got = damaged(tmp_path, "tp2_dp2_s2_toy", both_tp_ranks(contradict))
    assert got == [("tp-split-mismatch", None, None, "model.layers.0.self_attn.o_proj.weight")]


def test_tp_ranks_that_describe_their_splits_differently_are_reported(tmp_path):
    got = damaged(tmp_path, "tp2_dp2_s2_toy", lambda tag: edit_model_states(
        tag / "mp_rank_01_model_states.pt",
        lambda s: s["universal_checkpoint_info"]["tp_replicated_parameter_patterns"].append("^nothing$")))
    assert got == [("tp-info-mismatch", "mp_rank_01_model_states.pt", 1, None)]


def test_a_tp_rank_saved_at_another_topology_is_located(tmp_path):
    def tp4(state):
        state["mp_world_size"] = 4
        state["checkpoint_parallel_dimensions"]["tp_degree"] = 4
    got = damaged(tmp_path, "tp2_dp2_s2_toy",
                  lambda tag: edit_model_states(tag / "mp_rank_01_model_states.pt", tp4))
    assert got == [("topology-mismatch", "mp_rank_01_model_states.pt", None, None)]


def test_an_optimizer_file_of_another_stage_is_located(tmp_path):
    lost = "zero_pp_rank_1_mp_rank_01_optim_states.pt"
    got = damaged(tmp_path, "tp2_dp2_s2_toy", lambda tag: shutil.copy(
        PARALLEL / "tp2_dp2_s1_toy" / "global_step2" / lost, tag / lost))
    assert got == [("stage-mismatch", lost, 1, None)]  # dp rank 1 (of tp rank 1)


@pytest.mark.parametrize("tp", [0, 1])
def test_two_optimizer_files_for_one_rank_are_one_finding(tmp_path, tp):
    """A bf16_ file beside the plain one (a stale file of another run) at tp rank 0 or 1."""
    plain = f"zero_pp_rank_1_mp_rank_{tp:02d}_optim_states.pt"
    got = damaged(tmp_path, "tp2_dp2_s2_toy",
                  lambda tag: shutil.copy(tag / plain, tag / ("bf16_" + plain)))
    assert got == [("duplicate-rank", plain, 1, None)]  # the dp rank, at either tp rank


def test_every_file_of_a_tp_rank_missing_is_each_located(tmp_path):
    """ZeRO-3, tp rank 1 gone whole: still read as tp 2 (from tp rank 0's model states), and each
    of its four files named with its dp rank."""
    def gone(tag):
        for f in tag.glob("*mp_rank_01*"):
            f.unlink()
    got = damaged(tmp_path, "tp2_dp2_s3_toy", gone)
    assert got == [("missing-optimizer-file", "zero_pp_rank_0_mp_rank_01_optim_states.pt", 0, None),
                   ("missing-optimizer-file", "zero_pp_rank_1_mp_rank_01_optim_states.pt", 1, None),
                   ("missing-tp-rank", "zero_pp_rank_0_mp_rank_01_model_states.pt", 0, None),
                   ("missing-tp-rank", "zero_pp_rank_1_mp_rank_01_model_states.pt", 1, None)]


def test_a_forged_tp_size_is_one_finding(tmp_path):
    def huge(state):
        state["mp_world_size"] = 10**6
        state["checkpoint_parallel_dimensions"]["tp_degree"] = 10**6
    got = damaged(tmp_path, "tp2_dp2_s2_toy", both_tp_ranks(huge))
    assert got == [("topology-mismatch", "mp_rank_00_model_states.pt", None, None)]


def test_a_zero3_model_states_file_in_a_zero2_checkpoint_is_stale(tmp_path):
    stray = "zero_pp_rank_1_mp_rank_01_model_states.pt"
    got = damaged(tmp_path, "tp2_dp2_s2_toy", lambda tag: shutil.copy(
        PARALLEL / "tp2_dp2_s3_toy" / "global_step2" / stray, tag / stray))
    assert got == [("stale-rank-file", stray, 1, None)]  # dp rank 1 (of tp rank 1)


def test_a_zero12_model_states_file_in_a_zero3_checkpoint_is_stale(tmp_path):
    stray = "mp_rank_01_model_states.pt"
    got = damaged(tmp_path, "tp2_dp2_s3_toy", lambda tag: shutil.copy(
        PARALLEL / "tp2_dp2_s2_toy" / "global_step2" / stray, tag / stray))
    assert got == [("stale-rank-file", stray, None, None)]


def test_a_param_one_tp_rank_does_not_name_is_located(tmp_path):
    """tp rank 1's model states from a model whose q_proj is called otherwise."""
    q = "model.layers.0.self_attn.q_proj.weight"

    def rename(state):
        group = state["param_shapes"][0]
        state["param_shapes"][0] = type(group)((k if k != q else q + "_renamed", v) for k, v in group.items())
    got = damaged(tmp_path, "tp2_dp2_s2_toy",
                  lambda tag: edit_model_states(tag / "mp_rank_01_model_states.pt", rename))
    # the optimizer still names q_proj where the renamed param_shapes put another name
    assert got == [("slice-mapping-mismatch", "zero_pp_rank_0_mp_rank_01_optim_states.pt", 0, q),
                   ("tp-param-missing", None, None, q)]


def test_an_optimizer_file_of_another_world_size_is_located(tmp_path):
    """tp rank 1's dp-0 optimizer file swapped for the one of a tp 2 x dp 1 run (3 steps)."""
    swapped = "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    other = EXTRA / "tp2_dp1_s1_toy" / "global_step3" / swapped
    got = damaged(tmp_path, "tp2_dp2_s1_toy", lambda tag: shutil.copy(other, tag / swapped))
    assert ("world-size-mismatch", swapped, 0, None) in got  # dp rank 0 (of tp rank 1)
    assert ("step-mismatch", swapped, 0, None) in got
    assert {code for code, *_ in got} == {"world-size-mismatch", "step-mismatch", "slice-mapping-mismatch"}


def test_many_missing_files_of_the_tp_ranks_are_counted_past_the_first_shown():
    """(a forged partition count would otherwise name millions of files one by one)"""
    from pathlib import Path

    from zinspect.core.layouts import tensor_parallel as T
    from zinspect.core.layouts import tp_checks as C
    from zinspect.core.layouts.base import LoadContext
    from zinspect.core.layouts.gaps import SHOWN
    from zinspect.core.model import Checkpoint, RankFile

    ctx = LoadContext(Checkpoint(Path("x"), "x"), {}, lambda files: {})
    files = {t: RankFile(Path(f"mp_rank_{t:02d}_model_states.pt"), "model", mp_rank=t) for t in (0, 1)}
    ctx.optim_files = [RankFile(Path("zero_pp_rank_0_mp_rank_00_optim_states.pt"), "optim", rank=0)]
    slices = [T.Slice(t, models={0: files[t]}, optim=dict.fromkeys(range(3), ctx.optim_files[0]),
                      state={}) for t in (0, 1)]
    C.report_missing(ctx, slices, 2, 10**7)
    found = ctx.ckpt.findings
    assert len(found) == SHOWN + 1 and {f.code for f in found} == {"missing-optimizer-file"}
    assert (found[0].file, found[0].rank) == ("zero_pp_rank_3_mp_rank_00_optim_states.pt", 3)
    assert found[-1].message.startswith(f"{2 * (10**7 - 3) - SHOWN} more optimizer files are missing")
