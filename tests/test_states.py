"""Optimizer states in the model (issue 9): `Checkpoint.state_fragments` describes each trainable
param's fp32 master and Adam moments (exp_avg, exp_avg_sq) as byte ranges of the optimizer files.
Checked element by element: the bytes read at the described offsets are the reference masters
and the slices of torch.load's own moment tensors, for ZeRO-1/2, ZeRO-3 sub-groups and
BF16_Optimizer on the real fixtures."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES
from torchload import torch_load

from zinspect.core import open_checkpoint
from zinspect.core.coverage import cover

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = ["s1_w2_fp32", "s1_w4_bf16", "s2_w1_fp32", "s2_w3_fp32_rr", "s2_w4_fp16", "s3_w2_fp32",
         "s3_w3_fp16_sub", "s3_w4_bf16", "s1_w2_bf16_bf16opt"]


def _read(ckpt, f) -> torch.Tensor:
    with open(ckpt.path / f.file, "rb") as fh:
        fh.seek(f.offset)
        data = fh.read(f.nbytes)
    assert len(data) == f.nbytes
    return torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[f.dtype])


@pytest.mark.parametrize("name", NAMES)
def test_states_are_located_element_by_element(name):
    ckpt = open_checkpoint(FIXTURES / name)
    assert ckpt.states == ["fp32", "exp_avg", "exp_avg_sq"]
    ref = torch.load(FIXTURES / name / "reference_fp32.pt", map_location="cpu", weights_only=True)
    states = {}

    def state_of(file):
        if file not in states:
            osd = torch_load(ckpt.path / file)["optimizer_state_dict"]
            states[file] = (osd.get("base_optimizer_state") or osd["optimizer_state_dict"])["state"]
        return states[file]

    checked = 0
    for pname, p in ckpt.params.items():
        if p.frozen or p.tied_to or not p.numel:
            continue
        masters = ckpt.state_fragments(pname, "fp32")
        assert cover(p.numel, masters).gaps == []
        got = torch.cat([_read(ckpt, f).float() for f in sorted(masters, key=lambda f: f.start)])
        assert torch.equal(got, ref[pname].flatten().float()), pname
        for moment in ("exp_avg", "exp_avg_sq"):
            frags = ckpt.state_fragments(pname, moment)
            assert [(f.rank, f.file, f.group, f.start, f.numel, f.group_offset, f.source)
                    for f in frags] == [(f.rank, f.file, f.group, f.start, f.numel,
                                         f.group_offset, moment) for f in masters]
            for f in frags:
                want = state_of(f.file)[f.group][moment].flatten()
                assert torch.equal(_read(ckpt, f), want[f.group_offset:f.group_offset + f.numel]), \
                    (pname, moment, f.rank)
        checked += 1
    assert checked == sum(1 for p in ckpt.owners() if not p.frozen and p.numel)


def test_frozen_tied_and_unknown_states():
    ckpt = open_checkpoint(FIXTURES / "s3_w4_bf16")
    frozen = next(n for n, p in ckpt.params.items() if p.frozen and not p.tied_to)
    assert ckpt.state_fragments(frozen, "exp_avg") == [] == ckpt.state_fragments(frozen, "fp32")
    tied = next(p for p in ckpt.params.values() if p.tied_to and not p.frozen)
    assert ckpt.state_fragments(tied.name, "exp_avg") == \
        ckpt.state_fragments(tied.tied_to, "exp_avg") != []
    assert ckpt.state_fragments("no.such.param", "exp_avg") == []
    # a state this Adam run's files do not hold: nothing (was a ValueError before any
    # optimizer's own state names were read)
    assert ckpt.state_fragments(tied.tied_to, "momentum_buffer") == []
    with pytest.raises(ValueError, match="string"):
        ckpt.state_fragments(tied.tied_to, None)


def test_sgd_momentum_buffer_is_a_state_of_its_own_name():
    """A real ZeRO-2 run with SGD (momentum): masters and momentum_buffer, no Adam moments. Its
    rank 1 keeps the buffer's padding (2274 elements beside a 2272-element fp32 partition):
    located all the same, element by element equal to torch.load's."""
    ckpt = open_checkpoint(FIXTURES / "optim" / "sgd_s2_w2_fp32")
    assert ckpt.states == ["fp32", "momentum_buffer"]
    osds = {}
    checked = 0
    for pname, p in ckpt.params.items():
        if p.frozen or p.tied_to:
            continue
        assert ckpt.state_fragments(pname, "exp_avg") == []
        masters = ckpt.state_fragments(pname, "fp32")
        frags = ckpt.state_fragments(pname, "momentum_buffer")
        assert [(f.file, f.start, f.numel, f.group_offset) for f in frags] == \
            [(f.file, f.start, f.numel, f.group_offset) for f in masters] != []
        for f in frags:
            if f.file not in osds:
                osds[f.file] = torch_load(ckpt.path / f.file)["optimizer_state_dict"]
            want = osds[f.file]["base_optimizer_state"]["state"][f.group]["momentum_buffer"]
            assert torch.equal(_read(ckpt, f), want.flatten()[f.group_offset:f.group_offset + f.numel])
        checked += 1
    assert checked == 25


