"""The universal writer on native MoE checkpoints (`merge --format universal`, ZeRO-1/2).

DeepSpeed's own ds_to_universal fails on native MoE (an engine names its experts locally, so
the ranks' names collide), but its loader slices expert params by ep rank when the file says
`is_expert_param` / `ep_num_experts` (checkpoint/universal_checkpoint.py). So each LOCAL expert
name gets the stack over ep ranks of the global experts it stands for (zinspect.core.universal_moe):

- without DeepSpeed: every stacked fp32 / exp_avg / exp_avg_sq equals the source's experts
  (reference_fp32.pt and expected.py's torch-alone rebuild) in ep rank order, DeepSpeed's keys;
  dense params as for plain ZeRO; ZeRO-0 MoE refused with DeepSpeed's reason;
- real engines at another world size (4 -> 2 ranks, ep 2: expert-data-parallel 2 -> 1) load it
  with "checkpoint": {"load_universal": true}, hold every master and moment of the source bit
  for bit (each rank its own ep rank's experts) and train a step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

from zinspect.core import open_checkpoint
from zinspect.core.universal import write_universal
from zinspect.errors import NotMergeable

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent / "ds_resume"))
from expected import STUB_PICKLE, expected_moe_states  # noqa: E402

PARALLEL = FIXTURES / "parallel"
CONVERTED = ["moe_ep2_w4_s2_fp32", "moe_ep2_w4_s1_top2_res"]
EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."
DS_PYTHON = os.environ.get("ZINSPECT_DS_PYTHON")


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=STUB_PICKLE)


def manifest(name: str) -> dict:
    return json.loads((PARALLEL / name / "manifest.json").read_text())


@pytest.fixture(scope="module", params=CONVERTED)
def converted(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name) / "uni"
    result = write_universal(open_checkpoint(PARALLEL / name), out)
    return name, out, result


def test_local_expert_files_stack_the_ep_ranks_experts(converted):
    name, out, result = converted
    m = manifest(name)
    ep, local = m["ep_size"], m["num_local_experts"]
    zero = out / result.tag / "zero"
    ref = torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)
    want = expected_moe_states(str(PARALLEL / name / m["tag"]), ep)
    assert set(want) == set(ref)
    stacked = dense = 0
    for pname, states in want.items():
        prefix, rest = pname.split(EXPERTS) if EXPERTS in pname else (None, None)
        if prefix is None:  # a dense param: as for plain ZeRO
            for state, t in states.items():
                got = _load(zero / pname / f"{state}.pt")
                assert list(got) == ["cat_dim", "param"] and torch.equal(got["param"].reshape(-1), t)
            assert torch.equal(_load(zero / pname / "fp32.pt")["param"], ref[pname])
            dense += 1
            continue
        gid, leaf = rest.split(".", 1)
        ep_rank, j = divmod(int(gid), local)  # global = ep_rank * num_local + local
        for state, t in states.items():
            got = _load(zero / f"{prefix}{EXPERTS}{j}.{leaf}" / f"{state}.pt")
            assert list(got) == ["param", "cat_dim", "is_expert_param", "ep_num_experts"]
            assert got["is_expert_param"] is True and got["ep_num_experts"] == ep
            assert got["param"].shape == (ep, *ref[pname].shape)
            assert torch.equal(got["param"][ep_rank].reshape(-1), t), (pname, state)
            if state == "fp32":
                assert torch.equal(got["param"][ep_rank], ref[pname])
        stacked += 1
    assert stacked == m["num_experts"] * m["moe_layers"] * 4 and dense >= 10
    # only local expert names (j < num_local) under zero/; every one has its step
    dirs = [d.name for d in zero.iterdir() if d.is_dir() and EXPERTS in d.name]
    assert {int(d.split(EXPERTS)[1].split(".")[0]) for d in dirs} == set(range(local))
    assert all(int(_load(zero / d / "step.pt")) == m["global_steps"] for d in dirs)
    tops = sorted(p.name for p in (out / result.tag).iterdir() if p.is_file())
    assert tops == ["mp_rank_00_model_states.pt"]  # no expert files: the universal load reads none
    assert not result.unverified and result.verified
    assert any(f"ep_size {ep}" in n for n in result.notes)  # bound to the run's ep size: said


def test_zero0_moe_is_refused_with_deepspeeds_reason(tmp_path):
    with pytest.raises(NotMergeable, match=r"ZeRO-0 MoE .* only through a ZeRO optimizer "
                       r"\(deepspeed/runtime/engine.py"):
        write_universal(open_checkpoint(PARALLEL / "moe_ep2_w4_s0_fp32"), tmp_path / "u")
    assert not (tmp_path / "u").exists() or not os.listdir(tmp_path / "u")


@pytest.mark.skipif(not DS_PYTHON, reason="set ZINSPECT_DS_PYTHON to a python with deepspeed==0.19.8")
def test_deepspeeds_own_converter_fails_on_it(tmp_path):
    """Why there is nothing of DeepSpeed's to compare with: ds_to_universal.py cannot convert a
    native MoE checkpoint (the ranks' local expert names collide, parallel-layouts.md §4)."""
    name = CONVERTED[0]
    r = subprocess.run([DS_PYTHON, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(PARALLEL / name / manifest(name)["tag"]), "--output_folder",
                        str(tmp_path / "ds" / "u"), "--inject_missing_state", "--num_extract_workers",
                        "1", "--num_merge_workers", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "is invalid for input of size" in r.stderr, r.stderr[-500:]


@pytest.mark.skipif(not DS_PYTHON, reason="set ZINSPECT_DS_PYTHON to a python with deepspeed==0.19.8")
@pytest.mark.parametrize("name", CONVERTED)
def test_engines_load_it_at_another_world_size_and_train(tmp_path, name):
    write_universal(open_checkpoint(PARALLEL / name), tmp_path / "uni")
    result, world = tmp_path / "held", 2
    subprocess.run([DS_PYTHON, str(Path(__file__).parent / "ds_resume" / "moe_universal_worker.py"),
                    "--ckpt", str(tmp_path / "uni"), "--manifest", str(PARALLEL / name / "manifest.json"),
                    "--world-size", str(world), "--result", str(result)],
                   check=True, capture_output=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    m = manifest(name)
    want = expected_moe_states(str(PARALLEL / name / m["tag"]), m["ep_size"])
    seen, compared = set(), 0
    for rank in range(world):
        got = torch.load(f"{result}.{rank}.pt", weights_only=False)
        assert got["loaded"] and got["global_steps"] == m["global_steps"]
        assert got["steps_after"] == m["global_steps"] + 1 and got["loss_finite"]
        assert set(got["ep_ranks"]) == {rank % m["ep_size"]}
        for pname, states in got["held"].items():  # under global expert ids
            for state, t in states.items():
                assert t is not None and torch.equal(t.reshape(-1), want[pname][state]), (rank, pname, state)
                compared += 1
            seen.add(pname)
    assert seen == set(want) and compared >= 3 * len(want)
