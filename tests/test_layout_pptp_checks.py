"""Pipeline × tensor parallel (issue 10): `zinspect validate` checks that each tp rank's shard of
each param is held by its (stage, tp rank) slice's ZeRO partitions and is whole in its file, as it
does for a plain tensor-parallel checkpoint (one rule, `tp_checks.shard_findings`, run by
core/validate.py on every layout whose params are tp shards in optimizer files).

Was: for `pipeline_tp` only the merge plan found such a gap: a slice's fp32 partition cut short
was a `slice-mapping-mismatch` warning, so `zinspect validate` exited 0 on a checkpoint the merge
refused, and a truncated slice file named no param. Real fixtures pp2_tp2_dp2_s1_fp32 (ZeRO-1)
and pp2_tp2_dp1_s1_bf16 (BF16_Optimizer); the damaged copies are made in tmp_path with the
pickle-level editors of tests/damage.py (the optimizer files pickle DeepSpeed classes, so they
are not torch.load-ed), every CRC kept valid. A finding's rank is the dp rank of the file (the
stage and tp rank are in its message), as on every layout."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from conftest import FIXTURES, run_zinspect
from damage import _int_op, _ops, _replace_ops, pickle_of, rewrite_pickle

import zinspect
from zinspect.core import open_checkpoint
from zinspect.core.layouts import tp_checks
from zinspect.core.torchzip import read_torch_file
from zinspect.core.validate import validate
from zinspect.errors import NotMergeable

PARALLEL = FIXTURES / "parallel"
DP2, BF16 = "pp2_tp2_dp2_s1_fp32", "pp2_tp2_dp1_s1_bf16"
SHARD_CODES = {"param-coverage", "param-overlap", "param-truncated"}


def tag_of(name: str) -> str:
    return json.loads((PARALLEL / name / "manifest.json").read_text())["tag"]


def copy(tmp_path, name: str):
    root = tmp_path / name
    shutil.copytree(PARALLEL / name, root)
    return root


def found(root) -> list:
    """[(code, file, rank, param)] of validate (sorted, each once)."""
    return sorted({(f.code, f.file, f.rank, f.param) for f in validate(open_checkpoint(root))}, key=str)


def cut_partition(path, group: int, by: int = 8) -> None:
    """The fp32 partition of flat group `group` in optimizer file `path` declared `by` elements
    shorter (its tensor's size in the pickle; the record and every CRC intact)."""
    osd = read_torch_file(path).obj["optimizer_state_dict"]
    key = osd["single_partition_of_fp32_groups"][group].storage.key
    raw = pickle_of(path)
    ops = _ops(raw)
    k = next(k for k, (op, _, _) in enumerate(ops)
             if op.name == "BINPERSID" and any(arg == key for _, arg, _ in ops[k - 8:k]))
    # the rebuild args after the storage: its offset, then the size tuple's one dim
    (offset, _, _), (size, numel, start) = ops[k + 1][:3], ops[k + 2][:3]
    assert offset.name.startswith("BININT") and size.name.startswith("BININT"), (offset, size)
    rewrite_pickle(path, _replace_ops(raw, [(start, ops[k + 3][2], _int_op(numel - by))]))


@pytest.mark.parametrize("name", [DP2, BF16])
def test_a_clean_checkpoint_has_no_shard_finding(name):
    c = open_checkpoint(PARALLEL / name)
    assert c.layout == "pipeline_tp" and c.findings == []
    sharded = [p for p in c.owners() if p.shards]
    assert len(sharded) == len(c.owners()) and {len(p.shards) for p in sharded} == {2}  # checked
    assert tp_checks.shard_findings(c) == []
    assert not {f.code for f in validate(c)} & SHARD_CODES


# (fixture, optimizer file, flat group, the param at the cut end, dp rank, stage)
S1_T0, S0_T1 = "zero_pp_rank_1_mp_rank_02_optim_states.pt", "zero_pp_rank_1_mp_rank_01_optim_states.pt"
S1_T1 = "bf16_zero_pp_rank_0_mp_rank_03_optim_states.pt"
CUTS = [
    (DP2, S1_T0, 0, "4.mlp.dense_4h_to_h.weight", 1, 1),  # stage 1, tp 0, dp 1
    (DP2, S1_T0, 1, "6.bias", 1, 1),
    (DP2, S0_T1, 0, "3.mlp.dense_4h_to_h.weight", 1, 0),  # stage 0, tp 1, dp 1
    (BF16, S1_T1, 0, "4.mlp.dense_4h_to_h.weight", 0, 1),  # stage 1, tp 1, dp 0
    (BF16, S1_T1, 1, "6.bias", 0, 1),
]


@pytest.mark.parametrize(("name", "file", "group", "param", "dp", "stage"), CUTS)
def test_a_slice_partition_cut_short_is_located_and_the_merge_refuses(tmp_path, name, file, group,
                                                                    param, dp, stage):
    """The slice's last dp rank holds 8 elements fewer: its last param's shard has a gap there."""
    root = copy(tmp_path, name)
    cut_partition(root / tag_of(name) / file, group)
    assert found(root) == [("param-coverage", file, dp, param),  # the dp rank, as every finding
                           ("slice-mapping-mismatch", file, dp, param)]
    [gap] = [f for f in open_checkpoint(root).findings if f.code == "param-coverage"]
    assert gap.message.startswith(f"{param}: 8 of the ") and \
        gap.message.endswith(f"(stage {stage}, dp rank {dp})")
    assert gap.severity == "error"
    r = run_zinspect("validate", root)
    assert r.returncode == 1 and "param-coverage" in r.stdout, r.stdout  # was 0: a warning only
    with pytest.raises(NotMergeable):
        zinspect.get_fp32_state_dict(root)
    r = run_zinspect("merge", root, tmp_path / "out")
    assert r.returncode == 1 and not (tmp_path / "out").exists(), r.stderr


def test_salvage_leaves_out_only_the_param_with_the_gap(tmp_path):
    name, file, group, param, *_ = CUTS[0]
    root = copy(tmp_path, name)
    cut_partition(root / tag_of(name) / file, group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = zinspect.get_fp32_state_dict(root, salvage=True)
    ref = torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)
    assert set(got) == set(ref) - {param}
    assert all(torch.equal(got[n], ref[n]) for n in got)


STAGE1_TP0 = ["4.mlp.dense_4h_to_h.bias", "4.mlp.dense_4h_to_h.weight", "4.mlp.dense_h_to_4h.bias",
              "4.mlp.dense_h_to_4h.weight", "4.post_attention_layernorm.bias",
              "4.self_attention.dense.weight", "4.self_attention.query_key_value.weight", "6.bias",
              "6.weight"]


def test_a_truncated_slice_file_names_each_param_it_cuts(tmp_path):
    """Stage 1, tp rank 0, dp rank 1's optimizer file cut in half: the file's finding (its dp
    rank, as the layout names its files) and each param whose shard bytes it lost (the same)."""
    file = "zero_pp_rank_1_mp_rank_02_optim_states.pt"
    root = copy(tmp_path, DP2)
    path = root / tag_of(DP2) / file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert found(root) == sorted([("truncated-file", file, 1, None)] +
                                 [("param-truncated", file, 1, p) for p in STAGE1_TP0], key=str)
    with pytest.raises(NotMergeable):
        zinspect.get_fp32_state_dict(root)
