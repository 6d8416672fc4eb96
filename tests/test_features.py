"""Checkpoint.features (zinspect/core/features.py): training features that leave the files as plain
ZeRO saves them, read from ds_config and said by `info` (offload and hpZ on real fixtures in
tests/test_parallel_fixtures.py)."""

from __future__ import annotations

import pytest
from conftest import FIXTURES, run_zinspect

from zinspect.core.features import features_of


@pytest.mark.parametrize("zero, want", [
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}}, ["offload"]),
    ({"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}, ["offload", "nvme"]),
    ({"stage": 2, "offload_optimizer": {"device": "none"}}, []),
    ({"stage": 3, "zero_hpz_partition_size": 2, "zero_quantized_weights": True,
      "zero_quantized_gradients": True}, ["hpz", "qwz", "qgz"]),
    ({"stage": 3, "zero_hpz_partition_size": 1}, []),
])
def test_features_of(zero, want):
    assert features_of({"zero_optimization": zero}) == want


@pytest.mark.parametrize("bad", [None, {}, {"zero_optimization": "3"},
                                 {"zero_optimization": {"offload_param": ["cpu"]}}])
def test_features_of_anything_else_is_none(bad):
    assert features_of(bad) == []


@pytest.mark.parametrize("name, line", [
    ("offload_s3_w2", "features     offload"), ("hpz_s3_w4", "features     hpz"),
    ("pp2_dp2_s1_fp32", "parallel     dp 2 × pp 2"), ("moe_ep2_w4_s2_fp32", "parallel     dp 4 × ep 2"),
])
def test_info_says_them(name, line):
    r = run_zinspect("info", FIXTURES / "parallel" / name, env={"COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    assert line in r.stdout
