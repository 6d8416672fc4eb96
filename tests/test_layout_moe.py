"""The native-MoE layout (zinspect/core/layouts/moe.py) on the real expert-parallel fixtures in
tests/fixtures/parallel/moe*: every expert of every MoE layer under its global id, expert groups
partitioned over their expert-data-parallel ranks, the merge bit for bit, and damaged copies
(a missing expert file, a missing rank, files of another topology) with exact findings."""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TESTS, run_zinspect

import zinspect
from zinspect.core import open_checkpoint
from zinspect.core.layouts.moe_names import global_name
from zinspect.core.merge import plan_merge
from zinspect.errors import NotMergeable

PARALLEL = FIXTURES / "parallel"
MOE = sorted(p.parent.name for p in PARALLEL.glob("moe*/manifest.json"))


def manifest(name: str) -> dict:
    return json.loads((PARALLEL / name / "manifest.json").read_text())


@functools.cache
def reference(name: str) -> dict:
    return torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)


def copy(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    root.mkdir()
    shutil.copy2(PARALLEL / name / "latest", root / "latest")
    shutil.copytree(PARALLEL / name / manifest(name)["tag"], root / manifest(name)["tag"])
    return root / manifest(name)["tag"]


def codes(ckpt) -> list[tuple[str, str | None]]:
    return sorted((f.code, f.file) for f in ckpt.findings)


def test_global_name():
    name = "layers.1.moe.deepspeed_moe.experts.deepspeed_experts.1.fc2.bias"
    assert global_name(name, 1, 2) == name.replace("experts.1.", "experts.3.")
    assert global_name(name, 0, 2) == name
    assert global_name("layers.1.norm.weight", 1, 2) == "layers.1.norm.weight"


@pytest.mark.parametrize("name", MOE)
def test_every_expert_under_its_global_id(name):
    m, c = manifest(name), open_checkpoint(PARALLEL / name)
    assert (c.layout, c.stage, c.world_size, c.findings) == ("moe", m["stage"], m["world_size"], [])
    assert c.master_dtype == "float32"
    assert (c.topology.dp, c.topology.ep, c.topology.pp, c.topology.tp) == \
        (m["world_size"], m["ep_size"], 1, 1)
    assert {n: p.shape for n, p in c.params.items()} == \
        {n: tuple(p["shape"]) for n, p in m["params"].items()}
    assert not any(p.frozen or p.tied_to for p in c.params.values())
    # each expert's fp32 master lies in the optimizer files of the ranks of its ep rank (ZeRO-0
    # fp32: in its expert file, whose fp32 weights are the masters; 16-bit: in its ep rank's
    # fp32_groups, ep rank 0's in mp_rank_00)
    for e in m["experts"].values():
        ranks = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in e["held_by_ranks"]} \
            if m["stage"] else {Path(e["file"]).name} if m["dtype"] == "fp32" else \
            {f"expp_rank_{e['ep_rank']}_mp_rank_00_optim_states.pt" if e["ep_rank"] else
             "mp_rank_00_model_states.pt"}
        for p in e["params"]:
            fragments = c.params[p["name"]].fragments
            assert {f.file for f in fragments} <= ranks, p["name"]
            assert sum(f.numel for f in fragments) == c.params[p["name"]].numel
    # expert groups: one per ep rank and flat group, cut over the expert-data-parallel ranks
    # (ZeRO-0: whole, in that ep rank's optimizer; was: no groups at ZeRO-0)
    expert_groups = [g for g in c.groups if g.coords is not None and g.coords.ep is not None and
                     any("deepspeed_experts" in n for n in g.params)]
    assert len(expert_groups) == 2 * m["ep_size"]
    assert all(len(g.partition_numel) == (m["expert_dp_size"] if m["stage"] else 1)
               for g in expert_groups)
    expert_files = {f.name: f.coords for f in c.files if f.kind == "expert"}
    assert len(expert_files) == m["moe_layers"] * m["num_experts"]
    for e in m["experts"].values():
        coords = expert_files[Path(e["file"]).name]
        assert (coords.layer, coords.expert, coords.ep) == \
            (e["moe_layer_id"], e["global_expert_id"], e["ep_rank"])


