"""Hostile inputs for tonight's bulk paths and the unified findings rules: the bulk ZeRO-3 params
(`layouts.common._usual_zero3`), info --json's row writer (`report_json.write_info_json`), the
lean `Param`, the world size by majority (`headers._world_size`) and the one-save / missing-file
rules (`one_save.outliers`, `gaps.outside`). Each case is a real fixture with one field forged,
or the real inputs a fixture gave `_build_params`, changed one way."""

from __future__ import annotations

import copy
import io
import json
import pickle
import shutil
from dataclasses import replace

import damage as D
import pytest
import torch
from conftest import FIXTURES
from test_layouts import _build_inputs, _built
from torchload import torch_load

from zinspect.core import open_checkpoint
from zinspect.core.layouts import common
from zinspect.core.model import Param
from zinspect.core.plan import plan_merge
from zinspect.core.torchzip import TensorRef
from zinspect.errors import NotMergeable
from zinspect.report_json import info_json, write_info_json


# ---------------------------------------------------------------------- one save: huge values
def _global_steps(tmp_path, values: dict[str, object]):
    """pp2_dp2_s1_fp32 with the `global_steps` of stage files (by name) forged."""
    root = tmp_path / "pp"
    shutil.copytree(FIXTURES / "parallel" / "pp2_dp2_s1_fp32", root)
    for name, value in values.items():
        path = next(root.glob(f"*/{name}"))
        state = torch_load(path)
        state["global_steps"] = value
        torch.save(state, path)
    return open_checkpoint(root)


@pytest.mark.parametrize(("value", "shown"), [(3, "3"), (float("nan"), "nan")], ids=["3", "nan"])
def test_a_forged_global_step_is_a_located_finding(tmp_path, value, shown):
    """A stage's `global_steps` forged (another step, NaN): one step-mismatch naming that file.
    (An int no float holds is refused by the readers: tests/test_trust_bigint.py.)"""
    ckpt = _global_steps(tmp_path, {"mp_rank_01_model_states.pt": value})
    steps = [f for f in ckpt.findings if f.code == "step-mismatch"]
    assert [(f.file, f.message) for f in steps] == [
        ("mp_rank_01_model_states.pt", f"mp_rank_01_model_states.pt was saved at global step "
         f"{shown}, the other files at global step 2")]
    out = io.StringIO()
    write_info_json(ckpt, out)
    assert json.loads(out.getvalue())["findings"]


def test_files_that_all_say_nan_are_one_save(tmp_path):
    """Every stage's step NaN: the files agree (before: NaN != NaN, so each file was named as
    "saved at global step nan, the other files at global step nan", the usual one included)."""
    ckpt = _global_steps(tmp_path, {f"mp_rank_0{s}_model_states.pt": float("nan") for s in (0, 1)})
    assert not [f for f in ckpt.findings if f.code == "step-mismatch"]
    assert not ckpt.errors


# ---------------------------------------------------------------------- param_shapes cut short
def _refused_even_with_salvage(ckpt) -> None:
    for salvage in (False, True):
        with pytest.raises(NotMergeable):
            plan_merge(ckpt, salvage=salvage)


def _refused_by_one_unlocated_error(ckpt, code: str, message: str) -> None:
    """One `code` finding, an error located nowhere (which module name is the param's own is
    unknown), so neither the merge nor --salvage writes anything."""
    found = [f for f in ckpt.findings if f.code == code]
    assert [(f.severity, f.message, f.param, f.file) for f in found] == [
        ("error", message, None, None)]
    _refused_even_with_salvage(ckpt)


