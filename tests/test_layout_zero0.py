"""The ZeRO-0 layout (zinspect/core/layouts/zero0.py, group_order.py) on the real fixtures
tests/fixtures/parallel/z0_{fp32,bf16,fp16}: the masters matched to names by shape order (fp16/bf16:
FP16_UnfusedOptimizer's fp32_groups; fp32: the module weights), ties from shared storages, the merge
bit for bit and loaded strictly into the generator's model; forged copies that fit two ways or
none are refused, never guessed."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TESTS, run_zinspect

import zinspect
from zinspect.core import open_checkpoint
from zinspect.core.layouts.group_order import match_group_order
from zinspect.core.merge import plan_merge
from zinspect.errors import NotMergeable

PARALLEL = FIXTURES / "parallel"
ZERO0 = ["z0_bf16", "z0_fp16", "z0_fp32"]


def manifest(name: str) -> dict:
    return json.loads((PARALLEL / name / "manifest.json").read_text())


@functools.cache
def reference(name: str) -> dict:
    return torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)


def generator_model(name: str):
    """The generator's own model class (tests/tools/make_ds_variants.py, imported, not run)."""
    spec = importlib.util.spec_from_file_location("make_ds_variants",
                                                  TESTS / "tools" / "make_ds_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dims = manifest(name)["model"]
    return module.build_model(dims["width"], dims["blocks"], dims["vocab"])


# ------------------------------------------------------------------ group_order
def test_group_order_unique_with_a_frozen_param():
    params = [("w", (4, 3)), ("b", (4,)), ("frozen", (3, 3)), ("w2", (2, 3)), ("b2", (2,))]
    fit = match_group_order(params, [[(4, 3), (2, 3)], [(4,), (2,)]])
    assert (fit.problem, fit.groups, fit.skipped) == ("", [["w", "w2"], ["b", "b2"]], ["frozen"])


def test_group_order_refuses_two_fits_and_none():
    params = [("norm.weight", (4,)), ("norm.bias", (4,))]
    assert match_group_order(params, [[(4,)], [(4,)]]).problem == "ambiguous"
    assert match_group_order(params, [[(4,)]]).problem == "ambiguous"  # which one is frozen?
    assert match_group_order(params, [[(5,)]]).problem == "none"
    assert match_group_order(params, [[(4,), (4,), (4,)]]).problem == "none"
    # the first param may not be the frozen one: then only norm.bias can be
    fit = match_group_order(params, [[(4,)]], required=1)
    assert (fit.problem, fit.groups, fit.skipped) == ("", [["norm.weight"]], ["norm.bias"])


def test_group_order_an_entry_without_state_fits_any_param():
    """A param the optimizer never stepped (frozen, yet in a group) has no state: shape None."""
    params = [("w", (4, 3)), ("frozen", (3, 3)), ("b", (4,))]
    fit = match_group_order(params, [[(4, 3), None], [(4,)]])
    assert (fit.problem, fit.groups, fit.skipped) == ("", [["w", "frozen"], ["b"]], [])
    assert match_group_order(params, [[None], [None, (4,)]]).problem == "ambiguous"


# ------------------------------------------------------------------ the real fixtures
@pytest.mark.parametrize("name", ZERO0)
def test_names_frozen_and_ties_are_the_manifests(name):
    m, c = manifest(name), open_checkpoint(PARALLEL / name)
    assert (c.layout, c.stage, c.world_size, c.findings, c.features) == \
        ("zero0", 0, m["world_size"], [], [])
    assert {n: (p.shape, p.frozen, p.tied_to) for n, p in c.params.items()} == \
        {n: (tuple(p["shape"]), p["frozen"], m["tied"].get(n)) for n, p in m["params"].items()}
    assert {n: b.shape for n, b in c.buffers.items()} == {n: tuple(s) for n, s in m["buffers"].items()}
    masters = {f.source for p in c.params.values() if not p.frozen for f in p.fragments}
    assert masters == {"master"} and c.master_dtype == "float32"
    assert [len(g.params) for g in c.groups] == [7, 10]  # decay (2-D) and no-decay groups
    (frozen,) = [n for n, p in m["params"].items() if p["frozen"]]
    assert [f.source for f in c.params[frozen].fragments] == ["module"]


@pytest.mark.parametrize("name", ZERO0)
def test_merge_is_the_reference_and_loads_strictly(name):
    state, ref = zinspect.get_fp32_state_dict(PARALLEL / name), reference(name)
    assert set(state) == set(ref)
    for n, t in ref.items():
        assert state[n].dtype == t.dtype and torch.equal(state[n], t), n
    model = generator_model(name)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.embed.weight, ref["embed.weight"])


