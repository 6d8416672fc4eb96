"""The parallel-layout fixtures in tests/fixtures/parallel/: real DeepSpeed 0.19.8 checkpoints of
pipeline, tensor (AutoTP) and expert (native MoE) parallel runs, ZeRO-0, CPU offload and ZeRO++
hpZ, made by tests/tools/make_fixtures.py (`--parallel`). They live one level down so the tests
that run over every fixture (conftest.fixture_names) skip them until their layout is merged.

Two kinds of tests. The first sections hold what stays true whatever zinspect learns: each fixture
is what its manifest says, and zinspect opens it in both path forms without a crash, never
inventing a name. The section marked TODAY said what zinspect read before issue 10 (layouts
"recognised, not merged", some of them misnamed); issue 10 flipped those assertions into the
"implemented" tests that follow it.
"""

from __future__ import annotations

import functools
import importlib.util
import json

import pytest
import torch
from conftest import FIXTURES, TESTS, run_zinspect

import zinspect
from zinspect.core import open_checkpoint

PARALLEL = FIXTURES / "parallel"
NAMES = sorted(p.parent.name for p in PARALLEL.glob("*/manifest.json"))
PIPELINES = [n for n in NAMES if n.startswith("pp") and "_tp" not in n]
PIPELINE_TP = [n for n in NAMES if n.startswith("pp") and "_tp" in n]  # pp x tp x dp (Megatron)
#: ZeRO-0 fp32 pipeline x tp: no optimizer files, no param names: named and refused
PIPELINE_TP_REFUSED = {"pp2_tp2_dp1_s0_fp32"}
TENSOR_PARALLEL = [n for n in NAMES if n.startswith("tp")]
MOE = [n for n in NAMES if n.startswith("moe")]
VARIANTS = [n for n in NAMES if n.startswith(("z0_", "offload_", "hpz_"))]  # ZeRO-0/offload/hpZ
#: the one name zinspect cannot know: a ZeRO-0 pipeline without optimizer files records no param
#: names, and its tied layer's tie key (tied_modules.KEY) is in no file; it is named by its layer
#: index, with a warning
UNNAMED = {"pp3_dp1_s0_fp32": {"1.weight": "tied_modules.embed.weight"},
           "pp2_dp1_s0_fp16": {"1.weight": "tied_modules.embed.weight"},
           "pp2_tp2_dp1_s0_fp32": {"1.word_embeddings.weight": "tied_modules.embed.word_embeddings.weight"}}
#: ... and in pp3 which of two equal-shaped params (3.norm.weight, 3.norm.bias) was frozen cannot
#: be told either (an info; fp32: the values written are the layer weights, its masters, anyway)
FROZEN_UNKNOWN = {"pp3_dp1_s0_fp32"}


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
    assert {"pipeline", "pipeline_tp", "autotp", "moe", "zero-variant"} == \
        {manifest(n)["layout"] for n in NAMES}


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
    names = [UNNAMED.get(name, {}).get(p["name"], p["name"]) for p in j["params"]]
    assert len(names) == len(set(names))
    assert set(names) <= set(m["params"])
    assert {b["name"] for b in j["buffers"]} <= set(m.get("buffers") or {})
    for p in j["params"]:
        if p["tied_to"]:
            assert m["tied"][p["name"]] == p["tied_to"]


@pytest.mark.parametrize("name", NAMES)
def test_open_checkpoint_reads_it(name):
    ckpt = open_checkpoint(PARALLEL / name)
    assert {UNNAMED.get(name, {}).get(n, n) for n in ckpt.params} <= set(manifest(name)["params"])


@pytest.mark.parametrize("name", NAMES)
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


# ------------------------------------------------------------------ TODAY (issue 10 flipped these)
# Before issue 10 zinspect named these layouts without merging them (pipelines were even called
# tensor_parallel, `layer_XX-model_states.pt` were extra files, only stage 0's params, ep rank 0's
# experts and tp rank 0's shard shapes were seen, offload/hpZ were not said). Every parallel
# fixture's layout is now implemented: the tests below say what zinspect reads instead.

#: fixtures whose layout issue 10 implemented
IMPLEMENTED = set(TENSOR_PARALLEL) | set(PIPELINES) | set(PIPELINE_TP) | set(MOE) | set(VARIANTS)


