"""ZeRO-0 with tensor parallelism (zinspect/core/layouts/tp_zero0.py) on real DeepSpeed 0.19.8 AutoTP
runs made by tests/tools/make_ds_autotp.py --stage 0 (tests/fixtures/tp_extra/):

    tp2_dp2_s0_toy        --world-size 4 --tp 2 --stage 0 --dtype fp32 --steps 2  (torch AdamW)
    tp2_dp1_s0_llama_bf16_tied  --model llama --world-size 2 --tp 2 --stage 0 --dtype bf16 --tied
                          (FP16_UnfusedOptimizer; HF Llama, tied head: a vocab-parallel
                          embedding, lm_head its alias)

Each tp rank's mp_rank_TT_model_states.pt holds its shards and its whole optimizer state. Was:
named and refused (unsupported:TENSOR_PARALLEL). Now info = the manifest, validate exits 0, the
merge = reference_fp32.pt bit for bit, --state all = each tp rank's torch per-param state joined by
the manifest's split kinds, and a lost tp rank or a forged optimizer state is named exactly."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, run_zinspect
from safetensors.torch import load_file
from test_state_merge import joined
from torchload import torch_load

from zinspect.core import open_checkpoint
from zinspect.core.merge import merge, plan_merge
from zinspect.errors import NotMergeable

EXTRA = FIXTURES / "tp_extra"
NAMES = ["tp2_dp2_s0_toy", "tp2_dp1_s0_llama_bf16_tied"]


def manifest(name: str) -> dict:
    return json.loads((EXTRA / name / "manifest.json").read_text())


@functools.cache
def reference(name: str) -> dict:
    return torch.load(EXTRA / name / "reference_fp32.pt", weights_only=True)


@functools.cache
def model_states(name: str, tp: int) -> dict:
    return torch_load(EXTRA / name / manifest(name)["tag"] / f"mp_rank_{tp:02d}_model_states.pt")


@pytest.mark.parametrize("form", ["root", "tag"])
@pytest.mark.parametrize("name", NAMES)
def test_info_json_is_the_manifest(name, form):
    m = manifest(name)
    path = EXTRA / name if form == "root" else EXTRA / name / m["tag"]
    r = run_zinspect("info", path, "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert (j["layout"], j["stage"], j["world_size"], j["findings"]) == \
        ("tensor_parallel_zero0", 0, m["world_size"], [])
    assert j["topology"] == {"dp": m["dp"], "tp": m["tp"], "pp": 1, "ep": 1}
    assert {p["name"]: (p["shape"], p["frozen"], p["tied_to"]) for p in j["params"]} == \
        {n: (p["shape"], False, p["tied_to"]) for n, p in m["params"].items()}
    assert {b["name"] for b in j["buffers"]} == set(m["buffers"] or {})
    assert j["states"] == ["fp32", "exp_avg", "exp_avg_sq"]


@pytest.mark.parametrize("name", NAMES)
def test_validate_exits_0_and_merge_is_the_reference(tmp_path, name):
    r = run_zinspect("validate", EXTRA / name)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_zinspect("merge", EXTRA / name, tmp_path / "out", "--no-hf-files")
    assert r.returncode == 0, r.stderr
    got, ref = load_file(tmp_path / "out" / "model.safetensors"), reference(name)
    assert set(got) == set(ref)
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n


@pytest.mark.parametrize("name", NAMES)
def test_state_all_is_each_tp_ranks_torch_state_joined(tmp_path, name):
    """Each tp rank's per-param torch state (group g's i-th param: state[param_groups[g]
    ['params'][i]]), joined by the manifest's split kinds. At bf16 the same positions of
    FP16_UnfusedOptimizer's fp32_groups, joined alike, give reference_fp32.pt: the positions
    are the right params."""
    m, ckpt = manifest(name), open_checkpoint(EXTRA / name)
    per_tp = []
    for t in range(m["tp"]):
        opt = model_states(name, t)["optimizer"]
        inner = opt.get("optimizer_state_dict", opt)
        held = {}
        for g in (g for g in ckpt.groups if g.coords.tp == t):
            for i, pname in enumerate(g.params):
                state = dict(inner["state"][inner["param_groups"][g.index]["params"][i]])
                state["fp32"] = opt["fp32_groups"][g.index][i] if "fp32_groups" in opt else \
                    model_states(name, t)["module"][pname]
                held[pname] = state
        per_tp.append(held)
    result = merge(ckpt, tmp_path / "out", hf_files=False, state="all")
    assert result.states == ["exp_avg", "exp_avg_sq"] and result.unverified == [] and result.drift == {}
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        got = load_file(tmp_path / "out" / f"{'model' if key == 'fp32' else key}.safetensors")
        for pname, info in m["params"].items():
            if info["tied_to"]:  # the weights hold the alias (its owner's tensor); no moments
                assert torch.equal(got[pname], got[info["tied_to"]]) if key == "fp32" else \
                    pname not in got
                continue
            want = joined(info["kind"], info["dim"], [h[pname][key] for h in per_tp], info["shape"])
            if key == "fp32":
                assert torch.equal(want, reference(name)[pname]), pname
            assert torch.equal(got[pname], want), (key, pname)


# ------------------------------------------------------------------ damaged copies
def copy(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(EXTRA / name, root)
    return root / manifest(name)["tag"]


def test_a_missing_tp_rank_is_named_and_salvage_keeps_the_replicated(tmp_path):
    name = "tp2_dp2_s0_toy"
    tag = copy(tmp_path, name)
    (tag / "mp_rank_01_model_states.pt").unlink()
    c = open_checkpoint(tag)
    assert c.layout == "tensor_parallel_zero0"
    assert [(f.code, f.file, f.rank) for f in c.findings] == \
        [("missing-tp-rank", "mp_rank_01_model_states.pt", None)]  # tp rank 1's one file: no dp rank
    with pytest.raises(NotMergeable):
        plan_merge(c)
    r = run_zinspect("validate", tag)
    assert r.returncode == 1 and "missing-tp-rank" in r.stdout
    replicated = {n for n, p in manifest(name)["params"].items() if p["kind"] == "replicated"}
    written = {t.name for t in plan_merge(c, salvage=True).tensors if t.name in c.params}
    assert written == replicated


def test_a_tp_ranks_optimizer_that_fits_no_order_is_named(tmp_path):
    """tp rank 1's FP16_UnfusedOptimizer lost a master: its groups cannot be matched to its
    shards, so its masters are not named (never guessed), the merge refuses."""
    name = "tp2_dp1_s0_llama_bf16_tied"
    tag = copy(tmp_path, name)
    path = tag / "mp_rank_01_model_states.pt"
    state = torch.load(path, weights_only=False)
    state["optimizer"]["fp32_groups"][0].pop()
    torch.save(state, path)
    c = open_checkpoint(tag)
    assert [(f.code, f.file) for f in c.findings] == \
        [("zero0-order-unknown", "mp_rank_01_model_states.pt")]
    assert "different numbers of params" in c.findings[0].message
    with pytest.raises(NotMergeable):
        plan_merge(c)


def test_a_truncated_tp_rank_file_is_named_and_refused(tmp_path):
    """tp rank 1's model states cut to 40,000 bytes (most of its tensor records gone): named as
    that file's truncation; nothing is written from it."""
    tag = copy(tmp_path, "tp2_dp1_s0_llama_bf16_tied")
    with open(tag / "mp_rank_01_model_states.pt", "r+b") as f:
        f.truncate(40_000)
    c = open_checkpoint(tag)
    assert [(f.code, f.file) for f in c.findings] == [("truncated-file", "mp_rank_01_model_states.pt")]
    r = run_zinspect("merge", tag, tmp_path / "out")
    assert r.returncode == 1 and "mp_rank_01_model_states.pt is truncated" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ frozen params in the groups
