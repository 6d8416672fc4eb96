"""`zinspect diff`: a checkpoint equals its own merge; a twin, a planted change, renamed, reshaped
and retyped tensors are found and located; exit codes 0/1/2."""

from __future__ import annotations

import json
import struct
import threading

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import save_file

from zinspect.cli import main
from zinspect.core.diff import diff_tensors
from zinspect.core.sources import open_source
from zinspect.errors import MergeCancelled

CKPT = FIXTURES / "s2_w2_fp32_plain"
TWIN = FIXTURES / "s2_w1_fp32"  # the same model and seed, trained at world size 1


def _diff(a, b, **kw):
    return diff_tensors(open_source(a).tensors, open_source(b).tensors, **kw)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The fixture merged to fp32 safetensors, sharded (a folder with an index)."""
    out = tmp_path_factory.mktemp("diff") / "merged"
    assert main(["merge", str(CKPT), str(out), "--max-shard-size", "8KB"]) == 0
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    return out


@pytest.mark.parametrize("name", ["s2_w2_fp32_plain", "s3_w4_bf16", "s3_w3_fp16_sub"])
def test_checkpoint_equals_its_reference(name):
    r = _diff(FIXTURES / name, FIXTURES / name / "reference_fp32.pt")
    assert r.equal and r.params and all(p.identical for p in r.params)


def test_checkpoint_equals_its_sharded_merge(merged, capsys):
    r = _diff(CKPT, merged)
    assert r.equal and not r.only_a and not r.only_b and all(p.identical for p in r.params)
    assert main(["diff", str(CKPT), str(merged)]) == 0
    assert "EQUAL" in capsys.readouterr().out


def test_twin_at_another_world_size_names_what_differs(capsys):
    ref_a = torch.load(CKPT / "reference_fp32.pt")
    ref_b = torch.load(TWIN / "reference_fp32.pt")
    expect = {n for n in ref_a if n in ref_b and not torch.equal(ref_a[n], ref_b[n])}
    assert expect  # the twins did train apart
    r = _diff(CKPT, TWIN)
    assert {p.name for p in r.params if not p.within} == expect
    for p in r.params:
        if p.name in expect:
            d = (ref_a[p.name].double() - ref_b[p.name].double())
            assert p.max_abs == pytest.approx(d.abs().max().item(), rel=1e-12)
            assert p.rel_l2 == pytest.approx((d.norm() / ref_a[p.name].double().norm()).item(),
                                             rel=1e-9)
    changes = [p.rel_l2 for p in r.params]
    assert changes == sorted(changes, reverse=True)  # most changed first
    assert main(["diff", str(CKPT), str(TWIN), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["equal"] is False and {p["name"] for p in out["params"] if not p["within_tolerance"]} == expect


def test_a_planted_change_of_one_element_is_found_and_located(merged, tmp_path):
    ref = torch.load(CKPT / "reference_fp32.pt")
    sd = {k: v.clone() for k, v in ref.items()}
    sd["encoder.cube"][2, 3, 4] += 1e-6  # encoder.cube is 3x5x7
    save_file(sd, tmp_path / "m.safetensors")
    r = _diff(merged, tmp_path / "m.safetensors")
    assert not r.equal
    (p,) = [p for p in r.params if not p.within]
    assert p.name == "encoder.cube" and p.differing == 1 and p.to_json()["first_position"] == [2, 3, 4]
    assert p.max_abs == pytest.approx(1e-6, rel=0.1)
    assert r.params[0] is p  # sorted by change
    # within a tolerance it is equal
    assert _diff(merged, tmp_path / "m.safetensors", atol=1e-5).equal
    assert main(["diff", str(merged), str(tmp_path / "m.safetensors"), "--atol", "1e-5"]) == 0
    assert main(["diff", str(merged), str(tmp_path / "m.safetensors")]) == 1


def test_bit_identity_sees_signed_zero(tmp_path):
    save_file({"w": torch.zeros(4)}, tmp_path / "a.safetensors")
    save_file({"w": torch.tensor([0.0, -0.0, 0.0, 0.0])}, tmp_path / "b.safetensors")
    r = _diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert not r.equal and r.params[0].first_index == 1
    assert _diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rtol=1e-9).equal


def test_names_shapes_dtypes_and_prefix_map(tmp_path, capsys):
    ref = torch.load(CKPT / "reference_fp32.pt")
    sd = {"base_model.model." + k: v.clone() for k, v in ref.items() if k != "head.bias"}
    sd["base_model.model.extra"] = torch.ones(3)
    sd["base_model.model.encoder.cube"] = sd["base_model.model.encoder.cube"].reshape(5, 3, 7).contiguous()
    sd["base_model.model.embed.weight"] = sd["base_model.model.embed.weight"].double()
    torch.save(sd, tmp_path / "peft.bin")
    r = _diff(tmp_path / "peft.bin", CKPT / "reference_fp32.pt", prefix_map=[("base_model.model.", "")])
    out = r.to_json()
    assert out["only_a"] == ["base_model.model.extra"] and out["only_b"] == ["head.bias"]
    assert out["shape_mismatch"] == ["encoder.cube"] and out["dtype_mismatch"] == ["embed.weight"]
    emb = next(p for p in r.params if p.name == "embed.weight")
    assert not emb.identical and emb.within and emb.max_abs == 0  # same values, in fp64
    assert not r.equal
    assert _diff(tmp_path / "peft.bin", CKPT / "reference_fp32.pt").only_b  # no map: nothing matches
    assert main(["diff", str(tmp_path / "peft.bin"), str(CKPT / "reference_fp32.pt"),
                 "--map-prefix", "base_model.model.="]) == 1
    text = capsys.readouterr().out
    assert "only in A: base_model.model.extra" in text and "only in B: head.bias" in text
    assert "shape     encoder.cube: [5, 3, 7] vs [3, 5, 7]" in text


@pytest.mark.parametrize("args", [["/nonexistent"], ["--map-prefix", "nope"], ["--atol", "-1"]])
def test_bad_input_exits_2(args, capsys):
    other = args[0] if args[0].startswith("/") else str(CKPT)
    assert main(["diff", str(CKPT), other, *args[1:]]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_not_a_state_dict_exits_2(tmp_path, capsys):
    torch.save([1, 2, 3], tmp_path / "x.pt")
    assert main(["diff", str(CKPT), str(tmp_path / "x.pt")]) == 2
    assert "holds no state dict" in capsys.readouterr().err
    (tmp_path / "t.safetensors").write_bytes(struct.pack("<Q", 10**9))
    assert main(["diff", str(CKPT), str(tmp_path / "t.safetensors")]) == 2


def test_cancel():
    with pytest.raises(MergeCancelled, match="diff was cancelled"):
        _diff(CKPT, TWIN, should_stop=lambda: True)


def test_a_checkpoint_that_cannot_be_rebuilt_is_bad_input(tmp_path, capsys):
    from conftest import copy_fixture

    tag = copy_fixture(tmp_path, "s2_w2_fp32_plain")
    next(tag.glob("zero_pp_rank_1_*optim_states.pt")).unlink()
    assert main(["diff", str(tag), str(CKPT)]) == 2  # not 1: that means "different"
    assert main(["stats", str(tag)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_next_window_is_read_while_this_one_is_compared(monkeypatch):
    """Reads overlap the comparison: while window 0 is compared, both sides have already read
    window 1 (the diff that waited on each window's reads would wait here in vain)."""
    from zinspect.core import diff, diff_windows

    monkeypatch.setattr(diff_windows, "WINDOW", 4096)
    read = {}  # side -> windows handed over
    ahead = threading.Event()
    real_put, real_compare = diff_windows.Side._put, diff.same_bytes

    def put(side, item):
        real_put(side, item)
        read[id(side)] = read.get(id(side), 0) + 1
        if len(read) == 2 and min(read.values()) >= 2:
            ahead.set()

    compared = []

    def compare(*args):
        if not compared:
            compared.append(ahead.wait(10))
        return real_compare(*args)

    monkeypatch.setattr(diff_windows.Side, "_put", put)
    monkeypatch.setattr(diff, "same_bytes", compare)  # a window's comparison starts with it
    r = _diff(CKPT, CKPT / "reference_fp32.pt")
    assert compared == [True]
    assert r.equal and all(p.identical for p in r.params)


def test_nan_and_inf_are_counted_and_reported_as_stats_reports_them(merged, tmp_path, capsys):
    from zinspect.core.stats import compute_stats, nonfinite_findings

    ref = torch.load(CKPT / "reference_fp32.pt")
    sd = {k: v.clone() for k, v in ref.items()}
    sd["encoder.cube"][0, 0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    save_file(sd, tmp_path / "bad.safetensors")
    r = _diff(merged, tmp_path / "bad.safetensors")
    p = next(p for p in r.params if p.name == "encoder.cube")
    assert (p.nan_a, p.inf_a, p.nan_b, p.inf_b) == (0, 0, 1, 2)
    assert p.differing == 3 and p.max_abs == float("inf")
    stats = nonfinite_findings(compute_stats(open_source(tmp_path / "bad.safetensors").tensors))
    found = r.findings()
    assert [(f.code, f.param) for f in found] == [(f.code, f.param) for f in stats]
    assert [f.message for f in found] == [f.message + " in B" for f in stats]
    assert main(["diff", str(merged), str(tmp_path / "bad.safetensors"), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [f["code"] for f in out["findings"]] == ["nan-values", "inf-values"]
    assert main(["stats", str(tmp_path / "bad.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["findings"] == \
        [dict(f, message=f["message"].removesuffix(" in B")) for f in out["findings"]]


def test_a_bf16_output_equals_its_checkpoint_within_a_tolerance(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["merge", str(CKPT), str(out), "--dtype", "bf16"]) == 0
    capsys.readouterr()
    exact = _diff(CKPT, out)
    assert not exact.equal  # bit-identity: other dtype, other bits
    assert {p.name for p in exact.params if p.dtype_a != p.dtype_b}
    r = _diff(CKPT, out, rtol=2 ** -8)  # bf16 keeps 8 significant bits: rounding is within
    assert r.equal, [p.name for p in r.params if not p.within]
    assert main(["diff", str(CKPT), str(out), "--rtol", "4e-3"]) == 0
    assert main(["diff", str(CKPT), str(out)]) == 1


@pytest.mark.parametrize("window", [4096, None])  # several windows a tensor / one window for all
def test_nan_and_inf_in_bytes_identical_on_both_sides_are_counted_on_both(tmp_path, monkeypatch,
                                                                          window):
    """B's NaN/Inf are taken from A's count where the bytes are the same (whole windows, or one
    tensor of a window that differs elsewhere): still counted and reported on both sides."""
    from zinspect.core import diff_windows
    from zinspect.core.stats import compute_stats, nonfinite_findings

    if window:
        monkeypatch.setattr(diff_windows, "WINDOW", window)
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(3000, generator=g), "b": torch.randn(10, 10, generator=g),
          "c": torch.randn(50, generator=g)}
    sd["a"][[10, 2900]] = torch.tensor([float("inf"), float("-inf")])
    sd["a"][5] = sd["b"][0, 3] = float("nan")
    save_file(sd, tmp_path / "a.safetensors")
    sd["c"][7] += 1  # "b" and "c" share B's last window: it is not identical, "b" is
    save_file(sd, tmp_path / "b.safetensors")
    r = _diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    got = {p.name: (p.nan_a, p.inf_a, p.nan_b, p.inf_b, p.identical) for p in r.params}
    assert got == {"a": (1, 2, 1, 2, True), "b": (1, 0, 1, 0, True), "c": (0, 0, 0, 0, False)}
    (c,) = [p for p in r.params if not p.within]
    assert c.name == "c" and c.differing == 1 and c.first_index == 7 and c.max_abs == 1.0
    stats = nonfinite_findings(compute_stats(open_source(tmp_path / "b.safetensors").tensors))
    assert [f.message for f in r.findings()] == [f.message + side for name in ("a", "b")
                                                 for side in (" in A", " in B")
                                                 for f in stats if f.param == name]
    # ||a||^2 is still summed over the finite values only
    a = sd["a"].double()
    assert next(p for p in r.params if p.name == "a").a_sq == pytest.approx(
        a[a.isfinite()].square().sum().item(), rel=1e-12)


def test_one_ulp_in_one_window_of_a_large_tensor_is_found_and_located(tmp_path, monkeypatch):
    """Every other window is bit-identical (one memcmp each): the one that is not is compared
    element by element, and the element is located in the full tensor."""
    from zinspect.core import diff_windows

    monkeypatch.setattr(diff_windows, "WINDOW", 1 << 20)  # 262144 fp32 values a window: 3 windows
    w = torch.randn(768, 1024, generator=torch.Generator().manual_seed(1))
    save_file({"w": w}, tmp_path / "a.safetensors")
    v = w.clone()
    v.view(torch.int32)[511, 1023] ^= 1  # the last element of the second window, lowest bit
    save_file({"w": v}, tmp_path / "b.safetensors")
    r = _diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    (p,) = r.params
    assert not r.equal and p.differing == 1 and p.to_json()["first_position"] == [511, 1023]
    d = (w.double() - v.double()).abs()
    assert p.max_abs == d.max().item() > 0
    assert p.rel_l2 == pytest.approx((d.norm() / w.double().norm()).item(), rel=1e-9)
    assert _diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rtol=1e-6).equal


def test_nan_and_inf_at_the_same_places_are_not_differences(tmp_path):
    """A window with NaN/Inf takes the masked comparison (not the all-finite one): NaN against
    NaN and Inf against Inf are equal, the one real change is found and measured finitely."""
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0, float("-inf")], dtype=torch.float64)
    b = a.clone()
    b[3] += 1e-9
    save_file({"w": a}, tmp_path / "a.safetensors")
    save_file({"w": b}, tmp_path / "b.safetensors")
    (p,) = _diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").params
    assert (p.differing, p.first_index, p.nan_a, p.inf_a, p.nan_b, p.inf_b) == (1, 3, 1, 2, 1, 2)
    assert p.max_abs == pytest.approx(1e-9, rel=1e-6)
    assert _diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rtol=1e-6).equal
    assert not _diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rtol=1e-12).equal
