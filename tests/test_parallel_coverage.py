"""`validate` walks every param's coverage on the parallel layouts too (pipeline, MoE), not only
on plain ZeRO: a partition cut short in one optimizer file's pickle (every CRC valid, no file
missing) is a located `param-coverage` error, so validate no longer exits 0 on a checkpoint the
merge refuses. (Tensor-parallel shards: tests/test_layout_pptp_checks.py.)"""

from __future__ import annotations

import shutil

import pytest
from conftest import FIXTURES, run_zinspect
from test_layout_pptp_checks import cut_partition

PARALLEL = FIXTURES / "parallel"


@pytest.mark.parametrize("name,file,group", [
    ("pp2_dp2_s1_fp32", "zero_pp_rank_1_mp_rank_01_optim_states.pt", 0),
    ("pp2_dp2_s1_bf16_pmd", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 0),
    ("moe_ep2_w4_s2_fp32", "zero_pp_rank_3_mp_rank_00_optim_states.pt", 0),
    ("moe_ep2_w4_s2_fp32", "zero_pp_rank_3_mp_rank_00_optim_states.pt", 1)])
def test_a_partition_cut_short_fails_validate_and_the_merge(tmp_path, name, file, group):
    root = tmp_path / name
    shutil.copytree(PARALLEL / name, root)
    cut_partition(next(root.glob(f"*/{file}")), group)
    r = run_zinspect("validate", root)
    assert r.returncode == 1, r.stdout
    assert "param-coverage" in r.stdout and "8 of " in r.stdout, r.stdout
    m = run_zinspect("merge", root, tmp_path / "out")
    assert m.returncode == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["pp2_dp2_s1_fp32", "pp2_dp2_s1_bf16_pmd", "moe_ep2_w4_s2_fp32",
                                  "moe_ep2_w4_s1_top2_res", "pp3_dp1_s0_fp32", "z0_bf16"])
def test_the_clean_fixtures_have_no_coverage_finding(name):
    r = run_zinspect("validate", PARALLEL / name)
    assert r.returncode == 0 and "param-coverage" not in r.stdout, r.stdout
