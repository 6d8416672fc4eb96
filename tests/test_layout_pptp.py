"""Pipeline × tensor parallel (issue 10: Megatron-DeepSpeed / BLOOM), layout `pipeline_tp`, on the
real DeepSpeed 0.19.8 fixtures tests/fixtures/parallel/pp2_tp2_* (tests/tools/make_ds_pptp.py:
PipeModelDataParallelTopology, vocab-parallel tied embedding reused as the head, column / row /
swiglu 2-sub-param layers, replicated norms, universal_checkpoint_info as client state; each
reference checked by DeepSpeed reloading it and by DeepSpeed's own ds_to_universal.py).
The layout, the CLI end to end (validate, merge bit for bit in every format and dtype, moments),
damaged copies with their exact findings, a drifted tied copy, and the app's Ranks grid."""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import subprocess
import warnings

import pytest
import torch
from conftest import FIXTURES, TESTS, run_zinspect
from damage import record_holding, set_crc

import zinspect
from zinspect.core import open_checkpoint
from zinspect.core.validate import validate
from zinspect.errors import NotMergeable

PARALLEL = FIXTURES / "parallel"
#: merged; the ZeRO-0 bf16 one has BF16_Optimizer files (DeepSpeed itself cannot reload it, and
#: its ds_to_universal.py fails on it: "param_shapes must contain dictionaries")
PPTP = ["pp2_tp2_dp1_s1_bf16", "pp2_tp2_dp2_s1_fp32", "pp2_tp2_dp1_s0_bf16"]
REFUSED = "pp2_tp2_dp1_s0_fp32"  # ZeRO-0 fp32: no optimizer files, so no file names the params
DP2 = "pp2_tp2_dp2_s1_fp32"
TIED = "tied_modules.embed.word_embeddings.weight"


def manifest(name: str) -> dict:
    return json.loads((PARALLEL / name / "manifest.json").read_text())


@functools.cache
def reference(name: str) -> dict:
    return torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)


# ------------------------------------------------------------------ the layout
@pytest.mark.parametrize("name", PPTP)
def test_every_param_has_its_full_shape_and_each_tp_ranks_shard(name):
    m, c = manifest(name), open_checkpoint(PARALLEL / name)
    assert (c.layout, c.stage, c.world_size) == ("pipeline_tp", m["stage"], m["world_size"])
    assert (c.topology.pp, c.topology.tp, c.topology.dp) == (m["pp"], m["tp"], m["dp"])
    assert c.findings == []
    assert set(c.params) == set(m["params"])
    for n, want in m["params"].items():
        p = c.params[n]
        assert list(p.shape) == want["shape"], n
        assert {str(t): list(s.shape) for t, s in p.shards.items()} == want["shard_shapes"], n
        assert all(s.replicated for s in p.shards.values()) == (want["kind"] == "replicated"), n
    # the vocab-parallel embedding: 64 padded rows over 2 tp ranks, the 3 padding rows trimmed
    assert c.params[TIED].shape == (m["model"]["vocab"], m["model"]["hidden"])
    assert sorted(c.params[TIED].copies) == [1]  # its stage-1 copy, kept for comparison
    assert {f.shard for f in c.params[TIED].copies[1]} == {0, 1}


@pytest.mark.parametrize("name", sorted(p.parent.name for p in PARALLEL.glob("pp*/manifest.json")
                                         if p.parent.name != REFUSED))
def test_a_layer_file_sits_at_the_stage_that_owns_the_layer(name):
    """Was: every layer file at stage 0 (pipeline and pipeline x tp alike). (The refused ZeRO-0
    fp32 pp x tp run names no param and has no buffer: its layer files stay at stage 0.)"""
    layers = manifest(name)["layers"]
    files = open_checkpoint(PARALLEL / name).files_of("layer")
    assert files and {f.coords.pp for f in files} == set(range(manifest(name)["pp"]))
    for f in files:
        assert f.coords.pp == layers[str(f.coords.layer)]["stage"], f.name
        assert f.coords.tp == (f.mp_rank or 0), f.name


# ------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("name", PPTP)
def test_validate_exits_0(name):
    r = run_zinspect("validate", PARALLEL / name)
    assert r.returncode == 0 and "0 errors, 0 warnings, 0 info" in r.stdout, r.stdout + r.stderr