@pytest.mark.parametrize("name", MOE)
def test_merge_is_the_reference_bit_for_bit(name):
    state, ref = zinspect.get_fp32_state_dict(PARALLEL / name), reference(name)
    assert set(state) == set(ref)
    for n, t in ref.items():
        assert state[n].dtype == t.dtype and torch.equal(state[n], t), n


@pytest.mark.parametrize("name", MOE)
def test_validate_exits_0(name):
    r = run_zinspect("validate", PARALLEL / name)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ damaged copies
EXPERT = "layer_1_expert_3_mp_rank_00_model_states.pt"


def test_missing_expert_file_is_located(tmp_path):
    """Expert 3's fp32 masters are still in the optimizer files, so --salvage writes them all;
    the missing file is an error (DeepSpeed could not resume), never passed over."""
    tag = copy(tmp_path, "moe_ep2_w4_s2_fp32")
    (tag / EXPERT).unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("missing-expert-file", EXPERT)]
    assert "(expert 3): its 16-bit weights of MoE layer 1 (layers.1.moe)" in c.findings[0].message
    with pytest.raises(NotMergeable):
        plan_merge(c)
    assert plan_merge(c, salvage=True).dropped == {}


def test_missing_rank_drops_exactly_its_params(tmp_path):
    """Rank 3 is ep rank 1's second expert-data-parallel rank: its file holds the tail of the
    dense groups and half of experts 2 and 3's partitions."""
    tag = copy(tmp_path, "moe_ep2_w4_s2_fp32")
    intact = open_checkpoint(tag.parent)
    lost_file = "zero_pp_rank_3_mp_rank_00_optim_states.pt"
    (tag / lost_file).unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("missing-optimizer-file", lost_file)]
    assert c.findings[0].rank == 3
    lost = {n for n, p in intact.params.items() if any(f.file == lost_file for f in p.fragments)}
    assert any("deepspeed_experts.3." in n for n in lost) and "head.weight" in lost
    assert not any("deepspeed_experts.1." in n for n in lost)  # ep rank 0's experts are whole
    assert set(plan_merge(c, salvage=True).dropped) == lost
    with pytest.warns(RuntimeWarning):
        state = zinspect.get_fp32_state_dict(tag.parent, salvage=True)
    ref = reference("moe_ep2_w4_s2_fp32")
    assert set(state) == set(ref) - lost
    assert all(torch.equal(state[n], ref[n]) for n in state)


@pytest.mark.parametrize("stale, source", [
    ("layer_1_expert_5_mp_rank_00_model_states.pt", EXPERT),  # 4 experts per layer
    ("layer_2_expert_0_mp_rank_00_model_states.pt", EXPERT),  # 2 MoE layers
    ("zero_pp_rank_4_mp_rank_00_optim_states.pt", "zero_pp_rank_3_mp_rank_00_optim_states.pt"),
])
def test_stale_file_of_another_topology(tmp_path, stale, source):
    tag = copy(tmp_path, "moe_ep2_w4_s2_fp32")
    shutil.copy(tag / source, tag / stale)
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("stale-rank-file", stale)]
    with pytest.raises(NotMergeable):
        plan_merge(c)


def test_expert_file_of_another_expert(tmp_path):
    """A file under expert 2's name holding expert 3's tensors (renamed by hand) is found."""
    tag = copy(tmp_path, "moe_ep2_w4_s2_fp32")
    wrong = "layer_1_expert_2_mp_rank_00_model_states.pt"
    shutil.copy(tag / EXPERT, tag / wrong)
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("stale-rank-file", wrong)]
    assert "deepspeed_experts.3.fc1.weight, which is not a param of expert 2" in c.findings[0].message