def test_every_fixture_is_implemented():
    assert IMPLEMENTED == set(NAMES)


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


LAYOUT = {**{n: "pipeline" for n in PIPELINES}, **{n: "moe" for n in MOE},
          **{n: "zero0" if n.startswith("z0_") else "zero" for n in VARIANTS}}


@pytest.mark.parametrize("form", ["root", "tag"])
@pytest.mark.parametrize("name", PIPELINES + MOE + VARIANTS)
def test_pipeline_moe_zero0_offload_hpz_info_is_the_manifest(name, form):
    """Was: pipelines called tensor_parallel (stage 0's params; layer_XX-model_states.pt extra
    files), MoE showing ep rank 0's experts, ZeRO-0 unmerged, offload/hpZ unsaid. Now every
    param under DeepSpeed's name with its shape, frozen flag and tie; buffers; the topology
    and the features (tests/test_layout_{pipeline,moe,zero0}.py check the rest)."""
    m, j = manifest(name), info(name, form)
    assert (j["layout"], j["stage"], j["world_size"]) == (LAYOUT[name], m["stage"], m["world_size"])
    rename = UNNAMED.get(name, {})
    frozen = {n for n, p in m["params"].items() if p.get("frozen")} \
        if name not in FROZEN_UNKNOWN else set()
    aliases = {a: o for a, o in (m.get("tied") or {}).items() if isinstance(o, str)}
    assert {rename.get(p["name"], p["name"]): (p["shape"], p["frozen"], p["tied_to"])
            for p in j["params"]} == \
        {n: (p["shape"], n in frozen, aliases.get(n)) for n, p in m["params"].items()}
    assert {b["name"]: b["shape"] for b in j["buffers"]} == (m.get("buffers") or {})
    assert sorted(f["code"] for f in j["findings"]) == \
        (["pipeline-stages-unknown"] if name in FROZEN_UNKNOWN else []) + \
        (["pipeline-tied-unnamed"] if name in UNNAMED else [])
    assert j["topology"] == {"dp": m.get("dp", m["world_size"]), "tp": 1, "pp": m.get("pp", 1),
                             "ep": m.get("ep_size", 1)}
    assert j["features"] == {"offload_s3_w2": ["offload"], "hpz_s3_w4": ["hpz"]}.get(name, [])


@pytest.mark.parametrize("name", PIPELINES + MOE + VARIANTS)
def test_pipeline_moe_zero0_merge_bit_exact_and_validate_exits_0(name):
    state, ref = zinspect.get_fp32_state_dict(PARALLEL / name), reference(name)
    rename = UNNAMED.get(name, {})
    state = {rename.get(n, n): t for n, t in state.items()}
    assert set(state) == set(ref)
    for n, t in ref.items():
        assert state[n].dtype == t.dtype and torch.equal(state[n], t), n
    r = run_zinspect("validate", PARALLEL / name)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("form", ["root", "tag"])
@pytest.mark.parametrize("name", PIPELINE_TP)
def test_pipeline_tensor_parallel_info_is_the_manifest(name, form):
    """Was: pp x tp named and refused (unsupported-layout, tp rank 0's shard shapes). Now every
    param under its PipelineModule name with its FULL shape, the topology pp x tp x dp, no
    finding (tests/test_layout_pptp.py checks the merge, damage and the app)."""
    m, j = manifest(name), info(name, form)
    refused = name in PIPELINE_TP_REFUSED  # ZeRO-0 fp32: no file names the params
    assert (j["layout"], j["stage"], j["world_size"]) == ("pipeline_tp", m["stage"], m["world_size"])
    assert [f["code"] for f in j["findings"]] == (["unsupported-layout"] if refused else [])
    assert j["topology"] == {"dp": m["dp"], "tp": m["tp"], "pp": m["pp"], "ep": 1}
    if refused:
        return
    assert {p["name"]: (p["shape"], p["frozen"], p["tied_to"]) for p in j["params"]} == \
        {n: (p["shape"], False, None) for n, p in m["params"].items()}
    assert any(p["shard_shape"] != p["shape"] for p in m["params"].values())