def merged(tmp_path, name, *args: str) -> dict:
    from safetensors.torch import load_file

    out = tmp_path / "out"
    r = run_zinspect("merge", PARALLEL / name if isinstance(name, str) else name, out, *args)
    assert r.returncode == 0, r.stderr
    if "pt" in args:
        return torch.load(out / "pytorch_model.bin", weights_only=True)
    return {k: v for f in sorted(out.glob("*.safetensors")) if f.stem == "model" or
            f.stem.startswith("model-") for k, v in load_file(f).items()}


@pytest.mark.parametrize("args", [(), ("--format", "pt"), ("--dtype", "bf16"), ("--dtype", "fp16")])
@pytest.mark.parametrize("name", PPTP)
def test_merge_is_the_reference_bit_for_bit(tmp_path, name, args):
    got, ref = merged(tmp_path, name, *args), reference(name)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args[-1] if args else "", torch.float32)
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)), k


@pytest.mark.parametrize("name", [n for n in PPTP if (PARALLEL / n / "reference_moments.pt").exists()])
def test_adam_moments_equal_deepspeeds_own_conversion(tmp_path, name):
    """`--state all`: each param's exp_avg / exp_avg_sq joined from its (stage, tp) slices equals
    what DeepSpeed's ds_to_universal.py joined for this checkpoint, bit for bit
    (reference_moments.pt, written by the generator)."""
    from safetensors.torch import load_file

    r = run_zinspect("merge", PARALLEL / name, tmp_path / "out", "--state", "all")
    assert r.returncode == 0, r.stderr
    moments = torch.load(PARALLEL / name / "reference_moments.pt", weights_only=True)
    assert set(moments) == {"exp_avg", "exp_avg_sq"}
    for state, want in moments.items():
        got = load_file(tmp_path / "out" / f"{state}.safetensors")
        assert set(got) == set(want) == set(reference(name))
        for k, v in want.items():
            assert torch.equal(got[k], v), (state, k)


DS_PYTHON = os.environ.get("ZINSPECT_DS_PYTHON")
#: run by DeepSpeed's python: the generator's Megatron-style PipelineModule built whole (one stage,
#: tp 1: its layers hold full tensors under the pipeline's names), loaded strictly from the merged
#: state dict; the embedding's vocabulary padding (tp 1 pads 61 rows to 64) is the only addition
_STRICT_LOAD = """
import importlib.util, json, os, socket, sys, types, torch
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
spec = importlib.util.spec_from_file_location("make_ds_pptp", sys.argv[1])
gen = importlib.util.module_from_spec(spec); sys.modules["make_ds_pptp"] = gen; spec.loader.exec_module(gen)
gen.setup_rank(0, 1, port)
m = json.load(open(sys.argv[2]))["model"]
args = types.SimpleNamespace(pp=1, tp=1, dp=1, seed=0, hidden=m["hidden"], ffn=m["ffn"],
                             heads=m["heads"], layers=m["layers"], vocab=m["vocab"])
model = gen.build_pipeline_module(args, 0)
state = torch.load(sys.argv[3], weights_only=True)
embed = "tied_modules.embed.word_embeddings.weight"
padded = torch.zeros(model.state_dict()[embed].shape)
padded[:state[embed].shape[0]] = state[embed]
model.load_state_dict({**state, embed: padded}, strict=True)
print("loaded", sum(p.numel() for p in model.parameters()) - (padded.shape[0] - m["vocab"]) * m["hidden"])
"""