DS_PYTHON = os.environ.get("ZINSPECT_DS_PYTHON")
#: run by DeepSpeed's python: the generator's MoE model with every expert local (ep_size 1 names
#: them by global id, as the merge does), loaded strictly from the merged state dict
_STRICT_LOAD = """
import importlib.util, json, sys, types, torch
spec = importlib.util.spec_from_file_location("make_ds_moe", sys.argv[1])
gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)
m = json.load(open(sys.argv[2]))
args = types.SimpleNamespace(width=m["model"]["width"], vocab=m["model"]["vocab"],
    num_experts=m["num_experts"], ep_size=1, top_k=m["top_k"], use_residual=m["use_residual"],
    moe_layers=m["moe_layers"])
model = gen.build_model(args)
model.load_state_dict(torch.load(sys.argv[3], weights_only=True), strict=True)
print("loaded", sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.skipif(not DS_PYTHON, reason="set ZINSPECT_DS_PYTHON to a python with deepspeed==0.19.8")
@pytest.mark.parametrize("name", MOE)
def test_merge_loads_strictly_into_the_generators_model(tmp_path, name):
    out = tmp_path / "merged.pt"
    torch.save(zinspect.get_fp32_state_dict(PARALLEL / name), out)
    r = subprocess.run([DS_PYTHON, "-c", _STRICT_LOAD, str(TESTS / "tools" / "make_ds_moe.py"),
                        str(PARALLEL / name / "manifest.json"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == str(manifest(name)["model"]["num_params_unique"])


# ------------------------------------------------------------------ ZeRO-0
Z0 = "moe_ep2_w4_s0_fp32"


def test_zero0_moe_masters_are_the_fp32_weights():
    c = open_checkpoint(PARALLEL / Z0)
    assert {f.kind for f in c.files} == {"model", "expert", "expert_optim"}
    assert {(f.name, f.coords.ep) for f in c.files if f.kind == "expert_optim"} == \
        {("expp_rank_0_mp_rank_00_optim_states.pt", 0), ("expp_rank_1_mp_rank_00_optim_states.pt", 1)}
    for name, p in c.params.items():
        (f,) = p.fragments
        assert (f.source, f.dtype) == ("master", "float32"), name
        assert f.file == ("mp_rank_00_model_states.pt" if "deepspeed_experts" not in name else
                          f"layer_{name.split('.')[1]}_expert_{name.split('.')[6]}_mp_rank_00"
                          "_model_states.pt"), name


def test_zero0_moe_missing_expert_file_names_its_params(tmp_path):
    """Expert 3's weights were only in its file: its params are named (after expert 2's) and
    left out by --salvage, never silently absent."""
    tag = copy(tmp_path, Z0)
    (tag / EXPERT).unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("missing-expert-file", EXPERT)]
    lost = {n for n in reference(Z0) if "layers.1.moe.deepspeed_moe.experts.deepspeed_experts.3." in n}
    assert len(lost) == 4 and lost <= set(c.params)
    assert set(plan_merge(c, salvage=True).dropped) == lost


def test_zero0_moe_missing_expert_optimizer_file(tmp_path):
    tag = copy(tmp_path, Z0)
    name = "expp_rank_1_mp_rank_00_optim_states.pt"
    (tag / name).unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("missing-optimizer-file", name)]
    assert plan_merge(c, salvage=True).dropped == {}  # the fp32 weights are all there


def test_an_optimizer_file_of_another_step_is_located(tmp_path):
    """Rank 2's file with Adam's step 3 (its step record rewritten in place), as if saved later."""
    from damage import zip_entry

    from zinspect.core.torchzip import read_torch_file

    tag = copy(tmp_path, "moe_ep2_w4_s2_fp32")
    name = "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    step = read_torch_file(tag / name).obj["optimizer_state_dict"]["base_optimizer_state"][
        "state"][0]["step"]
    offset, _ = zip_entry(tag / name, f"data/{step.storage.key}")
    with open(tag / name, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<f", 3.0))
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("step-mismatch", name)]
    with pytest.raises(NotMergeable):
        plan_merge(c)


def test_a_dropped_ep_rank_drops_exactly_its_experts_and_dense_share(tmp_path):
    """Ep rank 1 gone whole (ranks 1 and 3's optimizer files, experts 2 and 3's files): its
    experts are still named (global ids from ep rank 0's local names), located nowhere and left
    out with the dense params those ranks held; nothing else is lost."""
    tag = copy(tmp_path, "moe_ep2_w4_s2_fp32")
    intact = open_checkpoint(tag.parent)
    gone = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (1, 3)] + \
        [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in (2, 3)]
    for name in gone:
        (tag / name).unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == sorted([("missing-optimizer-file", n) for n in gone[:2]] +
                              [("missing-expert-file", n) for n in gone[2:]])
    lost = {n for n, p in intact.params.items() if any(f.file in gone for f in p.fragments)}
    assert {n for n in lost if "deepspeed_experts" in n} == \
        {n for n in intact.params if "deepspeed_experts.2." in n or "deepspeed_experts.3." in n}
    assert set(plan_merge(c, salvage=True).dropped) == lost


Z0_16 = "moe_ep2_w2_s0_bf16"  # FP16_UnfusedOptimizer: masters in fp32_groups (was: refused by name)


def _read(ckpt, f) -> torch.Tensor:
    with open(ckpt.path / f.file, "rb") as fh:
        fh.seek(f.offset)
        return torch.frombuffer(bytearray(fh.read(f.nbytes)), dtype=torch.float32)


@pytest.mark.parametrize("name", [Z0, Z0_16])
def test_zero0_moe_masters_and_moments_are_each_ep_ranks_optimizer(name):
    """The dense params' and ep rank 0's experts' entries in mp_rank_00's optimizer, ep rank X's
    experts' in expp_rank_X's, at the positions rank 0's groups were matched to: there the torch
    state (exp_avg, exp_avg_sq) equals what the core locates, and at bf16 the fp32_groups entry
    is the reference master (which checks the positions)."""
    from torchload import torch_load

    c = open_checkpoint(PARALLEL / name)
    assert c.states == ["fp32", "exp_avg", "exp_avg_sq"] and c.findings == []
    checked = set()
    for g in c.groups:
        x = g.coords.ep if g.coords is not None else 0
        file = f"expp_rank_{x}_mp_rank_00_optim_states.pt" if x else "mp_rank_00_model_states.pt"
        opt = torch_load(c.path / file)["optimizer"]
        inner = opt.get("optimizer_state_dict", opt)
        for i, pname in enumerate(g.params):
            if "fp32_groups" in opt:
                assert torch.equal(opt["fp32_groups"][g.index][i], reference(name)[pname]), pname
                (f,) = c.state_fragments(pname, "fp32")
                assert f.file == file
            per = inner["state"][inner["param_groups"][g.index]["params"][i]]
            for key in ("exp_avg", "exp_avg_sq"):
                (f,) = c.state_fragments(pname, key)
                assert f.file == file and torch.equal(_read(c, f), per[key].flatten()), (pname, key)
            checked.add(pname)
    assert checked == set(reference(name))


def test_zero0_16bit_moe_missing_expert_optimizer_file_drops_its_experts(tmp_path):
    """16-bit: ep rank 1's experts' masters are only in expp_rank_1 (the expert files hold bf16
    copies): that file lost, exactly its experts are left out, named, never written from bf16."""
    tag = copy(tmp_path, Z0_16)
    name = "expp_rank_1_mp_rank_00_optim_states.pt"
    (tag / name).unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("missing-optimizer-file", name)]
    with pytest.raises(NotMergeable):
        plan_merge(c)
    experts = manifest(Z0_16)["experts"].values()
    lost = {p["name"] for e in experts if e["ep_rank"] == 1 for p in e["params"]}
    assert lost and set(plan_merge(c, salvage=True).dropped) == lost
