"""Forged model states (every CRC valid) that validate passed while the merge refused them or
that showed a forged field as a fact: a ZeRO-3 frozen fragment of the wrong size (or missing) on
a rank above 0, whose model states are read only when needed (`zero3.FrozenFragments.check`,
run by validate through `Checkpoint.later_checks`); and a dp_world_size that is not a world size
(`common._world_size_of`)."""

from __future__ import annotations

import damage as D
import pytest
import torch
from torchload import torch_load

from zinspect.core import load_checkpoint, open_checkpoint
from zinspect.core.plan import plan_merge
from zinspect.errors import NotMergeable

FROZEN = "encoder.frozen_proj.weight"  # (15, 15) over 4 ranks: 57 elements a rank


def _forge_fragment(tmp_path, rank: int, keep: int | None):
    """s3_w4_bf16 with `rank`'s frozen fragment of FROZEN cut to `keep` elements (None: gone)."""
    root = D.copy_root(tmp_path, "s3_w4_bf16")
    path = next(root.glob("*/" + D.z3_model_name(rank)))
    state = torch_load(path)
    if keep is None:
        del state["frozen_param_fragments"][FROZEN]
    else:
        state["frozen_param_fragments"][FROZEN] = state["frozen_param_fragments"][FROZEN][:keep].clone()
    torch.save(state, path)
    return root


@pytest.mark.parametrize("rank", [1, 3])
def test_a_wrong_frozen_fragment_above_rank_0_is_found_by_validate(tmp_path, rank):
    """Before: validate ok (only rank 0's model states are read at open), the merge refused.
    Now a shape-mismatch naming the param, the rank and its file; --salvage drops the param."""
    root = _forge_fragment(tmp_path, rank, 50)
    ckpt = load_checkpoint(root)
    assert not any(f.code == "shape-mismatch" for f in ckpt.findings)  # not read at open
    assert len(ckpt.later_checks) == 1
    ckpt = open_checkpoint(root)
    found = [f for f in ckpt.findings if f.severity == "error"]
    assert [(f.code, f.param, f.rank, f.file, f.message) for f in found] == [
        ("shape-mismatch", FROZEN, rank, D.z3_model_name(rank),
         f"{FROZEN}: frozen_param_shapes says (15, 15), 57 elements a rank; rank {rank}'s "
         "frozen fragment holds 50")]
    with pytest.raises(NotMergeable):
        plan_merge(ckpt)
    assert FROZEN in plan_merge(ckpt, salvage=True).dropped


@pytest.mark.parametrize("rank", [0, 2])
def test_a_missing_frozen_fragment_is_found_by_validate(tmp_path, rank):
    """A rank's model states without the frozen param's fragment: the merge refused, validate
    said ok (rank 0 read at open was not asked either). Now a located param-coverage error."""
    ckpt = open_checkpoint(_forge_fragment(tmp_path, rank, None))
    found = [f for f in ckpt.findings if f.severity == "error"]
    assert [(f.code, f.param, f.rank, f.file, f.message) for f in found] == [
        ("param-coverage", FROZEN, rank, D.z3_model_name(rank),
         f"{FROZEN}: the model states of rank {rank} hold no frozen fragment of it")]
    with pytest.raises(NotMergeable):
        plan_merge(ckpt)


def test_zero3_without_frozen_params_reads_no_other_rank_at_validate(tmp_path):
    """The later check is only there for frozen params: ranks > 0 stay unread (shallow)."""
    ckpt = open_checkpoint(D.copy_root(tmp_path, "s3_w2_bf16_plain"))
    assert ckpt.later_checks == [] and not ckpt.errors
    assert [f.shallow for f in ckpt.files_of("model")] == [False, True]


def test_intact_frozen_fragments_pass_after_the_later_check():
    from conftest import FIXTURES

    ckpt = open_checkpoint(FIXTURES / "s3_w4_bf16")
    assert not ckpt.errors
    assert [f.rank for f in ckpt.params[FROZEN].fragments] == [0, 1, 2, 3]


def _forge_dp_world_size(tmp_path, name: str, value, drop_optim: bool):
    root = D.copy_root(tmp_path, name)
    for path in root.glob("*/*model_states.pt"):
        state = torch_load(path)
        state["dp_world_size"] = value
        torch.save(state, path)
    if drop_optim:
        for path in root.glob("*/*optim_states.pt"):
            path.unlink()
    return open_checkpoint(root)


@pytest.mark.parametrize(("value", "said"), [(True, "True"), (False, "False"), (-2, "-2"),
                                             (0, "0"), ("2", "a str")])
def test_a_forged_dp_world_size_is_not_the_world_size(tmp_path, value, said):
    """No optimizer file says the world size: the model states' dp_world_size was taken as it
    when it was any int (True, -2). Now only a positive int is; the forged field is named."""
    ckpt = _forge_dp_world_size(tmp_path, "s2_w2_bf16", value, drop_optim=True)
    assert ckpt.world_size is None
    found = [f for f in ckpt.findings if f.code == "world-size-unknown"]
    assert [(f.severity, f.file, f.message) for f in found] == [
        ("error", D.MODEL, f"{D.MODEL}: its dp_world_size is {said}, not a world size, and no "
         "readable optimizer file says one")]


def test_a_real_dp_world_size_is_still_the_world_size(tmp_path):
    ckpt = _forge_dp_world_size(tmp_path, "s2_w2_bf16", 2, drop_optim=True)
    assert ckpt.world_size == 2
    assert not any(f.code == "world-size-unknown" for f in ckpt.findings)


def test_dp_world_size_true_is_not_one(tmp_path):
    """True == 1 in Python: a forged True beside a world size of 1 passed as agreeing."""
    ckpt = _forge_dp_world_size(tmp_path, "s2_w1_fp32", True, drop_optim=False)
    found = [f.message for f in ckpt.findings if f.code == "world-size-mismatch"]
    assert found == ["the model states say dp_world_size=True, the optimizer files "
                     "partition_count=1"]


def test_a_late_rank_whose_pickle_cannot_be_read_is_an_error(tmp_path):
    """Rank 1's model states whole (every CRC valid) at open but not a pickle zinspect reads:
    the merge cannot place its frozen fragments; validate, which now reads it, says so."""
    root = D.copy_root(tmp_path, "s3_w2_fp32")
    path = next(root.glob("*/" + D.z3_model_name(1)))
    D.rewrite_pickle(path, b"\xff" + D.pickle_of(path))
    ckpt = open_checkpoint(root)
    found = [f for f in ckpt.findings if f.severity == "error"]
    assert [(f.code, f.file, f.rank) for f in found] == [("unreadable-file", path.name, 1)]
    assert "read for the frozen params' fragments" in found[0].message
    with pytest.raises(NotMergeable):
        plan_merge(ckpt)
