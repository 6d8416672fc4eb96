"""The pipeline layout (zinspect/core/layouts/pipeline.py) on the real PipelineModule fixtures in
tests/fixtures/parallel/pp*: names as DeepSpeed's own, tied params once with their other stages'
fp32 copies, layer files, buffers, the merge bit for bit, and damaged copies with exact findings."""

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
from zinspect.core.layouts.gaps import missing_coords
from zinspect.core.merge import plan_merge
from zinspect.errors import NotMergeable

PARALLEL = FIXTURES / "parallel"
#: pp x dp pipelines (pp x tp x dp ones, layout pipeline_tp: tests/test_layout_pptp.py)
PIPELINES = sorted(p.parent.name for p in PARALLEL.glob("pp*/manifest.json") if "_tp" not in p.parent.name)
#: a ZeRO-0 pipeline without optimizer files records no param names: the tied layer's tie key
#: is in no file (it is named by its layer index, with a warning)
UNNAMED = {"pp3_dp1_s0_fp32": {"1.weight": "tied_modules.embed.weight"},
           "pp2_dp1_s0_fp16": {"1.weight": "tied_modules.embed.weight"}}


def manifest(name: str) -> dict:
    return json.loads((PARALLEL / name / "manifest.json").read_text())


@functools.cache
def reference(name: str) -> dict:
    return torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)


def copy(tmp_path: Path, name: str) -> Path:
    """A private copy (latest + tag dir); returns its tag dir."""
    root = tmp_path / name
    root.mkdir()
    shutil.copy2(PARALLEL / name / "latest", root / "latest")
    shutil.copytree(PARALLEL / name / manifest(name)["tag"], root / manifest(name)["tag"])
    return root / manifest(name)["tag"]


def codes(ckpt) -> list[tuple[str, str | None]]:
    return sorted((f.code, f.file) for f in ckpt.findings)


def read(ckpt, fragment) -> torch.Tensor:
    with open(ckpt.path / fragment.file, "rb") as f:
        f.seek(fragment.offset)
        data = bytearray(f.read(fragment.nbytes))
    return torch.frombuffer(data, dtype=getattr(torch, fragment.dtype))


@pytest.mark.parametrize("name", PIPELINES)
def test_names_shapes_and_topology_are_deepspeeds(name):
    m, c = manifest(name), open_checkpoint(PARALLEL / name)
    assert (c.layout, c.stage, c.world_size) == ("pipeline", m["stage"], m["world_size"])
    assert (c.topology.pp, c.topology.dp, c.topology.tp, c.topology.ep) == (m["pp"], m["dp"], 1, 1)
    rename = UNNAMED.get(name, {})
    assert {rename.get(n, n): p.shape for n, p in c.params.items()} == \
        {n: tuple(p["shape"]) for n, p in m["params"].items()}
    assert {n: b.shape for n, b in c.buffers.items()} == {n: tuple(s) for n, s in m["buffers"].items()}
    assert all(p.tied_to is None for p in c.params.values())  # a tied param is there once
    for f in c.files:  # every layer file is one, at its layer
        assert f.kind != "other"
        if f.kind == "layer":
            assert f.name == f"layer_{f.coords.layer:02d}" + \
                ("-model_00" if m["topology"] == "pipe-model-data" else "") + "-model_states.pt"


@pytest.mark.parametrize("name", [n for n in PIPELINES if n not in UNNAMED])
def test_frozen_params_are_the_manifests(name):
    """ZeRO-1 and BF16_Optimizer stages name their trainable params; a layer param no stage
    holds is frozen, and its 16-bit layer weight is its value."""
    m, c = manifest(name), open_checkpoint(PARALLEL / name)
    assert {n for n, p in c.params.items() if p.frozen} == set(m["frozen"])
    for n in m["frozen"]:
        (f,) = c.params[n].fragments
        assert (f.source, f.file) == ("module", m["params"][n]["layer_files"][0]["file"])


@pytest.mark.parametrize("name", [n for n in PIPELINES if manifest(n)["stage"] == 1 or
                                  manifest(n)["dtype"] != "fp32"])
