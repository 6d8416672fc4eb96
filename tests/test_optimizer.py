"""The optimizer's state: what `read_optimizer` says (step, hyper-parameters per group, state
keys, fp16 loss scaler, clip_grad) and the per-param sizes `optimizer_stats` streams (L2 and
max |x| of the master, exp_avg and sqrt(exp_avg_sq), the Adam update |m| / (sqrt(v) + eps)),
each checked against torch.load of the real fixtures' files."""

from __future__ import annotations

import json
import math

import pytest
from conftest import FIXTURES, manifest, run_zinspect
from torchload import torch_load

from zinspect.core import open_checkpoint
from zinspect.core.optimizer import optimizer_name, read_optimizer, scaler_line, summary_line
from zinspect.core.optimizer_stats import WINDOW, optimizer_stats
from zinspect.errors import MergeCancelled

torch = pytest.importorskip("torch")

PARALLEL = FIXTURES / "parallel"
SGD = FIXTURES / "optim" / "sgd_s2_w2_fp32"
#: fp32, bf16 (ZeRO and BF16_Optimizer) and fp16 fixtures, stages 1 to 3
PLAIN = ["s1_w2_fp32", "s3_w2_fp32", "s2_w2_bf16", "s1_w2_bf16_bf16opt", "s3_w4_bf16",
         "s2_w4_fp16", "s3_w3_fp16_sub"]



def rank0_optimizer_file(ckpt):
    return sorted(ckpt.files_of("optim"), key=lambda f: (f.mp_rank or 0, f.rank, f.name))[0]


def torch_state(osd):
    """(the torch optimizer state dict, the wrapper dict) of a ZeRO optimizer file."""
    return osd.get("base_optimizer_state") or osd["optimizer_state_dict"], osd


def hyper(groups):
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
            for g in groups]


@pytest.mark.parametrize("name", PLAIN)
def test_read_optimizer_equals_torch_load_of_rank0(name):
    ckpt = open_checkpoint(FIXTURES / name)
    opt = read_optimizer(ckpt)
    rf = rank0_optimizer_file(ckpt)
    inner, osd = torch_state(torch_load(rf.path)["optimizer_state_dict"])
    assert opt.source == rf.name
    assert opt.groups == hyper(inner["param_groups"])
    first = inner["state"][min(inner["state"])]
    assert opt.step == first["step"].item() == manifest(name)["steps"]
    assert opt.state_keys == list(first)  # step, exp_avg, exp_avg_sq
    assert opt.adam and opt.name == "AdamW"  # torch AdamW: decoupled_weight_decay
    assert opt.clip_grad == osd.get("clip_grad")
    scaler = osd.get("loss_scaler")
    if scaler is None:  # BF16_Optimizer saves none
        assert opt.loss_scaler is None
    else:
        assert opt.loss_scaler.scale == scaler.cur_scale
        assert opt.loss_scaler.dynamic is scaler.dynamic is osd["dynamic_loss_scale"]
        assert opt.loss_scaler.overflow is osd["overflow"]
        assert opt.loss_scaler.iteration == getattr(scaler, "cur_iter", None)
        assert opt.loss_scaler.last_overflow == getattr(scaler, "last_overflow_iter", None)


@pytest.mark.parametrize("name", ["s2_w4_fp16", "s3_w3_fp16_sub"])
def test_fp16_loss_scale_and_skipped_steps(name):
    ckpt = open_checkpoint(FIXTURES / name)
    opt = read_optimizer(ckpt)
    model = torch_load(sorted(ckpt.files_of("model"), key=lambda f: (f.rank or 0))[0].path)
    assert opt.loss_scaler.dynamic and opt.loss_scaler.scale == 256
    assert opt.skipped_steps == model["skipped_steps"] == manifest(name)["skipped_steps"]
    assert opt.global_steps == model["global_steps"] == manifest(name)["global_steps"]
    assert scaler_line(opt) == "256, dynamic (iteration 2, no overflow yet, 0 step(s) skipped)"
    assert scaler_line(read_optimizer(open_checkpoint(FIXTURES / "s3_w2_fp32"))) is None


