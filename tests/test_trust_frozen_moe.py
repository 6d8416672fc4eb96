"""Forged model states (every CRC valid) that passed validate or crashed the load: a ZeRO-3
frozen param's frozen_param_shapes shrunk (`zero3.attach_frozen`), and an MoE checkpoint's
param_shapes with fewer groups than its optimizer files partition (`moe._MoE.describe`)."""

from __future__ import annotations

import shutil

import damage as D
import pytest
import torch
from conftest import FIXTURES
from torchload import torch_load

from zinspect.core import open_checkpoint
from zinspect.core.plan import plan_merge
from zinspect.errors import NotMergeable

FROZEN = "encoder.frozen_proj.weight"


@pytest.mark.parametrize("declared", [(15, 14), (2, 3)])
def test_a_shrunk_zero3_frozen_shape_is_a_located_error(tmp_path, declared):
    """s3_w2_fp32's frozen (15, 15) declared smaller in every rank's model states: each rank
    holds 113 elements of it, the declared shape implies fewer. Before: validate ok and the
    merge wrote the first elements in the declared shape, exit 0. Now a shape-mismatch naming
    the param, rank 0 and its file (read at open, so validate says it); the merge refuses and
    --salvage drops the param."""
    root = D.copy_root(tmp_path, "s3_w2_fp32")
    for path in root.glob("*/*model_states.pt"):
        state = torch_load(path)
        state["frozen_param_shapes"][FROZEN] = torch.Size(declared)
        torch.save(state, path)
    ckpt = open_checkpoint(root)
    P = -(-declared[0] * declared[1] // 2)
    found = [f for f in ckpt.findings if f.code == "shape-mismatch"]
    assert [(f.severity, f.param, f.rank, f.file, f.message) for f in found] == [
        ("error", FROZEN, 0, "zero_pp_rank_0_mp_rank_00_model_states.pt",
         f"{FROZEN}: frozen_param_shapes says ({declared[0]}, {declared[1]}), {P} elements a "
         "rank; rank 0's frozen fragment holds 113")]
    assert not ckpt.params[FROZEN].fragments  # no rank's tensor is taken for it
    with pytest.raises(NotMergeable):
        plan_merge(ckpt)
    assert FROZEN in plan_merge(ckpt, salvage=True).dropped


@pytest.mark.parametrize(("kept", "groups"), [(1, "groups 1..3"), (3, "group 3")])
def test_moe_param_shapes_cut_short_is_a_finding_not_a_crash(tmp_path, kept, groups):
    """moe_ep2_w4_s2_fp32 (4 flat groups, 2 of experts) with param_shapes cut to `kept`
    groups: before, IndexError at open (internal error, exit 3). Now one group-coverage error,
    located nowhere (which module names are frozen is unknown), so merge and --salvage refuse."""
    root = tmp_path / "moe"
    shutil.copytree(FIXTURES / "parallel" / "moe_ep2_w4_s2_fp32", root)
    path = next(root.glob("*/mp_rank_00_model_states.pt"))
    state = torch_load(path)
    state["param_shapes"] = state["param_shapes"][:kept]
    torch.save(state, path)
    ckpt = open_checkpoint(root)
    found = [f for f in ckpt.findings if f.code == "group-coverage"]
    assert [(f.severity, f.message, f.param, f.file, f.rank) for f in found] == [
        ("error", f"the optimizer files partition 4 flat groups, the model states' param_shapes "
         f"describes {kept}: the fp32 masters of {groups} belong to no param", None, None, None)]
    for salvage in (False, True):
        with pytest.raises(NotMergeable):
            plan_merge(ckpt, salvage=salvage)