def test_tied_param_has_each_later_stages_copy(name):
    """The tied embedding's fp32 master is in every stage that uses it: the lowest stage's copy
    is the param's fragments, the others are Param.copies, and all equal the reference."""
    m, c = manifest(name), open_checkpoint(PARALLEL / name)
    (tied,) = m["tied"]
    p = c.params[{v: k for k, v in UNNAMED.get(name, {}).items()}.get(tied, tied)]
    stages = m["tied"][tied]["stages"]
    assert {f.file.split("mp_rank_")[1][:2] for f in p.fragments} == {f"{stages[0]:02d}"}
    assert sorted(p.copies) == stages[1:]
    ref = reference(name)[tied].flatten()
    for fragments in [p.fragments, *p.copies.values()]:
        assert sum(f.numel for f in fragments) == p.numel
        for f in fragments:
            assert torch.equal(read(c, f), ref[f.start:f.start + f.numel])


def test_zero0_fp32_pipeline_names_its_tied_layer_by_index_and_says_so():
    c = open_checkpoint(PARALLEL / "pp3_dp1_s0_fp32")
    found = {f.code: f for f in c.findings}
    assert sorted(found) == ["pipeline-stages-unknown", "pipeline-tied-unnamed"]
    assert (found["pipeline-tied-unnamed"].param, found["pipeline-tied-unnamed"].file) == \
        ("1.weight", "layer_01-model_states.pt")
    assert "stage(s) 2" in found["pipeline-tied-unnamed"].message
    assert not any(p.frozen for p in c.params.values())  # 3.norm.bias vs 3.norm.weight: unknown
    assert all(f.source == "master" and f.dtype == "float32" for p in c.params.values()
               for f in p.fragments)


@pytest.mark.parametrize("name", PIPELINES)
def test_merge_is_the_reference_bit_for_bit(name):
    state, ref = zinspect.get_fp32_state_dict(PARALLEL / name), reference(name)
    rename = UNNAMED.get(name, {})
    state = {rename.get(n, n): t for n, t in state.items()}
    assert set(state) == set(ref)
    for n, t in ref.items():
        assert state[n].dtype == t.dtype and torch.equal(state[n], t), n


@pytest.mark.parametrize("name", PIPELINES)
def test_validate_exits_0(name):
    r = run_zinspect("validate", PARALLEL / name)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ damaged copies
STAGE1_DP1 = "zero_pp_rank_1_mp_rank_01_optim_states.pt"


def test_missing_stage_optimizer_file(tmp_path):
    tag = copy(tmp_path, "pp2_dp2_s1_fp32")
    intact = open_checkpoint(tag.parent)
    (tag / STAGE1_DP1).unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("missing-optimizer-file", STAGE1_DP1)]
    assert c.findings[0].rank == 1
    with pytest.raises(NotMergeable):
        plan_merge(c)
    # --salvage drops exactly the params with elements in that file
    lost = {n for n, p in intact.params.items() if any(f.file == STAGE1_DP1 for f in p.fragments)}
    assert lost and "tied_modules.embed.weight" not in lost  # its stage-0 copy is whole
    plan = plan_merge(c, salvage=True)
    assert set(plan.dropped) == lost
    with pytest.warns(RuntimeWarning, match=f"left out {len(lost)} tensor"):
        state = zinspect.get_fp32_state_dict(tag.parent, salvage=True)
    ref = reference("pp2_dp2_s1_fp32")
    assert set(state) == set(ref) - lost
    assert all(torch.equal(state[n], ref[n]) for n in state)


def test_missing_layer_file(tmp_path):
    tag = copy(tmp_path, "pp2_dp2_s1_fp32")
    (tag / "layer_05-model_states.pt").unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("missing-layer-file", "layer_05-model_states.pt")]
    assert "layer 5" in c.findings[0].message
    assert not c.buffers["5.pos_scale"].intact  # the buffer was only in that file
    plan = plan_merge(c, salvage=True)
    assert set(plan.dropped) == {"5.pos_scale"}  # the fp32 masters are in the optimizer files


def test_missing_stage_model_states(tmp_path):
    """Stage 1's names come back from its optimizer's param_slice_mappings; its buffer names
    were only in mp_rank_01, so its buffers are not guessed: they are left out."""
    tag = copy(tmp_path, "pp2_dp2_s1_fp32")
    (tag / "mp_rank_01_model_states.pt").unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("missing-stage-file", "mp_rank_01_model_states.pt")]
    plan = plan_merge(c, salvage=True)
    assert set(plan.dropped) == {"5.pos_scale", "6.pos_scale"}
    assert not any(p.frozen for n, p in c.params.items() if n.startswith(("5.", "6.", "7.")))


