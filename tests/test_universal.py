"""The universal checkpoint writer (`zinspect.core.universal`, `merge --format universal`).

- every tensor written equals what DeepSpeed's own ds_to_universal wrote for the same checkpoint
  (committed in tests/fixtures/universal/) and the fixture's reference_fp32.pt, bit for bit;
- the tree is DeepSpeed's (its files are all there; latest_universal names the tag);
- real DeepSpeed engines load it with "checkpoint": {"load_universal": true} at another world
  size, hold the source's masters and moments, and train a step; frozen params are not restored
  (DeepSpeed's universal load skips the module state, as the help says).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, manifest
from test_reshard import ds_resume, needs_deepspeed

from zinspect.core import open_checkpoint
from zinspect.core.universal import HELP_NOTE, write_universal
from zinspect.errors import MergeCancelled, NotMergeable, OutputError

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent / "ds_resume"))
from expected import STUB_PICKLE, expected_states  # noqa: E402

UNIVERSAL = FIXTURES / "universal"
CONVERTED = ["s2_w2_bf16", "s3_w2_fp32"]  # ds_to_universal outputs committed for these


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=STUB_PICKLE)


def _param(obj):
    return obj["param"] if isinstance(obj, dict) else obj


@pytest.fixture(scope="module", params=CONVERTED)
def converted(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name) / "uni"
    result = write_universal(open_checkpoint(FIXTURES / name), out)
    return name, out, result


def test_tree_and_latest(converted):
    name, out, result = converted
    theirs = UNIVERSAL / name
    assert (out / "latest_universal").read_text() == (theirs / "latest_universal").read_text()
    tag = result.tag
    ours = {str(p.relative_to(out / tag)) for p in (out / tag).rglob("*") if p.is_file()}
    wanted = {str(p.relative_to(theirs / tag)) for p in (theirs / tag).rglob("*") if p.is_file()}
    assert wanted <= ours, sorted(wanted - ours)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert HELP_NOTE in result.notes and not result.unverified and result.verified


def test_every_tensor_equals_deepspeeds_and_the_reference(converted):
    name, out, result = converted
    theirs = UNIVERSAL / name / result.tag / "zero"
    ours = out / result.tag / "zero"
    ref = torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)
    tied = manifest(name)["tied"]
    compared = 0
    for p in sorted(theirs.rglob("*.pt")):
        rel = p.relative_to(theirs)
        if rel.name == "optimizer_state.pt":
            continue
        a, b = _load(ours / rel), _load(p)
        if rel.name == "step.pt":
            assert torch.equal(a, b), rel
            continue
        mine, ds = _param(a), _param(b)
        param = rel.parent.name
        if isinstance(b, dict) and "cat_dim" in b:
            assert a["cat_dim"] == b["cat_dim"], rel
        assert mine.numel() == ds.numel(), rel
        if param in tied and rel.name == "fp32.pt":
            # ds_to_universal writes an alias from the 16-bit module copy, we its fp32 master
            assert torch.equal(mine, ref[param]), rel
            continue
        # DeepSpeed casts int buffers to float; ZeRO-3's files are flat in DeepSpeed's output
        assert torch.equal(mine.reshape(-1).to(ds.dtype), ds.reshape(-1)), rel
        compared += 1
    assert compared >= 3 * 20
    for key, t in ref.items():  # every param and buffer, at its full shape, bit for bit
        got = _param(_load(ours / key / "fp32.pt"))
        assert got.shape == t.shape and torch.equal(got, t), key


def test_moments_and_step_are_the_checkpoints(converted):
    name, out, result = converted
    want = expected_states(str(FIXTURES / name / manifest(name)["tag"]))
    for pname, states in want.items():
        for state, t in states.items():
            got = _load(out / result.tag / "zero" / pname / f"{state}.pt")
            assert got["cat_dim"] == 0 and torch.equal(got["param"].reshape(-1), t), (pname, state)
        step = _load(out / result.tag / "zero" / pname / "step.pt")
        assert int(step) == manifest(name)["global_steps"]


def test_optimizer_state_keeps_the_hyper_parameters(converted):
    name, out, result = converted
    ours = _load(out / result.tag / "zero" / "optimizer_state.pt")
    theirs = _load(UNIVERSAL / name / result.tag / "zero" / "optimizer_state.pt")
    assert ours["param_groups"] == theirs["param_groups"]
    for key in ("zero_stage", "partition_count", "group_paddings", "ds_version", "clip_grad",
                "dynamic_loss_scale", "overflow"):
        assert ours.get(key) == theirs.get(key), key
    if "optimizer_state_dict" in theirs:  # ZeRO-3: its loader reads the step and groups here
        assert ours["optimizer_state_dict"]["param_groups"] == \
            theirs["optimizer_state_dict"]["param_groups"]
        assert torch.equal(ours["optimizer_state_dict"]["state"][0]["step"],
                           theirs["optimizer_state_dict"]["state"][0]["step"])


def test_refusals_leave_nothing(tmp_path):
    # no DeepSpeed engine reads a ZeRO-0 run's universal checkpoint: refused, saying why
    with pytest.raises(NotMergeable, match=r"a ZeRO-0 checkpoint cannot be converted .* only through "
                       r"a ZeRO optimizer \(deepspeed/runtime/engine.py"):
        write_universal(open_checkpoint(FIXTURES / "parallel" / "z0_fp32"), tmp_path / "a")
    ckpt = open_checkpoint(FIXTURES / "s2_w2_bf16")
    with pytest.raises(MergeCancelled):
        write_universal(ckpt, tmp_path / "b", should_stop=lambda: True)
    assert not os.listdir(tmp_path / "b") if (tmp_path / "b").exists() else True
    write_universal(ckpt, tmp_path / "c")
    with pytest.raises(OutputError):
        write_universal(ckpt, tmp_path / "c")
    write_universal(ckpt, tmp_path / "c", force=True)
    assert (tmp_path / "c" / "latest_universal").read_text() == "global_step2_universal"


@pytest.mark.parametrize("name,why", [
    ("optim/sgd_s2_w2_fp32", r"group 0's optimizer state holds momentum_buffer: only Adam/AdamW "
                             r"states .* are written to a universal checkpoint"),
    ("tp_extra/tp2_dp2_s0_toy", r"a ZeRO-0 tensor-parallel checkpoint cannot be converted to a "
                                r"universal checkpoint: DeepSpeed reads"),
    ("parallel/moe_ep2_w2_s0_bf16", r"a ZeRO-0 MoE checkpoint cannot be converted")])
def test_what_no_engine_would_load_is_refused_saying_why(tmp_path, name, why):
    with pytest.raises(NotMergeable, match=why):
        write_universal(open_checkpoint(FIXTURES / name), tmp_path / "u")
    assert not (tmp_path / "u").exists() or not os.listdir(tmp_path / "u")


@needs_deepspeed
@pytest.mark.parametrize("name,n", [("s2_w2_bf16", 3), ("s3_w2_fp32", 1)])
def test_deepspeed_loads_it_at_another_world_size(tmp_path, name, n):
    out = tmp_path / "uni"
    write_universal(open_checkpoint(FIXTURES / name), out)
    res = ds_resume(tmp_path, name, out, n, universal=True)
    assert res["loaded"] and res["global_steps"] == manifest(name)["global_steps"]
    assert res["compared"] > 60 and res["mismatches"] == [] and res["missing"] == []
    # DeepSpeed's universal load skips the module state: frozen params keep their new values
    assert res["frozen_restored"] == [] and res["frozen_differ"] == manifest(name)["frozen"]
    assert res["loss_finite"] and res["steps_after"] == res["global_steps"] + 1


# ------------------------------------------------------------------ universal checkpoints as input
@pytest.mark.parametrize("made_by", ["deepspeed", "zinspect"])
@pytest.mark.parametrize("name", CONVERTED)
def test_a_universal_checkpoint_is_read_validated_and_merged(tmp_path, name, made_by):
    import zinspect

    path = UNIVERSAL / name
    if made_by == "zinspect":
        path = tmp_path / "uni"
        write_universal(open_checkpoint(FIXTURES / name), path)
    ckpt = open_checkpoint(path)
    assert ckpt.layout == "universal" and ckpt.stage == manifest(name)["stage"]
    assert not ckpt.errors, [f.message for f in ckpt.errors]
    assert ckpt.states == ["fp32", "exp_avg", "exp_avg_sq"]
    ref = torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)
    merged = zinspect.get_fp32_state_dict(path)
    assert merged.keys() == ref.keys()
    for key, t in ref.items():
        assert merged[key].dtype == t.dtype and torch.equal(merged[key], t), key
    want = expected_states(str(FIXTURES / name / manifest(name)["tag"]))
    for pname, states in want.items():
        for state in ("exp_avg", "exp_avg_sq"):
            (frag,) = ckpt.state_fragments(pname, state)
            with open(ckpt.path / frag.file, "rb") as f:
                f.seek(frag.offset)
                got = torch.frombuffer(bytearray(f.read(frag.nbytes)), dtype=torch.float32)
            assert torch.equal(got, states[state]), (pname, state)


def test_a_universal_param_file_missing_is_named(tmp_path):
    import shutil

    shutil.copytree(UNIVERSAL / "s2_w2_bf16", tmp_path / "u")
    (tmp_path / "u" / "global_step2_universal" / "zero" / "embed.weight" / "fp32.pt").unlink()
    ckpt = open_checkpoint(tmp_path / "u")
    assert [(f.code, f.param) for f in ckpt.errors] == [("universal-state-missing", "embed.weight")]
    with pytest.raises(NotMergeable):
        from zinspect.core.plan import plan_merge

        plan_merge(ckpt)
