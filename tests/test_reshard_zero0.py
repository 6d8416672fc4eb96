"""`zinspect reshard` refuses ZeRO-0 checkpoints as needing no reshard: ZeRO-0 keeps whole
optimizer states, so DeepSpeed loads them at any data-parallel size as they are. Proved here with
real DeepSpeed 0.19.8 engines (needs ZINSPECT_DS_PYTHON) for each ZeRO-0 layout that has a
distinct load path: plain fp32 (the client's torch optimizer) and fp16 (FP16_UnfusedOptimizer,
as bf16 is), a pipeline (per-stage mp_rank files), native MoE (per-ep-rank expp_rank optimizer
files, fp32 and bf16) and tensor parallelism (per-tp-rank mp_rank files). Engines at another
data-parallel size, loading the committed fixture with plain `engine.load_checkpoint()`, hold
exactly what engines at the saved size hold from the same files (every fp32 master, exp_avg,
exp_avg_sq, frozen param and buffer), the masters are the fixture's reference_fp32.pt, and they
train a step.

A pipeline's (or pipeline x tp's) bf16 ZeRO-0 checkpoint (BF16_Optimizer files) loads at no size:
its refusal says so, and a real engine fails to load one at another size (below).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES, manifest
from test_reshard import DS_PYTHON, needs_deepspeed
from test_reshard_parallel import assert_engines_agree, engines

from zinspect.core import open_checkpoint
from zinspect.core.reshard import reshard
from zinspect.errors import NotMergeable

torch = pytest.importorskip("torch")

WORKER = Path(__file__).parent / "ds_resume" / "zero0_worker.py"
#: (fixture, another data-parallel world size it is loaded at)
CASES = [("parallel/z0_fp32", 1),
         ("parallel/z0_fp16", 3),
         ("parallel/pp2_dp1_s0_fp16", 4),
         ("parallel/moe_ep2_w4_s0_fp32", 2),
         ("parallel/moe_ep2_w2_s0_bf16", 4),
         ("tp_extra/tp2_dp2_s0_toy", 2)]


@pytest.mark.parametrize("name,n", CASES)
def test_reshard_refuses_as_needing_none(tmp_path, name, n):
    with pytest.raises(NotMergeable) as e:
        reshard(open_checkpoint(FIXTURES / name), tmp_path / "out", n)
    assert "data-parallel size as it is" in str(e.value), str(e.value)  # its message or hint
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@needs_deepspeed
@pytest.mark.parametrize("name,n", CASES)
def test_deepspeed_loads_zero0_at_another_world_size(tmp_path, name, n):
    saved = manifest(name)["world_size"]
    assert n != saved
    before = engines(tmp_path, name, FIXTURES / name, saved, "saved_size", WORKER)
    after = engines(tmp_path, name, FIXTURES / name, n, "other_size", WORKER)
    trainable = assert_engines_agree(before, after, manifest(name)["global_steps"], saved, n)
    # the masters are the checkpoint's, not the engines' own (seed + 777) init: the reference's
    # whole tensors (a tp rank's shard of a replicated param is whole; split ones are not)
    ref = torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)
    whole = [k for k in trainable if (r := ref.get(k.rpartition(":")[2])) is not None
             and r.shape == after["held"][k]["fp32"].shape]
    assert 2 * len(whole) >= len(trainable), whole
    for k in whole:
        assert torch.equal(after["held"][k]["fp32"], ref[k.rpartition(":")[2]]), k


@needs_deepspeed
def test_a_pipelines_bf16_zero0_loads_at_no_other_size_either(tmp_path):
    """What the refusal of a pipeline's bf16 ZeRO-0 (BF16_Optimizer files) says: DeepSpeed's own
    load fails (KeyError: the dp rank, in BF16_Optimizer's legacy load), here at another size."""
    name = "parallel/pp2_dp1_s0_bf16"
    cmd = [DS_PYTHON, str(WORKER), "--ckpt", str(FIXTURES / name), "--manifest",
           str(FIXTURES / name / "manifest.json"), "--world-size", "4", "--result", str(tmp_path / "r.pt")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode != 0 and not (tmp_path / "r.pt").exists()
    assert "in load_checkpoint" in p.stderr and "bf16_optimizer.py" in p.stderr, p.stderr[-3000:]
    assert re.search(r"KeyError: [01]\n", p.stderr), p.stderr[-3000:]  # the first rank to fail's dp rank
    with pytest.raises(NotMergeable, match="no DeepSpeed engine loads one"):
        reshard(open_checkpoint(FIXTURES / name), tmp_path / "out", 4)
