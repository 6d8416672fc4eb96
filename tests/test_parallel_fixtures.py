"""The parallel-layout fixtures in tests/fixtures/parallel/: real DeepSpeed 0.19.8 checkpoints of
pipeline, tensor (AutoTP) and expert (native MoE) parallel runs, ZeRO-0, CPU offload and ZeRO++
hpZ, made by tests/tools/make_fixtures.py (`--parallel`). They live one level down so the tests
that run over every fixture (conftest.fixture_names) skip them until their layout is merged.

Two kinds of tests. The first sections hold what stays true whatever zinspect learns: each fixture
is what its manifest says, and zinspect opens it in both path forms without a crash, never
inventing a name. The section marked TODAY pins what zinspect says about them before issue 10
(layouts "recognised, not merged", some of them misnamed); issue 10 flips those assertions.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TESTS, run_zinspect

import zinspect
from zinspect.core import open_checkpoint
from zinspect.core.merge import plan_merge
from zinspect.errors import NotMergeable

PARALLEL = FIXTURES / "parallel"
NAMES = sorted(p.parent.name for p in PARALLEL.glob("*/manifest.json"))
PIPELINES = [n for n in NAMES if n.startswith("pp")]
TENSOR_PARALLEL = [n for n in NAMES if n.startswith("tp")]
MOE = [n for n in NAMES if n.startswith("moe")]


def manifest(name: str) -> dict:
    return json.loads((PARALLEL / name / "manifest.json").read_text())


@functools.cache
def reference(name: str) -> dict:
    return torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)


@functools.cache
def info(name: str, form: str) -> dict:
    """`zinspect info --json` on the fixture's root (form "root") or its tag dir ("tag")."""
    path = PARALLEL / name if form == "root" else PARALLEL / name / manifest(name)["tag"]
    r = run_zinspect("info", "--json", path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def load_make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", TESTS / "tools" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the fixtures are what they say

def test_the_committed_set_is_the_generated_set():
    assert NAMES == sorted(load_make_fixtures().PARALLEL_FIXTURES)
    assert {"pipeline", "autotp", "moe", "zero-variant"} == {manifest(n)["layout"] for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_manifest_files_are_the_files_on_disk(name):
    root = PARALLEL / name
    on_disk = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    on_disk.pop("manifest.json")
    assert manifest(name)["files"] == on_disk  # no DeepSpeed script copies, no universal tree
    assert sum(on_disk.values()) < 512 * 1024, "fixtures stay small"


@pytest.mark.parametrize("name", NAMES)
def test_generator_checks_passed(name):
    """The generator checked the reference independently (layer / expert / shard files against
    it, DeepSpeed reloading the checkpoint); a failed check is a DeepSpeed gap it names."""
    for check, result in manifest(name)["checks"].items():
        if isinstance(result, dict):
            assert result.get("ok") or result.get("known_gap"), (check, result)
        else:
            assert result is True, check


@pytest.mark.parametrize("name", NAMES)
def test_reference_holds_the_manifests_names_and_shapes(name):
    m, ref = manifest(name), reference(name)
    buffers = m.get("buffers") or {}
    assert set(ref) == set(m["params"]) | set(buffers)
    for n, p in m["params"].items():
        assert list(ref[n].shape) == p["shape"], n
        assert ref[n].dtype == torch.float32, n
    for n, shape in buffers.items():
        assert list(ref[n].shape) == shape, n
    aliases = {a: o for a, o in (m.get("tied") or {}).items() if isinstance(o, str)}
    for alias, owner in aliases.items():  # tied names share one tensor
        assert ref[alias].data_ptr() == ref[owner].data_ptr(), alias


# ------------------------------------------------------------------ zinspect reads them

@pytest.mark.parametrize("form", ["root", "tag"])
@pytest.mark.parametrize("name", NAMES)
def test_info_reads_it_and_invents_no_name(name, form):
    m, j = manifest(name), info(name, form)
    assert j["tag"] == m["tag"]
    names = [p["name"] for p in j["params"]]
    assert len(names) == len(set(names))
    assert set(names) <= set(m["params"])
    assert {b["name"] for b in j["buffers"]} <= set(m.get("buffers") or {})
    for p in j["params"]:
        if p["tied_to"]:
            assert m["tied"][p["name"]] == p["tied_to"]


@pytest.mark.parametrize("name", NAMES)
def test_open_checkpoint_reads_it(name):
    ckpt = open_checkpoint(PARALLEL / name)
    assert set(ckpt.params) <= set(manifest(name)["params"])


@pytest.mark.parametrize("name", [n for n in NAMES if n not in PIPELINES])
def test_stage_is_the_manifests(name):
    assert open_checkpoint(PARALLEL / name).stage == manifest(name)["stage"]


@pytest.mark.parametrize("name", ["offload_s3_w2", "hpz_s3_w4"])
def test_offload_and_hpz_merge_bit_exact(name):
    """Offload and hpZ save the files of plain ZeRO-3 (the generator diffed them against a plain
    run: manifest checks.layout_vs_plain), so the plain merge applies."""
    assert manifest(name)["checks"]["layout_vs_plain"]["same_file_names"]
    state, ref = zinspect.get_fp32_state_dict(PARALLEL / name), reference(name)
    assert list(state) == list(ref)
    for n, t in ref.items():
        assert state[n].dtype == t.dtype and torch.equal(state[n], t), n


# ------------------------------------------------------------------ TODAY (issue 10 flips these)
# What zinspect says before the parallel layouts are implemented: the layout name, the stage it
# reads and which params it can see. Each line of TODAY is a known shortcoming, not a goal.

#: name -> (layout reported, stage reported)
TODAY = {
    # pipelines are called tensor_parallel: several mp_rank_SS files (one per stage) come first
    "pp2_dp2_s1_fp32": ("tensor_parallel", 1),
    "pp2_dp2_s1_bf16_pmd": ("tensor_parallel", 1),
    "pp2_dp1_s0_bf16": ("tensor_parallel", 1),  # ZeRO-0, read as 1 from its bf16_zero_pp_rank files
    "pp3_dp1_s0_fp32": ("tensor_parallel", None),  # ZeRO-0, no stage read at all
    "moe_ep2_w4_s2_fp32": ("moe", 2),
    "moe_ep2_w4_s1_top2_res": ("moe", 1),
    "z0_fp32": ("zero0", 0),
    "z0_bf16": ("zero0", 0),
    # offload and hpZ merge already; nothing says they are offload / hpZ runs
    "offload_s3_w2": ("zero", 3),
    "hpz_s3_w4": ("zero", 3),
}


#: fixtures whose layout issue 10 implemented: their tests follow TODAY
IMPLEMENTED = set(TENSOR_PARALLEL)


def test_today_covers_every_fixture():
    assert sorted(TODAY) == sorted(set(NAMES) - IMPLEMENTED)


@pytest.mark.parametrize("name", sorted(TODAY))
def test_today_layout_and_stage(name):
    layout, stage = TODAY[name]
    j = info(name, "root")
    assert (j["layout"], j["stage"]) == (layout, stage)
    codes = {f["code"] for f in j["findings"]}
    if layout == "zero":
        assert j["findings"] == []
    else:
        assert "unsupported-layout" in codes
        with pytest.raises(NotMergeable, match="cannot merge"):
            plan_merge(open_checkpoint(PARALLEL / name))


@pytest.mark.parametrize("name", PIPELINES)
def test_today_pipeline_shows_only_stage_0s_params(name):
    """mp_rank_00's param_shapes are stage 0's trainable ZeRO-1 groups; ZeRO-0 pipelines have none."""
    m = manifest(name)
    stage0 = {n for n, p in m["params"].items() if 0 in p["stages"] and not p["frozen"]}
    if m["stage"] == 0:
        stage0 = set()
    assert {p["name"] for p in info(name, "root")["params"]} == stage0


@pytest.mark.parametrize("name", [n for n in PIPELINES if manifest(n)["topology"] == "pipe-data"])
def test_today_layer_files_without_model_rank_are_extra_files(name):
    """`layer_XX-model_states.pt` (the pipe-data topology) is not matched as a layer file; only
    `layer_XX-model_TT-model_states.pt` is."""
    j = info(name, "root")
    layer_files = {Path(f).name for f in manifest(name)["files"] if Path(f).name.startswith("layer_")}
    assert layer_files
    assert {f["name"] for f in j["files"] if f["kind"] == "other"} == layer_files
    assert {f["file"] for f in j["findings"] if f["code"] == "extra-file"} == layer_files


@pytest.mark.parametrize("name", MOE)
def test_today_moe_shows_only_ep_rank_0s_experts(name):
    m = manifest(name)
    unseen = {p["name"] for e in m["experts"].values() if e["ep_rank"] != 0 for p in e["params"]}
    assert unseen
    assert {p["name"] for p in info(name, "root")["params"]} == set(m["params"]) - unseen


# ------------------------------------------------------------------ implemented by issue 10
@pytest.mark.parametrize("form", ["root", "tag"])
@pytest.mark.parametrize("name", TENSOR_PARALLEL)
def test_tensor_parallel_shows_full_shapes(name, form):
    """Was: tp rank 0's shard shapes under an unsupported-layout error. Now the full shapes the
    tp ranks' shards make (tests/test_layout_tp.py checks shards, damage and the merge)."""
    m = manifest(name)
    j = info(name, form)
    assert (j["layout"], j["stage"], j["world_size"], j["findings"]) == \
        ("tensor_parallel", m["stage"], m["world_size"], [])
    shown = {p["name"]: p["shape"] for p in j["params"]}
    assert shown == {n: p["shape"] for n, p in m["params"].items()}
    assert any(p["shard_shape"] != p["shape"] for p in m["params"].values())
