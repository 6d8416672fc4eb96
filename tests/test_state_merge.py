"""`merge --state all` (issue 11): the Adam moments written beside the weights, checked against
torch.load of the optimizer files, sliced and concatenated here by DeepSpeed's own rules (not
with zinspect's fragments):

* ZeRO-1/2: a param group's flat moments are the ranks' equal partitions back to back; its
  params sit in it in `param_shapes` order, one after the other;
* ZeRO-3: per sub-group, every param is split into ceil(numel / world) elements per rank, laid
  back to back in each rank's partition in `param_shapes` order.

The same slicing of the fp32 masters must give reference_fp32.pt, which checks the slicing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FIXTURES, run_zinspect
from safetensors.torch import load_file
from test_optimizer import torch_load

from zinspect.core import open_checkpoint
from zinspect.core.merge import merge
from zinspect.errors import UsageError

STAGED = ["s1_w2_fp32", "s2_w2_bf16", "s2_w4_fp16", "s3_w2_fp32", "s3_w3_fp16_sub"]


def by_hand(name: str, mp: str = "00") -> dict[str, dict[str, torch.Tensor]]:
    """{"fp32" | "exp_avg" | "exp_avg_sq": {param: tensor}} from torch.load of the files (of
    tensor-parallel rank `mp`: its shards)."""
    tag = next(p for p in (FIXTURES / name).iterdir() if p.is_dir())
    optim = sorted(tag.glob(f"*mp_rank_{mp}_optim_states.pt"),
                   key=lambda p: int(p.name.split("_rank_")[1].split("_")[0]))
    osds = [torch_load(p)["optimizer_state_dict"] for p in optim]
    world = len(osds)
    model = torch_load(next(tag.glob(f"*mp_rank_{mp}_model_states.pt")))
    stage3 = "fp32_flat_groups" in osds[0]
    out: dict[str, dict] = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for g, shapes in enumerate(model["param_shapes"]):
        parts = {}
        for key in out:
            if stage3:
                parts[key] = [o["fp32_flat_groups"][g] if key == "fp32" else
                              o["optimizer_state_dict"]["state"][g][key] for o in osds]
            else:
                parts[key] = [o["single_partition_of_fp32_groups"][g] if key == "fp32" else
                              o["base_optimizer_state"]["state"][g][key] for o in osds]
        off = 0
        for pname, shape in shapes.items():
            numel = math.prod(shape)
            for key, ranks in parts.items():
                if stage3:
                    share = math.ceil(numel / world)
                    flat = torch.cat([r.flatten()[off:off + share] for r in ranks])[:numel]
                else:
                    flat = torch.cat([r.flatten() for r in ranks])[off:off + numel]
                out[key][pname] = flat.reshape(shape)
            off += math.ceil(numel / world) if stage3 else numel
    return out


@pytest.mark.parametrize("name", STAGED)
def test_every_moment_equals_the_optimizer_files(tmp_path, name):
    hand = by_hand(name)
    ref = torch.load(FIXTURES / name / "reference_fp32.pt")
    assert all(torch.equal(t, ref[n]) for n, t in hand["fp32"].items())  # the slicing is right
    result = merge(open_checkpoint(FIXTURES / name), tmp_path / "out", hf_files=False, state="all")
    assert result.states == ["exp_avg", "exp_avg_sq"] and result.unverified == []
    for key in ("exp_avg", "exp_avg_sq"):
        got = load_file(tmp_path / "out" / f"{key}.safetensors")
        assert set(got) == set(hand[key]), key
        for pname, want in hand[key].items():
            assert got[pname].dtype == torch.float32
            assert torch.equal(got[pname], want.float()), (key, pname)
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert set(hand["fp32"]) <= set(weights)


def test_sgd_state_all_writes_momentum_buffer(tmp_path):
    """A real ZeRO-2 SGD (momentum) run: --state all writes its momentum_buffer under its own
    name (no Adam moments), each param's equal to the ranks' buffers cut by param_shapes (rank
    1's buffer keeps its padding, the fp32 partition does not)."""
    name = "optim/sgd_s2_w2_fp32"
    tag = next(p for p in (FIXTURES / name).iterdir() if p.is_dir())
    osds = [torch_load(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
            for r in (0, 1)]
    want = {}
    for g, shapes in enumerate(torch_load(tag / "mp_rank_00_model_states.pt")["param_shapes"]):
        flat = torch.cat([o["base_optimizer_state"]["state"][g]["momentum_buffer"]
                          [:o["single_partition_of_fp32_groups"][g].numel()] for o in osds])
        off = 0
        for pname, shape in shapes.items():
            want[pname] = flat[off:off + math.prod(shape)].reshape(shape)
            off += math.prod(shape)
    result = merge(open_checkpoint(FIXTURES / name), tmp_path / "out", hf_files=False, state="all")
    assert result.states == ["momentum_buffer"] and result.unverified == []
    got = load_file(tmp_path / "out" / "momentum_buffer.safetensors")
    assert set(got) == set(want) and len(want) == 25
    assert all(torch.equal(got[n], t) for n, t in want.items())
    assert not (tmp_path / "out" / "exp_avg.safetensors").exists()
    meta = json.loads((tmp_path / "out" / "optimizer_state.json").read_text())
    assert meta["optimizer"] == "SGD (momentum)" and list(meta["states"]) == ["momentum_buffer"]


@pytest.mark.parametrize("name", ["z0_fp32", "z0_bf16", "z0_fp16"])
def test_zero0_state_all_equals_the_torch_optimizer_state(tmp_path, name):
    """ZeRO-0: the moments are the torch optimizer's per-param state (fp32: the model states'
    `optimizer`; bf16/fp16: FP16_UnfusedOptimizer's optimizer_state_dict), by position."""
    ckpt = open_checkpoint(FIXTURES / "parallel" / name)
    saved = torch_load(ckpt.path / "mp_rank_00_model_states.pt")["optimizer"]
    inner = saved.get("optimizer_state_dict", saved)
    want = {n: inner["state"][inner["param_groups"][g.index]["params"][i]]
            for g in ckpt.groups for i, n in enumerate(g.params)}
    result = merge(ckpt, tmp_path / "out", hf_files=False, state="all")
    assert result.states == ["exp_avg", "exp_avg_sq"] and result.unverified == []
    for key in ("exp_avg", "exp_avg_sq"):
        got = load_file(tmp_path / "out" / f"{key}.safetensors")
        assert set(got) == set(want) and len(want) == 17
        assert all(torch.equal(got[n], w[key]) for n, w in want.items()), key


def test_zero0_adagrad_state_all_writes_sum(tmp_path):
    """A real ZeRO-0 Adagrad run (tests/tools/make_optim_fixtures.py): its per-param `sum` is
    written under its own name, equal to the torch state at each param's position."""
    ckpt = open_checkpoint(FIXTURES / "optim" / "adagrad_s0_fp32")
    assert ckpt.states == ["fp32", "sum"]
    opt = torch_load(ckpt.path / "mp_rank_00_model_states.pt")["optimizer"]
    want = {n: opt["state"][opt["param_groups"][g.index]["params"][i]]["sum"]
            for g in ckpt.groups for i, n in enumerate(g.params)}
    result = merge(ckpt, tmp_path / "out", hf_files=False, state="all")
    assert result.states == ["sum"] and result.unverified == []
    got = load_file(tmp_path / "out" / "sum.safetensors")
    assert set(got) == set(want) and len(want) == 17
    assert all(torch.equal(got[n], t) for n, t in want.items())
    meta = json.loads((tmp_path / "out" / "optimizer_state.json").read_text())
    assert meta["optimizer"] == "Adagrad" and list(meta["states"]) == ["sum"]


def test_state_json_holds_step_and_hyper_parameters(tmp_path):
    name = "s3_w2_fp32"
    merge(open_checkpoint(FIXTURES / name), tmp_path / "out", hf_files=False, state="all",
          max_shard_size="8KB")
    meta = json.loads((tmp_path / "out" / "optimizer_state.json").read_text())
    tag = next(p for p in (FIXTURES / name).iterdir() if p.is_dir())
    osd = torch_load(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    groups = osd["optimizer_state_dict"]["param_groups"]
    assert meta["step"] == int(osd["optimizer_state_dict"]["state"][0]["step"])
    assert [g["lr"] for g in meta["param_groups"]] == [g["lr"] for g in groups]
    assert [g["betas"] for g in meta["param_groups"]] == [list(g["betas"]) for g in groups]
    assert [g["eps"] for g in meta["param_groups"]] == [g["eps"] for g in groups]
    ckpt = open_checkpoint(FIXTURES / name)
    assert sorted(n for g in meta["param_groups"] for n in g["params"]) == \
        sorted(n for n, p in ckpt.params.items() if not p.frozen and not p.tied_to)
    # sharded like the weights, each moment with its own index
    for key in ("exp_avg", "exp_avg_sq"):
        index = json.loads((tmp_path / "out" / f"{key}.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == meta["states"][key]
        assert len(meta["states"][key]) > 1


def test_cli_state_all_and_json(tmp_path):
    out = tmp_path / "out"
    r = run_zinspect("merge", FIXTURES / "s2_w2_bf16", out, "--state", "all", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["states"] == ["exp_avg", "exp_avg_sq"]
    assert {"model.safetensors", "exp_avg.safetensors", "exp_avg_sq.safetensors",
            "optimizer_state.json"} <= set(j["files"])
    assert "exp_avg and exp_avg_sq" in r.stderr


def test_state_all_refuses_without_any_state_and_with_peft(tmp_path):
    """Was: refused on the SGD run (no Adam moments); it now writes its momentum_buffer (see
    test_sgd_state_all_writes_momentum_buffer). A checkpoint whose files hold no per-param
    state at all (the SGD run's state entries dropped) still refuses, nothing written."""
    sgd = open_checkpoint(FIXTURES / "optim" / "sgd_s2_w2_fp32")
    sgd.moments.clear()
    with pytest.raises(UsageError, match="no per-param optimizer state"):
        merge(sgd, tmp_path / "a", hf_files=False, state="all")
    assert not (tmp_path / "a").exists()
    with pytest.raises(UsageError, match="--peft"):
        merge(open_checkpoint(FIXTURES / "hf_mistral_lora_s3_w2_bf16"), tmp_path / "b",
              peft=True, state="all")
    assert not (tmp_path / "b").exists()


def joined(kind: str, dim, shards: list[torch.Tensor], shape) -> torch.Tensor:
    """The full tensor from tp shards, by the manifest's split kind (its `split_kinds`)."""
    if kind == "replicated":
        return shards[0]
    if kind == "column-subparams":
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
    return torch.cat(shards, dim)[:shape[0]] if kind == "vocab" else torch.cat(shards, dim)


@pytest.mark.parametrize("name", ["tp2_dp2_s1_toy", "tp2_dp2_s2_toy"])
def test_tensor_parallel_moments_are_the_shards_joined(tmp_path, name):
    """Each tp rank's moments sliced by hand from its own optimizer files, joined as the
    manifest's split kinds say (the same join of the masters gives reference_fp32.pt)."""
    fixture = f"parallel/{name}"
    manifest = json.loads((FIXTURES / fixture / "manifest.json").read_text())
    per_tp = [by_hand(fixture, f"{t:02d}") for t in range(manifest["tp"])]
    ref = torch.load(FIXTURES / fixture / "reference_fp32.pt")
    result = merge(open_checkpoint(FIXTURES / fixture), tmp_path / "out", hf_files=False,
                   state="all")
    assert result.drift == {} and result.unverified == []
    owners = [n for n, info in manifest["params"].items() if not info["tied_to"]]
    assert set(owners) == set(per_tp[0]["exp_avg"])  # nothing frozen: every owner has moments
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        got = load_file(tmp_path / "out" / f"{'model' if key == 'fp32' else key}.safetensors")
        for pname in owners:
            info = manifest["params"][pname]
            want = joined(info["kind"], info["dim"], [h[key][pname] for h in per_tp], info["shape"])
            if key == "fp32":
                assert torch.equal(want, ref[pname]), pname  # the join is right
            assert torch.equal(got[pname], want), (key, pname)


def test_moments_are_crc_verified_a_flipped_moment_refuses_or_is_salvaged(tmp_path):
    """Bytes flipped in rank 1's exp_avg record: the weights-only merge never reads it (exit 0),
    --state all refuses naming the record, --state all --salvage leaves out exactly the params
    of that record (weights and moments) and says so."""
    import damage as D

    root = D.copy_root(tmp_path, "s3_w2_fp32", "flipped_moment")
    ckpt = open_checkpoint(root)
    frag = ckpt.state_fragments("encoder.cube", "exp_avg")
    frag = next(f for f in frag if f.rank == 1)
    D.flip(ckpt.path / frag.file, frag.offset, 4)
    record = D.record_holding(ckpt.path / frag.file, frag.offset)[0]
    held = {n for n in ckpt.params if any(
        f.file == frag.file and f.offset is not None and
        D.record_holding(ckpt.path / f.file, f.offset)[0] == record
        for f in ckpt.state_fragments(n, "exp_avg"))}
    assert "encoder.cube" in held

    assert run_zinspect("merge", root, tmp_path / "w").returncode == 0
    r = run_zinspect("merge", root, tmp_path / "a", "--state", "all")
    assert r.returncode == 1 and "CRC32" in r.stderr and record in r.stderr, r.stderr
    assert not (tmp_path / "a").exists()

    r = run_zinspect("merge", root, tmp_path / "s", "--state", "all", "--salvage", "--json",
                     "--no-hf-files")
    assert r.returncode == 1, r.stderr
    j = json.loads(r.stdout)
    assert set(j["dropped"]) == held
    for key in ("model", "exp_avg", "exp_avg_sq"):
        names = set(load_file(tmp_path / "s" / f"{key}.safetensors"))
        assert not names & held and names, key