@pytest.mark.parametrize("stale, source", [
    ("zero_pp_rank_0_mp_rank_02_optim_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"),
    ("zero_pp_rank_2_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ("mp_rank_02_model_states.pt", "mp_rank_01_model_states.pt"),
    ("layer_05-model_01-model_states.pt", "layer_05-model_states.pt"),
])
def test_stale_file_of_another_topology(tmp_path, stale, source):
    tag = copy(tmp_path, "pp2_dp2_s1_fp32")
    shutil.copy(tag / source, tag / stale)
    c = open_checkpoint(tag.parent)
    # a stage file's pickle says its mp_world_size: the core's topology check names it
    assert codes(c) == [("topology-mismatch" if stale.startswith("mp_rank") else "stale-rank-file",
                         stale)]
    with pytest.raises(NotMergeable):
        plan_merge(c)


def test_missing_coords_visits_only_what_is_there():
    assert missing_coords({(0, 0), (0, 1), (1, 1)}, (2, 2)) == (1, [(1, 0)])
    assert missing_coords({(0,), (5,)}, (3,)) == (2, [(1,), (2,)])  # (5,) is outside
    total, first = missing_coords({(0, 0)}, (10**9, 10**9), limit=3)
    assert (total, first) == (10**18 - 1, [(0, 1), (0, 2), (0, 3)])


def test_a_forged_stage_count_costs_what_the_files_cost(tmp_path):
    """checkpoint_parallel_dimensions saying a million stages: 16 located missing stages, then
    one finding for the rest (nothing walks the million)."""
    tag = copy(tmp_path, "pp2_dp2_s1_fp32")
    for s in (0, 1):
        path = tag / f"mp_rank_{s:02d}_model_states.pt"
        state = torch.load(path, weights_only=False)
        state["checkpoint_parallel_dimensions"]["pp_degree"] = 10**6
        torch.save(state, path)
    c = open_checkpoint(tag.parent)
    stages = [f for f in c.findings if f.code == "missing-stage-file"]
    assert [f.file for f in stages[:16]] == [f"mp_rank_{s:02d}_model_states.pt" for s in range(2, 18)]
    assert len(stages) == 17 and stages[16].message.startswith(f"{10**6 - 2 - 16} more stage files")
    optim = [f for f in c.findings if f.code == "missing-optimizer-file"]
    assert len(optim) == 17 and optim[0].file == "zero_pp_rank_0_mp_rank_02_optim_states.pt"


def test_zero0_fp16_pipeline_masters_are_each_stages_fp32_groups():
    """FP16_UnfusedOptimizer per stage: its fp32_groups matched to the stage's params (the tied
    layer's first on the stage that reuses it: that is the copy), never the fp16 weights."""
    c = open_checkpoint(PARALLEL / "pp2_dp1_s0_fp16")
    assert [f.code for f in c.findings] == ["pipeline-tied-unnamed"]
    for name, p in c.params.items():
        (f,) = p.fragments
        assert (f.source, f.dtype, f.file) == \
            ("master", "float32", f"mp_rank_0{0 if name[0] in '134' else 1}_model_states.pt"), name
    assert sorted(c.params["1.weight"].copies) == [1]


def _freeze_3_norm_bias(opt):
    """Stage 0 as if 3.norm.bias were frozen: its master gone from the no-decay group."""
    opt["fp32_groups"][1].pop(1)
    opt["optimizer_state_dict"]["param_groups"][1]["params"].pop()


def test_zero0_fp16_pipeline_with_undecidable_masters_is_refused(tmp_path):
    """A frozen norm bias beside its trainable norm weight (equal shapes): which fp32 master is
    which cannot be told, so stage 0's are not guessed; the tied param keeps stage 1's copy."""
    tag = copy(tmp_path, "pp2_dp1_s0_fp16")
    path = tag / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=False)
    _freeze_3_norm_bias(state["optimizer"])
    torch.save(state, path)
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("pipeline-stages-unknown", None), ("pipeline-tied-unnamed",
                        "layer_01-model_states.pt"), ("zero0-order-unknown", path.name)]
    with pytest.raises(NotMergeable):
        plan_merge(c)
    stage0 = {n for n in c.params if n.startswith(("3.", "4."))}
    assert set(plan_merge(c, salvage=True).dropped) == stage0
    assert [f.file for f in c.params["1.weight"].fragments] == ["mp_rank_01_model_states.pt"]