@pytest.mark.parametrize("name", ["z0_fp32", "z0_bf16", "z0_fp16"])
def test_zero0_optimizer_lives_in_the_model_states(name):
    ckpt = open_checkpoint(PARALLEL / name)
    opt = read_optimizer(ckpt)
    saved = torch_load(ckpt.path / "mp_rank_00_model_states.pt")
    inner = saved["optimizer"].get("optimizer_state_dict", saved["optimizer"])
    assert opt.source == "mp_rank_00_model_states.pt"
    assert opt.groups == hyper(inner["param_groups"])
    assert opt.step == inner["state"][0]["step"].item()
    assert opt.adam and opt.global_steps == saved["global_steps"]
    assert opt.wrapper == ("torch" if name == "z0_fp32" else "FP16_Optimizer")
    if name != "z0_fp32":  # FP16_UnfusedOptimizer keeps the scaler's keys in its own dict
        wrapper = saved["optimizer"]
        assert opt.loss_scaler.scale == wrapper["cur_scale"]
        assert opt.loss_scaler.dynamic is wrapper["dynamic_loss_scale"] is (name == "z0_fp16")
        assert opt.loss_scaler.iteration == wrapper["cur_iter"]
        assert opt.loss_scaler.last_overflow == wrapper.get("last_overflow_iter")
        assert (opt.skipped_steps is not None) and opt.skipped_steps == saved["skipped_steps"]


@pytest.mark.parametrize("name", ["pp2_dp2_s1_bf16_pmd", "moe_ep2_w4_s2_fp32", "tp2_dp2_s3_toy",
                                  "pp3_dp1_s0_fp32"])
def test_parallel_layouts_have_their_hyper_parameters(name):
    """Whatever the layout, the lowest rank's optimizer state gives step and groups (MoE: the
    expert groups too, with their name and moe flag)."""
    ckpt = open_checkpoint(PARALLEL / name)
    opt = read_optimizer(ckpt)
    saved = torch_load(ckpt.path / opt.source)
    osd = saved.get("optimizer_state_dict") or saved["optimizer"]
    inner = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict") or osd
    assert opt.groups == hyper(inner["param_groups"]) and opt.step == 2 and opt.adam
    if name.startswith("moe"):
        assert any(g.get("moe") for g in opt.groups)


#: whole universal checkpoints (universal/tp2_dp2_s2_llama_bf16_tied keeps only DeepSpeed's zero/
#: tree, to compare tensors with: its model-states files are the tp fixture's own)
UNIVERSAL = sorted(p.parent.parent for p in FIXTURES.glob("**/*_universal/zero/optimizer_state.pt")
                   if any(p.parent.parent.glob("*model_states.pt")))


@pytest.mark.parametrize("tag", UNIVERSAL, ids=lambda p: p.parent.name)
def test_universal_checkpoints_give_groups_step_and_state_keys(tag):
    """ds_to_universal's output: hyper-parameters from zero/optimizer_state.pt, the per-param
    states from a param folder's file names, the step from its step.pt; the view's numbers
    from each param's fp32 / exp_avg / exp_avg_sq files."""
    ckpt = open_checkpoint(tag)
    opt = read_optimizer(ckpt)
    saved = torch_load(tag / "zero" / "optimizer_state.pt")
    assert opt.wrapper == "universal" and opt.source == "zero/optimizer_state.pt"
    assert opt.groups == hyper(saved["param_groups"])
    assert {"exp_avg", "exp_avg_sq"} <= set(opt.state_keys) and opt.adam
    steps = sorted((tag / "zero").glob("*/step.pt"))
    if steps:
        assert opt.step == torch.load(steps[0], weights_only=True).item()
    result = optimizer_stats(ckpt, opt)  # each param's numbers: torch's of its <state>.pt files
    assert result.params and not result.left_out and not result.masters_only

    def state(name, key):
        saved = torch.load(tag / "zero" / name / f"{key}.pt", weights_only=False)
        return (saved["param"] if isinstance(saved, dict) else saved).double().flatten()

    for s in result.params:
        x, m, v = (state(s.name, key) for key in ("fp32", "exp_avg", "exp_avg_sq"))
        u = m.abs() / (v.sqrt() + opt.eps(s.group))
        assert close(s.master_l2, x.norm().item()) and close(s.exp_avg_l2, m.norm().item())
        assert close(s.update_max, u.max().item()) and close(s.update_mean, u.mean().item())