@pytest.mark.parametrize("name", ["z0_fp32", "z0_bf16", "z0_fp16"])
def test_zero0_moments_are_the_torch_optimizers_per_param_state(name):
    """ZeRO-0 keeps the torch optimizer's state per param, whole (fp32: the optimizer's own
    state dict; bf16/fp16: FP16_UnfusedOptimizer's optimizer_state_dict): group g's i-th param
    has state[param_groups[g]['params'][i]]."""
    ckpt = open_checkpoint(FIXTURES / "parallel" / name)
    assert ckpt.states == ["fp32", "exp_avg", "exp_avg_sq"]
    opt = torch_load(next(ckpt.path.glob("mp_rank_00_model_states.pt")))["optimizer"]
    inner = opt.get("optimizer_state_dict", opt)
    checked = 0
    for g in ckpt.groups:
        for i, pname in enumerate(g.params):
            per = inner["state"][inner["param_groups"][g.index]["params"][i]]
            for moment in ("exp_avg", "exp_avg_sq"):
                (f,) = ckpt.state_fragments(pname, moment)
                assert (f.file, f.start, f.numel, f.source) == \
                    ("mp_rank_00_model_states.pt", 0, ckpt.params[pname].numel, moment)
                assert torch.equal(_read(ckpt, f), per[moment].flatten()), (pname, moment)
                checked += 1
    assert checked == 2 * sum(1 for p in ckpt.owners() if not p.frozen) > 0


def test_zero0_fp16_pipeline_moments_are_each_stages_torch_state():
    """A ZeRO-0 fp16 pipeline: each stage's FP16_UnfusedOptimizer (mp_rank_SS) holds its params'
    fp32 masters (fp32_groups[g][i]) and torch state (state[param_groups[g]['params'][i]]): the
    moments the core locates are the state at the position whose master is the param's."""
    ckpt = open_checkpoint(FIXTURES / "parallel" / "pp2_dp1_s0_fp16")
    assert ckpt.states == ["fp32", "exp_avg", "exp_avg_sq"]
    opts, checked = {}, 0
    for pname, p in ckpt.params.items():
        if p.frozen or p.tied_to:
            continue
        (master,) = ckpt.state_fragments(pname, "fp32")
        if master.file not in opts:
            opts[master.file] = torch_load(ckpt.path / master.file)["optimizer"]
        opt = opts[master.file]
        got = _read(ckpt, master)
        (i,) = [i for i, t in enumerate(opt["fp32_groups"][master.group]) if torch.equal(t.flatten(), got)]
        idx = opt["optimizer_state_dict"]["param_groups"][master.group]["params"][i]
        for moment in ("exp_avg", "exp_avg_sq"):
            (f,) = ckpt.state_fragments(pname, moment)
            want = opt["optimizer_state_dict"]["state"][idx][moment].flatten()
            assert f.file == master.file and torch.equal(_read(ckpt, f), want), (pname, moment)
        checked += 1
    assert checked == 27


def test_zero0_fp32_pipeline_moments_are_the_owning_stages_torch_state():
    """A ZeRO-0 fp32 pipeline (the layer files' weights are the masters): each param's moments
    are its owning stage's torch state (mp_rank_SS `optimizer`) at its position, by the
    generator's own grouping (make_ds_pipeline.py: per stage, trainable params in module order,
    tied modules first, ndim >= 2 in group 0, the rest in group 1). Stages whose groups fit their
    params two ways (this fixture's frozen param is undecidable) locate nothing rather than guess."""
    name = "pp3_dp1_s0_fp32"
    ckpt = open_checkpoint(FIXTURES / "parallel" / name)
    m = json.loads((FIXTURES / "parallel" / name / "manifest.json").read_text())
    rename = {"1.weight": "tied_modules.embed.weight"}
    position = {}
    for s in range(m["pp"]):
        on = [n for n, p in m["params"].items() if s in p["stages"] and not p["frozen"]]
        groups = [[n for n in on if len(m["params"][n]["shape"]) >= 2],
                  [n for n in on if len(m["params"][n]["shape"]) < 2]]
        for g, members in enumerate(groups):
            for i, n in enumerate(members):
                if m["params"][n]["stages"][0] == s:
                    position[n] = (s, g, i)
    opts, located = {}, 0
    for pname, p in ckpt.params.items():
        frags = ckpt.state_fragments(pname, "exp_avg") if not p.tied_to else []
        if not frags:
            continue
        s, g, i = position[rename.get(pname, pname)]  # a frozen param would have no position
        file = f"mp_rank_{s:02d}_model_states.pt"
        opt = opts.setdefault(file, torch_load(ckpt.path / file)["optimizer"])
        per = opt["state"][opt["param_groups"][g]["params"][i]]
        for moment in ("exp_avg", "exp_avg_sq"):
            (f,) = ckpt.state_fragments(pname, moment)
            assert f.file == file and torch.equal(_read(ckpt, f), per[moment].flatten()), (pname, moment)
        located += 1
    assert located == 26


def test_stats_moments_of_an_sgd_run_are_its_momentum_buffer():
    """Was: refused ("no exp_avg / exp_avg_sq"). `stats --moments` on the SGD run gives each
    param's momentum_buffer (NAME:momentum_buffer), equal to torch.load's."""
    from conftest import run_zinspect

    name = FIXTURES / "optim" / "sgd_s2_w2_fp32"
    r = run_zinspect("stats", name, "--moments", "--json")
    assert r.returncode == 0, r.stderr
    rows = {p["name"]: p for p in json.loads(r.stdout)["params"]}
    tag = next(p for p in name.iterdir() if p.is_dir())
    osds = [torch_load(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
            for r in (0, 1)]
    checked = 0
    for g, shapes in enumerate(torch_load(tag / "mp_rank_00_model_states.pt")["param_shapes"]):
        flat = torch.cat([o["base_optimizer_state"]["state"][g]["momentum_buffer"]
                          [:o["single_partition_of_fp32_groups"][g].numel()] for o in osds])
        off = 0
        for pname, shape in shapes.items():
            want = flat[off:off + shape.numel()]
            off += shape.numel()
            row = rows[f"{pname}:momentum_buffer"]
            assert row["max_abs"] == want.abs().max().item() and row["numel"] == want.numel()
            checked += 1
    assert checked == 25 and not any(":exp_avg" in n for n in rows)