DS_PYTHON = os.environ.get("ZINSPECT_DS_PYTHON")
#: run by DeepSpeed's python: the generator's PipelineModule with all its layers on one stage
#: (its state_dict names are the pipeline's: `3.up.weight`, `tied_modules.embed.weight`), loaded
#: strictly from the merged state dict
_STRICT_LOAD = """
import importlib.util, json, os, socket, sys, types, torch
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
import deepspeed
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo")
spec = importlib.util.spec_from_file_location("make_ds_pipeline", sys.argv[1])
gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)
m = json.load(open(sys.argv[2]))
args = types.SimpleNamespace(width=m["model"]["width"], blocks=m["model"]["blocks"],
    vocab=m["model"]["vocab"], tied=m["model"]["tied"], frozen=bool(m["frozen"]), seed=0,
    topology="pipe-data", partition_method="parameters")
model = gen.build_pipeline_module(args, 1, 1)
model.load_state_dict(torch.load(sys.argv[3], weights_only=True), strict=True)
print("loaded", sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.skipif(not DS_PYTHON, reason="set ZINSPECT_DS_PYTHON to a python with deepspeed==0.19.8")
@pytest.mark.parametrize("name", PIPELINES)
def test_merge_loads_strictly_into_the_generators_pipeline_module(tmp_path, name):
    out = tmp_path / "merged.pt"
    rename = UNNAMED.get(name, {})
    torch.save({rename.get(n, n): t for n, t in zinspect.get_fp32_state_dict(PARALLEL / name).items()},
               out)
    r = subprocess.run([DS_PYTHON, "-c", _STRICT_LOAD, str(TESTS / "tools" / "make_ds_pipeline.py"),
                        str(PARALLEL / name / "manifest.json"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == str(manifest(name)["model"]["num_params_unique"])


@pytest.mark.parametrize("key, value, code", [("global_steps", 3, "step-mismatch"),
                                              ("dp_world_size", 4, "world-size-mismatch")])
def test_a_stage_file_of_another_save_is_located(tmp_path, key, value, code):
    tag = copy(tmp_path, "pp2_dp2_s1_fp32")
    path = tag / "mp_rank_01_model_states.pt"
    state = torch.load(path, weights_only=False)
    state[key] = value
    torch.save(state, path)
    c = open_checkpoint(tag.parent)
    assert codes(c) == [(code, path.name)]
    with pytest.raises(NotMergeable):
        plan_merge(c)


def test_an_optimizer_file_of_another_step_is_located(tmp_path):
    """Stage 1's dp-1 optimizer file with Adam's step 3 (as if saved one step later; the step
    record rewritten in place): the other stages' files are read for their step too."""
    from damage import zip_entry

    from zinspect.core.torchzip import read_torch_file

    tag = copy(tmp_path, "pp2_dp2_s1_fp32")
    path = tag / STAGE1_DP1
    osd = read_torch_file(path).obj["optimizer_state_dict"]
    step = osd["base_optimizer_state"]["state"][0]["step"]
    offset, size = zip_entry(path, f"data/{step.storage.key}")
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<f", 3.0))
    c = open_checkpoint(tag.parent)
    assert codes(c) == [("step-mismatch", STAGE1_DP1)]
    assert "at optimizer step 3, the other files at optimizer step 2" in c.findings[0].message


def test_a_dropped_stage_drops_exactly_its_params(tmp_path):
    """Stage 1's model states and optimizer files gone, its layer files left: its layers' params
    are named from those files, located nowhere, and left out by --salvage — the rest is whole."""
    tag = copy(tmp_path, "pp2_dp2_s1_fp32")
    gone = ["mp_rank_01_model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt", STAGE1_DP1]
    for name in gone:
        (tag / name).unlink()
    c = open_checkpoint(tag.parent)
    assert codes(c) == sorted([("missing-stage-file", gone[0]), ("missing-optimizer-file", gone[1]),
                               ("missing-optimizer-file", gone[2])])
    stage1 = {n for n, p in manifest("pp2_dp2_s1_fp32")["params"].items() if p["stages"] == [1]}
    stage1 |= {"5.pos_scale", "6.pos_scale"}  # its buffer names were in mp_rank_01 only
    plan = plan_merge(c, salvage=True)
    assert set(plan.dropped) == stage1
    ref = reference("pp2_dp2_s1_fp32")
    assert {t.name for t in plan.tensors} == set(ref) - stage1