def test_universal_tree_whose_first_param_folder_holds_fp32_only_is_named():
    """DeepSpeed's universal tree of the tied tp2 Llama: its first param folder (lm_head.weight,
    tied) holds fp32.pt alone. Was: 'unknown (no per-param state saved ...)'; the other folders
    name the states and the step."""
    zero = FIXTURES / "universal" / "tp2_dp2_s2_llama_bf16_tied" / "global_step2_universal" / "zero"
    assert sorted(p.name for p in (zero / "lm_head.weight").iterdir()) == ["fp32.pt"]
    opt = read_optimizer(open_checkpoint(zero.parent))
    assert (opt.wrapper, opt.name, opt.note) == ("universal", "AdamW", "")
    assert opt.state_keys == ["exp_avg", "exp_avg_sq", "step"] and opt.adam
    step = torch.load(zero / "model.embed_tokens.weight" / "step.pt", weights_only=True)
    assert opt.step == step.item() == 2
    assert summary_line(opt).startswith("AdamW (universal), step 2; lr 0.01")


def test_sgd_is_named_with_its_state_keys():
    """A real ZeRO-2 run with torch SGD (momentum): no Adam moments; it is named, not failed."""
    ckpt = open_checkpoint(SGD)
    opt = read_optimizer(ckpt)
    assert opt.name == "SGD (momentum)" and not opt.adam
    assert "momentum_buffer" in opt.state_keys and "exp_avg" not in opt.state_keys
    inner, _ = torch_state(torch_load(rank0_optimizer_file(ckpt).path)["optimizer_state_dict"])
    assert opt.groups == hyper(inner["param_groups"]) and opt.groups[0]["momentum"] == 0.9
    assert "state momentum_buffer" in summary_line(opt)
    result = optimizer_stats(ckpt, opt)  # the masters and momentum_buffer; no Adam columns
    assert result.state_names == ["momentum_buffer"] and not result.masters_only
    stats = result.params
    assert stats and all(s.exp_avg_l2 is None and s.update_max is None and s.master_l2 > 0 for s in stats)
    # was: masters only. Now the momentum buffer's L2 per param = torch.load's (each flat group's
    # buffer cut by param_shapes; rank 1's keeps its padding beyond the fp32 partition)
    tag = ckpt.path
    osds = [torch_load(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
            for r in (0, 1)]
    want = {}
    for g, shapes in enumerate(torch_load(tag / "mp_rank_00_model_states.pt")["param_shapes"]):
        flat = torch.cat([o["base_optimizer_state"]["state"][g]["momentum_buffer"]
                          [:o["single_partition_of_fp32_groups"][g].numel()] for o in osds])
        off = 0
        for pname, shape in shapes.items():
            want[pname] = flat[off:off + shape.numel()].double().norm().item()
            off += shape.numel()
    assert {s.name: set(s.states) for s in stats} == {n: {"momentum_buffer"} for n in want}
    assert all(close(s.states["momentum_buffer"], want[s.name]) for s in stats)


def test_zero0_adagrad_view_has_its_sum():
    """A real ZeRO-0 Adagrad run: named, and each param's `sum` L2 = torch.load's; no update."""
    ckpt = open_checkpoint(FIXTURES / "optim" / "adagrad_s0_fp32")
    opt = read_optimizer(ckpt)
    assert (opt.name, opt.adam, opt.wrapper) == ("Adagrad", False, "torch")
    saved = torch_load(ckpt.path / "mp_rank_00_model_states.pt")["optimizer"]
    want = {n: saved["state"][saved["param_groups"][g.index]["params"][i]]["sum"]
            for g in ckpt.groups for i, n in enumerate(g.params)}
    result = optimizer_stats(ckpt, opt)
    assert result.state_names == ["sum"] and not result.masters_only and not result.left_out
    assert {s.name for s in result.params} == set(want)
    for s in result.params:
        assert s.update_max is None and close(s.states["sum"], want[s.name].double().norm().item())


@pytest.mark.parametrize(("keys", "groups", "name"), [
    (["step", "exp_avg", "exp_avg_sq"], [{"decoupled_weight_decay": False}], "Adam"),
    (["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"], [{"amsgrad": True}], "Adam/AdamW"),
    (["momentum_buffer"], [{"ns_steps": 5, "momentum": 0.95}], "Muon"),
    (["momentum_buffer"], [{"use_muon": True}], "Muon"),
    (["exp_avg", "exp_avg_sq", "momentum_buffer"], [{"use_muon": True}, {"use_muon": False}],
     "Muon with AdamW"),
    (["exp_avg"], [{}], "Lion"),
    (["step", "sum"], [{}], "Adagrad"),
    ([], [{"momentum": 0}], "SGD"),
    (["weird"], [{}], "unknown"),
])
def test_optimizer_names_from_state_keys(keys, groups, name):
    assert optimizer_name(keys, groups) == name


def test_no_optimizer_files_is_unknown_with_a_reason(tmp_path):
    from conftest import copy_fixture

    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    for f in tag.glob("*optim_states.pt"):
        f.unlink()
    opt = read_optimizer(open_checkpoint(tag))
    assert opt.name == "unknown" and opt.source is None and "no optimizer state" in opt.note
    assert summary_line(opt).startswith("unknown (no optimizer state")


def test_a_truncated_optimizer_file_is_unknown_not_a_crash(tmp_path):
    from conftest import copy_fixture

    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    rank1 = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    ckpt = open_checkpoint(tag)
    data = rank1.read_bytes()
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(data[:200])
    opt = read_optimizer(ckpt)  # the file broke after opening: said, not raised
    assert opt.name == "unknown" and "cannot read it" in opt.note


# -- per-param statistics against torch ---------------------------------------------------
def expected(ckpt, opt):
    """name -> (master, m, v) as float64 torch tensors, cut from torch.load of each rank's
    optimizer file at the param's fragments (of tensor-parallel shards, each shard's in turn;
    of a replicated param, tp rank 0's)."""
    loaded, out = {}, {}
    for name, p in ckpt.params.items():
        if p.frozen or p.tied_to:
            continue
        parts = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
        frags = [f for f in p.fragments if f.numel and f.source == "master"]
        if p.shards and all(s.replicated for s in p.shards.values()):  # every tp rank: one copy
            frags = [f for f in frags if f.shard == min(p.shards)]
        for f in sorted(frags, key=lambda f: (f.shard or 0, f.start)):
            if f.file not in loaded:
                loaded[f.file] = torch_load(ckpt.path / f.file)["optimizer_state_dict"]
            osd = loaded[f.file]
            inner, _ = torch_state(osd)
            flat = (osd.get("single_partition_of_fp32_groups") or osd["fp32_flat_groups"])[f.group]
            window = slice(f.group_offset, f.group_offset + f.numel)
            parts["fp32"].append(flat.flatten()[window])
            for key in ("exp_avg", "exp_avg_sq"):
                parts[key].append(inner["state"][f.group][key].flatten()[window])
        out[name] = [torch.cat(parts[k]).double() for k in ("fp32", "exp_avg", "exp_avg_sq")]
    return out


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300)


