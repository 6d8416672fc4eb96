"""Layouts zinspect recognises and names, even where it cannot merge them yet."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import copy_fixture

from zinspect.core import open_checkpoint
from zinspect.core.merge import plan_merge
from zinspect.errors import NotMergeable


def codes(ckpt) -> set[str]:
    return {f.code for f in ckpt.findings}


def _tensor_parallel(tag):
    for f in list(tag.iterdir()):
        shutil.copy(f, tag / f.name.replace("mp_rank_00", "mp_rank_01"))


def _pipeline(tag):
    torch.save({"weight": torch.zeros(3)}, tag / "layer_01-model_00-model_states.pt")


def _moe(tag):
    torch.save({"w": torch.zeros(2)}, tag / "layer_0_expert_3_mp_rank_00_model_states.pt")


def _nvme(tag):
    (tag / "offloaded_tensors" / "rank00").mkdir(parents=True)


@pytest.mark.parametrize("make, layout", [
    (_tensor_parallel, "tensor_parallel_unsupported"), (_nvme, "nvme_offload"),
])  # universal: described since issue 11 (tests/test_universal.py reads real ones)
def test_unsupported_layouts_are_named_and_refused(tmp_path, make, layout):
    tag = copy_fixture(tmp_path, "s2_w2_bf16")
    make(tag)
    ckpt = open_checkpoint(tag)
    assert ckpt.layout == layout
    assert "unsupported-layout" in codes(ckpt)
    assert ckpt.params, "what can be read is still shown"
    with pytest.raises(NotMergeable, match="cannot merge|not merge it yet"):
        plan_merge(ckpt)


@pytest.mark.parametrize("make, stray", [
    (_pipeline, "layer_01-model_00-model_states.pt"),
    (_moe, "layer_0_expert_3_mp_rank_00_model_states.pt"),
])
def test_a_stray_layer_or_expert_file_makes_no_layout(tmp_path, make, stray):
    """Was: named a pipeline / MoE checkpoint and refused (issue 10 implemented both: a real
    pipeline records pp > 1 or saves no module, a real MoE run records num_experts;
    tests/test_layout_pipeline.py, test_layout_moe.py). A stray file beside plain ZeRO files is a
    leftover of another run, named."""
    tag = copy_fixture(tmp_path, "s2_w2_bf16")
    make(tag)
    ckpt = open_checkpoint(tag)
    assert ckpt.layout == "zero"
    assert [(f.code, f.file) for f in ckpt.errors] == [("stale-rank-file", stray)]


def test_zero0_checkpoint_is_described(tmp_path):
    """Was: named and refused. Now described (tests/test_layout_zero0.py has the real ones): an
    optimizer state without shapes cannot say what was frozen (an info); `w` is fp32, so its
    module weight is its master."""
    tag = tmp_path / "ckpt" / "global_step1"
    tag.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("global_step1")
    torch.save({"module": {"w": torch.ones(4)}, "buffer_names": [], "optimizer": {"state": {}},
                "param_shapes": None, "ds_version": "0.19.8", "dp_world_size": 1},
               tag / "mp_rank_00_model_states.pt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.layout == "zero0" and ckpt.stage == 0
    assert [f.code for f in ckpt.findings] == ["zero0-frozen-unknown"]
    assert list(ckpt.params) == ["w"] and not ckpt.params["w"].frozen
    assert [f.source for f in ckpt.params["w"].fragments] == ["master"]
    assert [t.name for t in plan_merge(ckpt).tensors] == ["w"]


def test_bf16_optimizer_layout_is_recognised():
    from conftest import FIXTURES

    ckpt = open_checkpoint(FIXTURES / "s1_w2_bf16_bf16opt")
    assert ckpt.layout == "bf16_optimizer" and ckpt.stage == 1
    assert "bf16-optimizer" in codes(ckpt)
    assert not ckpt.errors


def test_slice_mappings_are_cross_checked(monkeypatch):
    """Round robin reorders the flat groups while param_slice_mappings keep the original order,
    so the check is skipped there; forced on, it must notice the disagreement."""
    from conftest import FIXTURES

    from zinspect.core.layouts import zero12

    assert "slice-mapping-mismatch" not in codes(open_checkpoint(FIXTURES / "s2_w3_fp32_rr"))
    check = zero12.check_slice_mappings

    def as_if_round_robin_were_off(ctx, group, files, *rest):
        ctx.ckpt.ds_config = {}
        return check(ctx, group, files, *rest)

    monkeypatch.setattr(zero12, "check_slice_mappings", as_if_round_robin_were_off)
    ckpt = open_checkpoint(FIXTURES / "s2_w3_fp32_rr")
    found = [f for f in ckpt.findings if f.code == "slice-mapping-mismatch"]
    assert found and all(f.file and f.rank is not None and f.param for f in found)


def test_zero3_model_states_of_other_ranks_are_read_only_when_needed(tmp_path):
    """Their pickles only hold frozen-param fragments: opening checks them whole; asking for a
    frozen param's fragments reads them (all ranks, element ranges and padding right)."""
    from conftest import copy_fixture

    tag = copy_fixture(tmp_path, "s3_w4_bf16")
    ckpt = open_checkpoint(tag)
    models = {f.rank: f for f in ckpt.files_of("model")}
    assert not models[0].shallow and all(models[r].shallow for r in (1, 2, 3))
    frozen = ckpt.params["encoder.frozen_proj.weight"]  # 225 elements: 57 per rank, 3 padding
    assert [(f.rank, f.start, f.numel, f.padding) for f in frozen.fragments] == [
        (0, 0, 57, 0), (1, 57, 57, 0), (2, 114, 57, 0), (3, 171, 54, 3)]
    # a damaged pickle in a rank > 0 model-states file is still named when opening
    victim = tag / "zero_pp_rank_2_mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[200] ^= 0xFF  # inside data.pkl, the first record
    victim.write_bytes(bytes(data))
    damaged = open_checkpoint(tag)
    assert any(f.code == "unreadable-file" and f.rank == 2 for f in damaged.findings)