@pytest.mark.skipif(not DS_PYTHON, reason="set ZINSPECT_DS_PYTHON to a python with deepspeed==0.19.8")
@pytest.mark.parametrize("name", PPTP)
def test_merge_loads_strictly_into_the_generators_model_at_tp_1(tmp_path, name):
    out = tmp_path / "merged.pt"
    torch.save(zinspect.get_fp32_state_dict(PARALLEL / name), out)
    r = subprocess.run([DS_PYTHON, "-c", _STRICT_LOAD, str(TESTS / "tools" / "make_ds_pptp.py"),
                        str(PARALLEL / name / "manifest.json"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == str(manifest(name)["model"]["num_params_unique"])


def test_zero0_fp32_without_optimizer_files_is_refused_by_name(tmp_path):
    """Its masters are the layer files' weights, but no file names them: the tied embedding is
    `1.word_embeddings.weight` to zinspect, which no vocabulary pattern matches (its padding rows
    would be written). Named, not merged; DeepSpeed's ds_to_universal.py fails on it too."""
    assert manifest(REFUSED)["checks"]["ds_to_universal"]["returncode"] != 0
    r = run_zinspect("validate", PARALLEL / REFUSED)
    assert r.returncode == 1 and "unsupported-layout" in r.stdout and "no optimizer files" in r.stdout
    r = run_zinspect("merge", PARALLEL / REFUSED, tmp_path / "out")
    assert r.returncode != 0 and not (tmp_path / "out").exists()


# universal output and reshard from pipeline_tp: tests/test_universal_pptp.py, test_reshard_parallel.py


# ------------------------------------------------------------------ damaged copies
def damaged(tmp_path, damage, name: str = DP2) -> list:
    """[(code, file, rank, param)] of validate on a copy of `name` after `damage(tag dir)`."""
    root = tmp_path / name
    shutil.copytree(PARALLEL / name, root)
    damage(root / manifest(name)["tag"])
    return sorted({(f.code, f.file, f.rank, f.param) for f in validate(open_checkpoint(root))},
                  key=str)


def test_a_missing_tp_rank_of_one_stage_is_located(tmp_path):
    """Stage 1's tp rank 1 gone (its model states, optimizer files and layer files)."""
    def damage(tag):
        for f in [*tag.glob("*mp_rank_03_*"), *tag.glob("layer_0[46]-model_01-*")]:
            f.unlink()
    assert damaged(tmp_path, damage) == [
        ("missing-layer-file", "layer_04-model_01-model_states.pt", None, None),
        ("missing-layer-file", "layer_06-model_01-model_states.pt", None, None),
        ("missing-optimizer-file", "zero_pp_rank_0_mp_rank_03_optim_states.pt", 0, None),
        ("missing-optimizer-file", "zero_pp_rank_1_mp_rank_03_optim_states.pt", 1, None),
        ("missing-tp-rank", "mp_rank_03_model_states.pt", None, None)]


def test_salvage_without_one_stages_tp_rank_writes_the_rest_exactly(tmp_path):
    """What survives: stage 0 whole, stage 1's replicated params (tp rank 0's copy), the tied
    embedding (stage 0's); stage 1's split params are left out, never half-written."""
    root = tmp_path / "c"
    shutil.copytree(PARALLEL / DP2, root)
    tag = root / "global_step2"
    for f in [*tag.glob("*mp_rank_03_*"), *tag.glob("layer_0[46]-model_01-*")]:
        f.unlink()
    with pytest.raises(NotMergeable):
        zinspect.get_fp32_state_dict(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = zinspect.get_fp32_state_dict(root, salvage=True)
    ref, m = reference(DP2), manifest(DP2)
    lost = {n for n, p in m["params"].items() if 1 in p["stages"] and 0 not in p["stages"]
            and p["kind"] != "replicated"}
    assert lost and set(got) == set(ref) - lost
    assert all(torch.equal(got[n], ref[n]) for n in got)


def test_a_missing_layer_file_of_one_tp_rank_is_located(tmp_path):
    got = damaged(tmp_path, lambda tag: (tag / "layer_04-model_01-model_states.pt").unlink())
    assert got == [("missing-layer-file", "layer_04-model_01-model_states.pt", None, None)]


def test_a_missing_optimizer_file_of_one_slice_is_located(tmp_path):
    """And each param of stage 1, tp rank 0 whose shard dp rank 1 held, at that dp rank (the
    shard checks: tests/test_layout_pptp_checks.py)."""
    got = damaged(tmp_path, lambda tag: (tag / "zero_pp_rank_1_mp_rank_02_optim_states.pt").unlink())
    lost = ["4.mlp.dense_4h_to_h.bias", "4.mlp.dense_4h_to_h.weight", "4.mlp.dense_h_to_4h.bias",
            "4.mlp.dense_h_to_4h.weight", "4.post_attention_layernorm.bias",
            "4.self_attention.dense.weight", "4.self_attention.query_key_value.weight", "6.bias", "6.weight"]
    assert got == [("missing-optimizer-file", "zero_pp_rank_1_mp_rank_02_optim_states.pt", 1, None)] + \
        [("param-coverage", None, 1, p) for p in lost]


@pytest.mark.parametrize(("source", "stale", "rank"), [
    ("zero_pp_rank_1_mp_rank_03_optim_states.pt", "zero_pp_rank_1_mp_rank_05_optim_states.pt", 1),  # stage 2
    ("zero_pp_rank_1_mp_rank_03_optim_states.pt", "zero_pp_rank_2_mp_rank_03_optim_states.pt", 2),  # dp 2
    ("layer_04-model_01-model_states.pt", "layer_04-model_02-model_states.pt", None),  # tp 2
])
def test_a_file_of_another_topology_is_stale(tmp_path, source, stale, rank):
    got = damaged(tmp_path, lambda tag: shutil.copy(tag / source, tag / stale))
    assert got == [("stale-rank-file", stale, rank, None)]


@pytest.mark.parametrize("dims", [{"pp_degree": 2, "tp_degree": 10**9}, {"pp_degree": 10**9, "tp_degree": 2}])
def test_a_forged_topology_is_one_finding_not_a_hang(tmp_path, dims):
    def damage(tag):
        for f in tag.glob("mp_rank_*_model_states.pt"):
            state = torch.load(f, weights_only=False)
            state["checkpoint_parallel_dimensions"] = dims
            torch.save(state, f)
    got = damaged(tmp_path, damage)
    assert ("topology-mismatch", "mp_rank_00_model_states.pt", None, None) in got


def test_a_drifted_tied_copy_is_reported_with_its_stage(tmp_path):
    """The tied embedding is vocab-split AND on two stages: stage 1's copy of tp rank 1's shard
    edited (CRC kept: the bytes are as saved) -> the merge writes stage 0's and warns."""
    root = tmp_path / "c"
    shutil.copytree(PARALLEL / DP2, root)
    c = open_checkpoint(root)
    f = next(f for f in c.params[TIED].copies[1] if f.shard == 1 and f.numel)
    path = c.path / f.file
    with open(path, "r+b") as fh:
        fh.seek(f.offset + 12)
        value = struct.unpack("<f", fh.read(4))[0]
        fh.seek(f.offset + 12)
        fh.write(struct.pack("<f", value + 0.5))
    set_crc(path, record_holding(path, f.offset)[0].split("/", 1)[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = zinspect.get_fp32_state_dict(root)
    assert torch.equal(got[TIED], reference(DP2)[TIED])
    said = [str(w.message) for w in caught]
    assert any(TIED in s and "pipeline stage(s) 1 differ" in s and "0.5" in s for s in said), said


# ------------------------------------------------------------------ the app
async def test_ranks_grid_is_pp_by_tp_by_dp():
    from test_tui_polish import drawn, settle

    from zinspect.tui.app import ZinspectApp
    from zinspect.tui.widgets.ranks_pane import RankGrid

    app = ZinspectApp(str(PARALLEL / DP2))
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        overview = "\n".join(drawn(app.screen.query_one("#overview-body")))
        assert "pp 2 × tp 2 × dp 2 × ep 1" in overview
        await pilot.press("3")
        grid = app.screen.query_one("#rank-table", RankGrid)
        assert grid.axes == ["pp", "tp", "dp"] and grid.row_count == 8
        assert [(c.pp, c.tp, c.dp) for c in grid.cells] == \
            [(p, t, d) for p in range(2) for t in range(2) for d in range(2)]
        assert all(grid.row_cells(i)[-1].startswith("ok") for i in range(8))
        assert all(c.held and c.groups == c.slice_groups for c in grid.cells)


async def test_a_missing_slice_file_is_its_cell_and_only_its_cell(tmp_path):
    from test_tui_polish import settle

    from zinspect.tui.app import ZinspectApp
    from zinspect.tui.widgets.ranks_pane import RankGrid

    shutil.copytree(PARALLEL / DP2, tmp_path / "c")
    (tmp_path / "c" / "global_step2" / "zero_pp_rank_1_mp_rank_03_optim_states.pt").unlink()
    app = ZinspectApp(str(tmp_path / "c"))
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        await pilot.press("3")
        grid = app.screen.query_one("#rank-table", RankGrid)
        status = {(c.pp, c.tp, c.dp): grid.row_cells(i)[-1] for i, c in enumerate(grid.cells)}
        assert status.pop((1, 1, 1)) != "ok"
        assert set(status.values()) == {"ok"}, status