@pytest.mark.parametrize("name", ["s1_w2_fp32", "s2_w2_bf16", "s1_w2_bf16_bf16opt", "s3_w4_bf16",
                                  "s3_w3_fp16_sub", "s2_w3_fp32_rr"])
def test_param_stats_equal_torch(name):
    ckpt = open_checkpoint(FIXTURES / name)
    opt = read_optimizer(ckpt)
    result = optimizer_stats(ckpt, opt)
    stats = result.params
    assert not result.left_out
    want = expected(ckpt, opt)
    reference = torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)
    assert [s.name for s in stats] == list(want)
    for s in stats:
        x, m, v = want[s.name]
        assert torch.equal(x.float(), reference[s.name].flatten())  # the masters are the true ones
        eps = opt.groups[ckpt.params[s.name].group]["eps"]
        u = m.abs() / (v.sqrt() + eps)
        assert close(s.master_l2, x.norm().item()), s.name
        assert close(s.master_max_abs, x.abs().max().item())
        assert close(s.exp_avg_l2, m.norm().item())
        assert close(s.sqrt_exp_avg_sq_l2, v.sqrt().norm().item())
        assert close(s.update_mean, u.mean().item()), s.name
        assert close(s.update_max, u.max().item())
        assert s.nonfinite == 0 and s.numel == x.numel()