@pytest.mark.parametrize("name", ZERO0)
def test_validate_exits_0(name):
    r = run_zinspect("validate", PARALLEL / name)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ forged copies
def forge(tmp_path: Path, name: str, change) -> Path:
    """A copy whose mp_rank_00 optimizer state `change` rewrote (torch.load of our own fixture)."""
    root = tmp_path / name
    root.mkdir()
    shutil.copy2(PARALLEL / name / "latest", root / "latest")
    tag = root / manifest(name)["tag"]
    shutil.copytree(PARALLEL / name / manifest(name)["tag"], tag)
    path = tag / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=False)
    change(state["optimizer"])
    torch.save(state, path)
    return root


def _move_a_norm_weight_to_the_decay_group(opt):
    """blocks.0.norm.weight's master moved to group 0 (after embed.weight): it or its equal-
    shaped bias could be that group's second entry."""
    groups, listed = opt["fp32_groups"], opt["optimizer_state_dict"]["param_groups"]
    groups[0].insert(1, groups[1].pop(0))
    listed[0]["params"].append(listed[1]["params"].pop())


def _drop_a_master(opt):
    opt["fp32_groups"][0].pop()


@pytest.mark.parametrize("change, words", [
    (_move_a_norm_weight_to_the_decay_group, "in more than one way"),
    (_drop_a_master, "different numbers of params"),
])
def test_a_match_that_is_not_unique_is_refused(tmp_path, change, words):
    c = open_checkpoint(forge(tmp_path, "z0_bf16", change))
    assert [(f.code, f.file) for f in c.findings] == \
        [("zero0-order-unknown", "mp_rank_00_model_states.pt")]
    assert words in c.findings[0].message
    with pytest.raises(NotMergeable):
        plan_merge(c)


def test_a_zero_optimizer_file_beside_zero0_is_a_leftover(tmp_path):
    """Was: read as a ZeRO-1 checkpoint missing rank 1. ZeRO-0 keeps its optimizer in the model
    states; a zero_pp_rank optimizer file beside it is another run's."""
    root = tmp_path / "z0_fp32"
    shutil.copytree(PARALLEL / "z0_fp32", root)
    stray = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shutil.copy(FIXTURES / "s1_w2_fp32" / "global_step2" / stray, root / "global_step2" / stray)
    c = open_checkpoint(root)
    assert (c.layout, [(f.code, f.file) for f in c.errors]) == ("zero0", [("stale-rank-file", stray)])
    assert [t.name for t in plan_merge(c, salvage=True).tensors] == \
        [t.name for t in plan_merge(open_checkpoint(PARALLEL / "z0_fp32")).tensors]


@pytest.mark.parametrize("name", ZERO0)
def test_stats_moments_equal_the_torch_optimizer_state(name):
    """Was: refused (no exp_avg located for ZeRO-0). `stats --moments` now reads each param's
    exp_avg / exp_avg_sq from the model states' torch optimizer state."""
    from torchload import torch_load

    r = run_zinspect("stats", PARALLEL / name, "--moments", "--json")
    assert r.returncode == 0, r.stderr
    rows = {p["name"]: p for p in json.loads(r.stdout)["params"]}
    c = open_checkpoint(PARALLEL / name)
    opt = torch_load(c.path / "mp_rank_00_model_states.pt")["optimizer"]
    inner = opt.get("optimizer_state_dict", opt)
    checked = 0
    for g in c.groups:
        for i, pname in enumerate(g.params):
            per = inner["state"][inner["param_groups"][g.index]["params"][i]]
            for key in ("exp_avg", "exp_avg_sq"):
                row = rows[f"{pname}:{key}"]
                assert row["max_abs"] == per[key].abs().max().item(), (pname, key)
                assert abs(row["l2"] - per[key].double().norm().item()) <= 1e-9 * row["l2"]
                checked += 1
    assert checked == 34