@pytest.mark.parametrize("shapes", [[], None, "first two"], ids=["empty", "none", "first-two"])
@pytest.mark.parametrize("name", ["s2_w2_bf16", "s1_w2_bf16_bf16opt"])
def test_param_shapes_cut_short_refuse_the_merge(tmp_path, name, shapes):
    """A ZeRO-1/2 model-states file whose param_shapes lost groups (every CRC valid): the names
    of those groups, in the module alone, passed for frozen params saved in 16 bits, validate
    said ok and the merge wrote their bf16 copies for the fp32 masters. Now one error names the
    undescribed groups, and neither the merge nor --salvage (which cannot tell those names from
    frozen ones) writes anything."""
    root = D.copy_root(tmp_path, name)
    path = next(root.glob("*/" + D.MODEL))
    state = torch_load(path)
    state["param_shapes"] = state["param_shapes"][:2] if shapes == "first two" else shapes
    torch.save(state, path)
    ckpt = open_checkpoint(root)
    described = 2 if shapes == "first two" else 0
    found = [f for f in ckpt.findings if f.code == "group-coverage"]
    assert [f.message for f in found] == [
        f"the optimizer files partition 3 flat groups, the model states' param_shapes describes "
        f"{described}: the fp32 masters of group{' 2' if described else 's 0..2'} belong to no param"]
    assert ckpt.errors
    _refused_even_with_salvage(ckpt)


@pytest.mark.parametrize("name", ["s2_w2_bf16", "s1_w2_bf16_bf16opt"])
def test_a_param_renamed_in_param_shapes_refuses_the_merge(tmp_path, name):
    """encoder.cube renamed in param_shapes (the module keeps its name): the masters went out
    under the new name and encoder.cube, in the module alone, passed for a frozen param, its
    bf16 copy written (a warning only, merge exit 0). Now an error; located nowhere, as which
    module name is the param's own is unknown, so --salvage refuses too."""
    from collections import OrderedDict

    root = D.copy_root(tmp_path, name)
    path = next(root.glob("*/" + D.MODEL))
    state = torch_load(path)
    state["param_shapes"][0] = OrderedDict(("renamed.weight" if n == "encoder.cube" else n, s)
                                           for n, s in state["param_shapes"][0].items())
    torch.save(state, path)
    ckpt = open_checkpoint(root)
    _refused_by_one_unlocated_error(
        ckpt, "shape-mismatch", "renamed.weight: param_shapes says (3, 5, 7), its 16-bit weight "
        "in the module is missing")


@pytest.mark.parametrize("name", ["s2_w2_bf16", "s3_w2_bf16_plain"])
def test_a_param_listed_as_a_buffer_refuses_the_merge(tmp_path, name):
    """encoder.cube added to buffer_names (torch never has a buffer and a param of one name):
    at ZeRO-2 the param was dropped and its bf16 module copy written as a buffer in its place
    (a slice-mapping warning only, merge exit 0). Now an error, located nowhere so --salvage
    (which writes buffers) refuses too; ZeRO-3 names the cause as well."""
    root = D.copy_root(tmp_path, name)
    for path in root.glob("*/*model_states.pt"):
        state = torch_load(path)
        if "buffer_names" in state:
            state["buffer_names"] = [*state["buffer_names"], "encoder.cube"]
            torch.save(state, path)
    ckpt = open_checkpoint(root)
    _refused_by_one_unlocated_error(
        ckpt, "duplicate-param", "encoder.cube is a param of group 0 and a buffer "
        "(buffer_names): its module copy would be written in place of its masters")


@pytest.mark.parametrize("declared", [(15, 14), (14, 15), (225,)])
def test_a_frozen_shape_the_module_disagrees_with_is_an_error(tmp_path, declared):
    """frozen_param_shapes of encoder.frozen_proj.weight (15, 15) forged to fewer elements or
    another shape: the merge wrote the first elements of its module weight in that shape, exit 0
    and validate ok. Now a shape-mismatch naming the param: the merge refuses, --salvage drops it."""
    root = D.copy_root(tmp_path, "s2_w2_bf16")
    path = next(root.glob("*/" + D.MODEL))
    state = torch_load(path)
    state["frozen_param_shapes"]["encoder.frozen_proj.weight"] = torch.Size(declared)
    torch.save(state, path)
    ckpt = open_checkpoint(root)
    found = [f for f in ckpt.findings if f.code == "shape-mismatch"]
    assert [(f.severity, f.param, f.message) for f in found] == [
        ("error", "encoder.frozen_proj.weight", f"encoder.frozen_proj.weight: frozen_param_shapes "
         f"says ({', '.join(map(str, declared))}), its 16-bit weight in the module is (15, 15)")]
    with pytest.raises(NotMergeable):
        plan_merge(ckpt)
    assert "encoder.frozen_proj.weight" in plan_merge(ckpt, salvage=True).dropped