def test_windows_cut_a_param_and_keep_elements_aligned(monkeypatch):
    """With windows of 7 elements every param spans several (and rank boundaries cut them),
    in batches of 3 params: the update is still m[i] against v[i] of the same element, and
    the progress ends at its total."""
    from zinspect.core import optimizer_stats as module

    monkeypatch.setattr(module, "WINDOW", 7)
    monkeypatch.setattr(module, "BATCH_PARAMS", 3)  # and several passes of the stream
    ckpt = open_checkpoint(FIXTURES / "s3_w4_bf16")
    opt = read_optimizer(ckpt)
    want = expected(ckpt, opt)
    calls = []
    result = optimizer_stats(ckpt, opt, progress=lambda done, total, name: calls.append(done))
    assert [s.name for s in result.params] == list(want)
    assert calls[-1] == sum(s.numel for s in result.params) * 12
    for s in result.params:
        x, m, v = want[s.name]
        u = m.abs() / (v.sqrt() + 1e-8)
        assert close(s.update_max, u.max().item()) and close(s.update_mean, u.mean().item()), s.name
        assert close(s.master_l2, x.norm().item())
    assert WINDOW > 7


def test_cancel_stops_the_stream():
    ckpt = open_checkpoint(FIXTURES / "s1_w2_fp32")
    with pytest.raises(MergeCancelled, match="optimizer statistics cancelled"):
        optimizer_stats(ckpt, read_optimizer(ckpt), should_stop=lambda: True)


# -- zinspect info ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s2_w4_fp16", "s1_w2_bf16_bf16opt", "s3_w2_fp32"])
def test_info_json_and_human_carry_the_optimizer(name):
    ckpt = open_checkpoint(FIXTURES / name)
    inner, osd = torch_state(torch_load(rank0_optimizer_file(ckpt).path)["optimizer_state_dict"])
    r = run_zinspect("info", FIXTURES / name, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["optimizer"]
    assert got["step"] == 2 and got["name"] == "AdamW" and got["adam"] is True
    assert got["groups"] == hyper(inner["param_groups"])
    assert got["state_keys"] == ["step", "exp_avg", "exp_avg_sq"]
    assert got["clip_grad"] == osd.get("clip_grad")  # ZeRO-3 saves none
    human = run_zinspect("info", FIXTURES / name).stdout
    line = next(x for x in human.splitlines() if x.startswith("optimizer"))
    assert "AdamW" in line and "step 2" in line and "lr 0.01 / 0.005" in line
    if name == "s2_w4_fp16":
        assert got["loss_scaler"]["scale"] == 256 and got["loss_scaler"]["dynamic"] is True
        assert got["skipped_steps"] == 0
        assert any(x.startswith("loss scale") and "256, dynamic" in x for x in human.splitlines())
    else:  # BF16_Optimizer saves no scaler; fp32 ZeRO-3 a static scale of 1: no line
        assert (got["loss_scaler"] is None) == (name == "s1_w2_bf16_bf16opt")
        assert "loss scale" not in human


def test_a_missing_rank_leaves_its_params_out_with_the_reason(tmp_path):
    """Rank 1's optimizer file is gone: the params it held a part of are left out (named, with
    why); the others are still computed, equal to torch's."""
    from conftest import copy_fixture

    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    ckpt = open_checkpoint(tag)
    opt = read_optimizer(ckpt)
    result = optimizer_stats(ckpt, opt)
    trainable = [n for n, p in ckpt.params.items() if not p.frozen and not p.tied_to]
    short = {n for n in trainable if sum(f.numel for f in ckpt.params[n].fragments)
             < ckpt.params[n].numel}
    assert short and set(result.left_out) == short
    assert len(result.params) + len(short) == len(trainable)
    assert result.left_out["head.weight"] == "its fp32 master covers 31 of 915 elements"
    reference = torch.load(FIXTURES / "s2_w2_fp32_plain" / "reference_fp32.pt", weights_only=True)
    assert result.params and all(close(s.master_l2, reference[s.name].double().norm().item())
                                 for s in result.params)


@pytest.mark.parametrize("name", ["hpz_s3_w4", "offload_s3_w2", "moe_ep2_w4_s1_top2_res",
                                  "moe_ep2_w4_s2_fp32", "pp2_dp1_s0_bf16", "pp2_dp2_s1_bf16_pmd",
                                  "pp2_dp2_s1_fp32", "tp2_dp2_s1_toy", "tp2_dp2_s2_llama_bf16_tied",
                                  "tp2_dp2_s2_toy", "tp2_dp2_s3_toy"])
def test_parallel_layouts_param_stats_equal_torch(name):
    """Pipeline stages, tensor-parallel shards (a replicated param once), expert groups: every
    trainable param's numbers equal torch's from its optimizer files, and its master's L2 is
    the reference's."""
    ckpt = open_checkpoint(PARALLEL / name)
    opt = read_optimizer(ckpt)
    result = optimizer_stats(ckpt, opt)
    assert not result.left_out and not result.masters_only
    want = expected(ckpt, opt)
    reference = torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)
    assert [s.name for s in result.params] == list(want)
    for s in result.params:
        x, m, v = want[s.name]
        u = m.abs() / (v.sqrt() + opt.eps(s.group))
        assert close(s.master_l2, reference[s.name].double().norm().item()), s.name
        assert close(s.master_l2, x.norm().item()) and close(s.exp_avg_l2, m.norm().item())
        assert close(s.sqrt_exp_avg_sq_l2, v.sqrt().norm().item()), s.name
        assert close(s.update_max, u.max().item()) and close(s.update_mean, u.mean().item())