FROZEN = "tp2_dp1_s0_toy_frozen"  # make_frozen_tp.py --model toy --world-size 2 --tp 2 --stage 0
FROZEN_NAMES = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                "model.layers.0.input_layernorm.weight"}  # its FROZEN: column, row, replicated


def test_frozen_params_left_in_the_optimizer_groups(tmp_path):
    """The client put every param in its groups, the frozen ones too: the optimizer never stepped
    those (no state), so their shapes are unknown. Was: `zero0-frozen-unknown` per tp rank and
    no moment located. Now the stepped entries' shapes place every param (a stateless entry fits
    any), the weights merge bit for bit, the 25 stepped params' moments are located and the 3
    frozen ones are named by --state all (nothing guessed)."""
    c = open_checkpoint(EXTRA / FROZEN)
    assert (c.layout, c.findings) == ("tensor_parallel_zero0", [])
    r = run_zinspect("merge", EXTRA / FROZEN, tmp_path / "w", "--no-hf-files")
    assert r.returncode == 0, r.stderr
    got, ref = load_file(tmp_path / "w" / "model.safetensors"), reference(FROZEN)
    assert set(got) == set(ref) and all(torch.equal(got[n], t) for n, t in ref.items())
    located = {n for n in c.params if c.state_fragments(n, "exp_avg")}
    assert located == set(c.params) - FROZEN_NAMES and len(located) == 25
    with pytest.raises(NotMergeable) as e:
        merge(c, tmp_path / "s", hf_files=False, state="all")
    assert "6 optimizer state tensor(s) cannot be rebuilt" in e.value.message
    assert not (tmp_path / "s").exists()
    result = merge(c, tmp_path / "s", hf_files=False, state="all", salvage=True)
    assert {n.split(":")[0] for n in result.dropped} == FROZEN_NAMES
    assert set(load_file(tmp_path / "s" / "exp_avg.safetensors")) == located


async def test_the_app_overview_names_the_layout():
    from test_tui_polish import drawn, settle

    from zinspect.tui.app import ZinspectApp

    app = ZinspectApp(str(EXTRA / "tp2_dp2_s0_toy"))
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        overview = "\n".join(drawn(app.screen.query_one("#overview-body")))
        assert "tensor parallel, ZeRO-0" in overview and "pp 1 × tp 2 × dp 2 × ep 1" in overview, overview


def test_merged_llama_loads_strict_with_its_tied_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    name = "tp2_dp1_s0_llama_bf16_tied"
    m, tp = manifest(name)["model"], manifest(name)["tp"]
    config = transformers.LlamaConfig(
        vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"], num_attention_heads=m["hidden"] // m["head_dim"],
        num_key_value_heads=max(tp, m["hidden"] // m["head_dim"] // 2), max_position_embeddings=64,
        tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    r = run_zinspect("merge", EXTRA / name, tmp_path / "out", "--no-hf-files")
    assert r.returncode == 0, r.stderr
    state = load_file(tmp_path / "out" / "model.safetensors")
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.lm_head.weight, reference(name)["model.embed_tokens.weight"])