# ---------------------------------------------------------------------- world size by majority
def _forged_ranks(tmp_path, counts: dict[int, int]):
    root = D.copy_root(tmp_path, "s2_w3_fp32_rr")
    for rank, value in counts.items():
        D.forge_partition_count(next(root.glob("*/" + D.optim_name(rank))), value)
    return open_checkpoint(root)


@pytest.mark.parametrize("size", [0, -1])
def test_a_world_size_of_zero_or_less_names_the_axis_each_file_is_outside_of(tmp_path, size):
    """Every file's partition_count forged to 0 (or -1): every file is stale, and each message
    says where it is (before: rank 0's read "it is at , outside this checkpoint's ")."""
    ckpt = _forged_ranks(tmp_path, {0: size, 1: size, 2: size})
    assert ckpt.world_size == size
    stale = sorted((f.rank, f.message.split(": ", 1)[1]) for f in ckpt.findings
                   if f.code == "stale-rank-file")
    assert stale == [(r, f"it is at dp rank {r}, outside this checkpoint's {size} dp ranks")
                     for r in range(3)]
    assert any(f.code == "world-size-mismatch" for f in ckpt.findings)


@pytest.mark.parametrize("counts", [{0: 10**7, 1: 10**7}, {0: 10**7, 1: 5, 2: 9}, {1: 2**70, 2: 2**70}],
                         ids=["two-of-three", "all-differ", "beyond-int64"])
def test_a_forged_majority_costs_a_bounded_handful_of_findings(tmp_path, counts):
    """Two of three files forged alike (the majority: the real file is the odd one out), or all
    three forged differently (a tie: the lowest readable rank's), a size beyond int64: the world
    size is the forged one, the missing ranks are named up to SHOWN and counted, the rest bounded."""
    ckpt = _forged_ranks(tmp_path, counts)
    majority = max(counts.values(), key=list(counts.values()).count)
    assert ckpt.world_size == (counts[0] if len(set(counts.values())) == 3 else majority)
    odd = sorted(f.rank for f in ckpt.findings if f.code == "world-size-mismatch" and f.file)
    assert odd == sorted(set(range(3)) - {r for r, v in counts.items() if v == ckpt.world_size})
    missing = [f for f in ckpt.findings if f.code == "missing-optimizer-file"]
    assert len(missing) == 17 and " more optimizer files are missing " in missing[-1].message
    assert len(ckpt.findings) < 40 and ckpt.errors


# ---------------------------------------------------------------------- ZeRO-3 params in bulk
def _usual_inputs(monkeypatch):
    ctx, names, shared = _build_inputs(monkeypatch, "s3_w2_bf16_plain")
    assert common._usual_zero3(names) is not None
    return ctx, names, shared


def _module_with(names, extra: dict):
    return replace(names, module={**names.module, **extra})


def _changes(names):
    """name -> the usual model states changed one way a forged file could."""
    groups, first = names.flat_groups, names.flat_groups[0][0][0]
    ref = names.module[first]
    return {
        "an int key in the module": _module_with(names, {7: ref}),
        "a param also a buffer": replace(names, buffer_names=[*names.buffer_names, first]),
        "a name in two groups": replace(names, flat_groups=[*groups, [groups[0][0]]]),
        "a name twice in a group": replace(names, flat_groups=[[*groups[0], groups[0][0]], *groups[1:]]),
        "a scalar shape": replace(names, flat_groups=[[(first, ())], *[g[1:] if i == 0 else g
                                                                      for i, g in enumerate(groups)]]),
        "no valid shape": replace(names, flat_groups=[[(first, None), *groups[0][1:]], *groups[1:]]),
        "a module value not a tensor": _module_with(names, {first: None}),
        "a module name not in any group": _module_with(names, {"stray.weight": ref}),
        "a group name not in the module": replace(names, flat_groups=[[*groups[0], ("ghost", (3,))],
                                                                      *groups[1:]]),
        "a frozen name": replace(names, frozen_shapes={"frozen.w": (2,)}),
        "an empty module": replace(names, module={}),
    }