@pytest.mark.parametrize("name", ["z0_fp32", "z0_bf16", "z0_fp16"])
def test_zero0_param_stats_equal_torch(name):
    """Was: masters only (ZeRO-0's moments not located). Now ZeRO-0's moments (the torch
    optimizer's per-param state in the model states: group g's i-th param has
    state[param_groups[g]['params'][i]]) give every column, equal to torch.load's."""
    ckpt = open_checkpoint(PARALLEL / name)
    opt = read_optimizer(ckpt)
    result = optimizer_stats(ckpt, opt)
    assert not result.left_out and not result.masters_only and opt.adam
    reference = torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)
    saved = torch_load(ckpt.path / "mp_rank_00_model_states.pt")["optimizer"]
    inner = saved.get("optimizer_state_dict", saved)
    state = {n: inner["state"][inner["param_groups"][g.index]["params"][i]]
             for g in ckpt.groups for i, n in enumerate(g.params)}
    assert [s.name for s in result.params] == [n for n in ckpt.params if n in state]
    for s in result.params:
        m, v = (state[s.name][k].double() for k in ("exp_avg", "exp_avg_sq"))
        u = m.abs() / (v.sqrt() + opt.eps(s.group))
        assert close(s.master_l2, reference[s.name].double().norm().item()), s.name
        assert close(s.exp_avg_l2, m.norm().item()) and close(s.sqrt_exp_avg_sq_l2, v.sqrt().norm().item())
        assert close(s.update_max, u.max().item()) and close(s.update_mean, u.mean().item())


def test_odd_values_stay_bounded_and_json_safe(tmp_path):
    """A torch.save'd optimizer file with an inf clip_grad, a NaN eps, betas nested deep and a
    tensor lr: JSON without inf/nan, nesting cut, the step and the lr read as numbers."""
    from zinspect.core.model import Checkpoint, RankFile

    deep = [0.9]
    for _ in range(10):
        deep = [deep, deep]
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {
        "zero_stage": 2, "clip_grad": float("inf"),
        "base_optimizer_state": {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3),
                          "exp_avg_sq": torch.zeros(3)}},
            "param_groups": [{"lr": torch.tensor(0.5), "betas": deep, "eps": float("nan"),
                              "params": [0]}]}}}, tmp_path / name)
    ckpt = Checkpoint(tmp_path, "t", files=[RankFile(tmp_path / name, "optim", 0, 0, format="zip")])
    opt = read_optimizer(ckpt)
    assert opt.step == 7 and opt.name == "Adam/AdamW" and opt.groups[0]["lr"] == 0.5
    assert opt.groups[0]["eps"] == "nan" and opt.eps(0) == 1e-8  # not a number: the default
    assert opt.groups[0]["betas"][0] == ["<nested>", "<nested>"]
    out = json.dumps(opt.to_json(), allow_nan=False)
    assert '"clip_grad": "inf"' in out