def _build_inputs(monkeypatch, name):
    """The LoadContext, Names and shared_params a fixture's `_build_params` was given."""
    from conftest import tag_dir

    from zinspect.core.layouts import common

    got = []
    real = common._build_params
    monkeypatch.setattr(common, "_build_params",
                        lambda *args, **kw: (got.append(args), real(*args, **kw))[1])
    open_checkpoint(tag_dir(name))
    monkeypatch.setattr(common, "_build_params", real)
    return got[0]


def _built(monkeypatch, ctx, names, shared, bulk_path: bool):
    """(params, findings) `_build_params` makes from these inputs, on the bulk path or not."""
    from zinspect.core.layouts import common

    ctx.ckpt.params, ctx.ckpt.findings = {}, []
    if not bulk_path:
        monkeypatch.setattr(common, "_usual_zero3", lambda names: None)
    common._build_params(ctx, names, shared)
    monkeypatch.undo()
    return list(ctx.ckpt.params.items()), ctx.ckpt.findings


@pytest.mark.parametrize("name", ["s3_w2_fp32", "s3_w4_bf16", "s3_w3_fp16_sub",
                                  "hf_llama_tied_s3_w4_fp32", "hf_mistral_lora_s3_w2_bf16"])
def test_usual_zero3_params_built_in_bulk_are_the_name_by_name_ones(monkeypatch, name):
    """ZeRO-3 model states whose module names (less buffers) are the flat groups' names, none
    frozen, are built in bulk (`_usual_zero3`): the same Params in the same order, and the
    same findings, as the name-by-name path; frozen or tied names take that path."""
    from dataclasses import replace

    from zinspect.core.layouts import common

    ctx, names, shared = _build_inputs(monkeypatch, name)
    trainable = {n for g in names.flat_groups for n, _ in g}
    assert common._usual_zero3(names) is None  # every one of these has frozen or tied names
    usual = replace(names, frozen_shapes={}, module={
        n: t for n, t in names.module.items() if n in trainable or n in names.buffer_names})
    bulk = common._usual_zero3(usual)
    assert bulk is not None and sorted(bulk[0]) == sorted(trainable)

    fast, slow = (_built(monkeypatch, ctx, usual, shared, bulk) for bulk in (True, False))
    assert fast == slow and len(fast[0]) == len(trainable)
    assert all(p.shape and p.dtype and not p.frozen and p.tied_to is None for _, p in fast[0])


def test_a_real_usual_zero3_checkpoint_takes_the_bulk_path(monkeypatch):
    """s3_w2_bf16_plain (a real ZeRO-3 run with no frozen or tied names) is built by
    `_usual_zero3`, and gives the same Params and findings as the name-by-name path."""
    from zinspect.core.layouts import common

    ctx, names, shared = _build_inputs(monkeypatch, "s3_w2_bf16_plain")
    assert common._usual_zero3(names) is not None

    fast, slow = (_built(monkeypatch, ctx, names, shared, bulk) for bulk in (True, False))
    assert fast == slow and len(fast[0]) == 27


@pytest.mark.parametrize("odd", [(True, 2), (1.0, 2), (-1, 4), tuple([1] * 65), (2**40, 2**40),
                                 [3, 2], (3, None), (), None, "3"])
def test_param_shapes_checked_in_bulk_follow_the_one_by_one_rule(odd):
    """pickled.group_members checks a usual param_shapes group in bulk (distinct shapes only);
    a group with any shape `pickled.shape` refuses (a bool or float dim equal to an int one, a
    negative dim, 65 dims, too many elements, a list, ...) gets exactly the one-by-one answer."""
    from zinspect.core.layouts.pickled import group_members, shape

    for group in ({"a": (1, 2), "b": odd, "c": (4,)}, {"a": odd, "b": (1, 2)}, {"a": (1, 2), 7: (3,)},
                  {"a": (1, 2), "b": (1, 2), "c": (0,)}):
        assert group_members(group) == [(str(n), shape(s)) for n, s in group.items()]