@pytest.mark.parametrize("change", ["an int key in the module", "a param also a buffer",
                                    "a name in two groups", "a name twice in a group", "a scalar shape",
                                    "no valid shape", "a module value not a tensor",
                                    "a module name not in any group", "a group name not in the module",
                                    "a frozen name", "an empty module"])
def test_odd_model_states_get_the_name_by_name_verdict(monkeypatch, change):
    """The real usual ZeRO-3 model states changed one way: `_build_params` gives the same Params
    (same order) and findings whether or not `_usual_zero3` may take it in bulk, and only the
    unchanged-in-kind case (a module value that is no tensor: dtype left to settle) is taken."""
    ctx, names, shared = _usual_inputs(monkeypatch)
    odd = _changes(names)[change]
    bulk = common._usual_zero3(odd)
    assert (bulk is not None) == (change == "a module value not a tensor")
    fast, slow = (_built(monkeypatch, ctx, odd, shared, b) for b in (True, False))
    assert fast == slow
    if bulk is not None:
        first = names.flat_groups[0][0][0]
        assert dict(fast[0])[first].dtype == "" and isinstance(names.module[first], TensorRef)


# ---------------------------------------------------------------------- info --json rows
_ODD_NAMES = ['q"uote', "back\\slash", "ctl\x00\x1f\x7f", "\u2028\u2029", "lone\ud800", "\udfff\ud800",
              "emoji😀", "é", "", "x" * 100_000, "\\u0000", "</script>"]


def test_info_rows_of_hostile_values_are_what_json_dumps_writes():
    """Names with quotes, backslashes, control chars, separators, lone surrogates, non-BMP and a
    100k-char name; dtype None and odd; groups and sub-groups beyond 2**63 and negative; shapes
    of 2**80 elements, 64 dims and none: the row writer's text is json.dumps's, byte for byte."""
    from conftest import tag_dir

    ckpt = open_checkpoint(tag_dir("s3_w2_bf16_plain"))
    shapes = [(), (0,), (2**40, 2**40), (1,) * 64, (3, 4)]
    values = [None, "", 'we"ird', "float32", "bfloat16"]
    big = [None, 0, 2**63, 2**64 + 1, -1, 10**30]
    ckpt.params = {}
    for i in range(60):
        name = _ODD_NAMES[i % len(_ODD_NAMES)] + str(i)
        ckpt.params[name] = Param(name, shapes[i % 5], values[i % 5], i % 7 == 0, big[i % 6],
                                  big[(i + 3) % 6], [None, 'ti"ed', "\ud800", None][i % 4])
    out = io.StringIO()
    write_info_json(ckpt, out)
    assert out.getvalue() == json.dumps(info_json(ckpt), default=str)
    assert '"numel": 1208925819614629174706176' in out.getvalue()


# ---------------------------------------------------------------------- the lean Param
def test_a_lean_param_copies_pickles_and_never_shares_a_container_it_made():
    """Containers made on first read belong to that param alone; copy, deepcopy and pickle give
    equal params (the dataclass's behaviour), a param stays unhashable."""
    a, b = Param("a", (2, 3), "float32"), Param("a", (2, 3), "float32")
    assert a == b and a.fragments is not b.fragments and a.shards is not b.shards \
        and a.copies is not b.copies
    a.fragments.append("f")
    assert a != b and b.fragments == []
    for other in (copy.copy(a), copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert other == a and repr(other) == repr(a)
    with pytest.raises(TypeError):
        hash(a)
