"""Sizes a pickle claims (10**7 MoE experts, ep ranks, dp ranks of a pipeline) cost what the files
really there cost, on every layout: the missing files' rule (layouts/gaps.missing_files) names the
first SHOWN and counts the rest in one finding, whatever the layout. (The world size of plain ZeRO:
tests/test_forged_world_size.py; pp and tp: test_layout_pipeline / test_layout_pptp /
test_layout_tp_damage.) Each copy is a real fixture with one model-states field rewritten by
torch.save."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import FIXTURES
from torchload import torch_load

from zinspect.core import open_checkpoint
from zinspect.core.layouts.gaps import SHOWN

FORGED = 10**7
PARALLEL = FIXTURES / "parallel"


def forged(tmp_path, name: str, change):
    root = tmp_path / name
    shutil.copytree(PARALLEL / name, root)
    for path in sorted(root.glob("*/mp_rank_*_model_states.pt")):
        state = torch_load(path)
        if change(state) is not False:
            torch.save(state, path)
    return open_checkpoint(root)


def _experts(state):
    state["num_experts"] = [FORGED] * len(state["num_experts"])


def _ep(state):
    opt = state["optimizer"]
    for g in opt.get("param_groups") or opt["optimizer_state_dict"]["param_groups"]:
        if g.get("moe"):
            g["name"] = f"ep_size_{FORGED}"
    state["dp_world_size"] = FORGED


def _dp(state):
    state["dp_world_size"] = FORGED


@pytest.mark.parametrize(("name", "change", "code", "per_grid", "of"), [
    ("moe_ep2_w4_s2_fp32", _experts, "missing-expert-file", 2, f"(of {FORGED} experts)"),  # 2 layers
    ("moe_ep2_w2_s0_bf16", _ep, "missing-optimizer-file", 1, f"(of {FORGED} ep ranks)"),
    ("pp2_dp2_s1_fp32", _dp, "missing-optimizer-file", 1, f"(of 2 stages × {FORGED} dp ranks)"),
])
def test_a_forged_size_names_the_first_missing_files_and_counts_the_rest(tmp_path, name, change,
                                                                         code, per_grid, of):
    c = forged(tmp_path, name, change)
    missing = [f for f in c.findings if f.code == code]
    assert len(missing) == per_grid * (SHOWN + 1)
    counted = [f for f in missing if " more " in f.message]
    assert len(counted) == per_grid and all(f.message.endswith(of) for f in counted)
    assert all(f.file and f.file.endswith(".pt") for f in missing if f not in counted)
    assert len(c.findings) < 50
