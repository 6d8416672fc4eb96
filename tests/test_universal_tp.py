"""The universal writer on tensor-parallel (AutoTP) checkpoints (`merge --format universal`).

Every file DeepSpeed 0.19.8's own ds_to_universal.py writes for a tp2 x dp2 checkpoint is
written, with the same keys in the same order ({'param'} where the model states' affine map
places the param, 'vocab_tensor': True for a vocabulary param, padding trimmed) and the same
tensors bit for bit; the fp32 files equal the fixture's reference_fp32.pt. DeepSpeed's output
for the tied Llama is committed (tests/fixtures/universal/tp2_dp2_s2_llama_bf16_tied, zero/ only:
its model-states files are the fixture's own); for the toy ZeRO-1/2/3 ones the converter is run
when ZINSPECT_DS_PYTHON is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

from zinspect.core import open_checkpoint
from zinspect.core.universal import write_universal
from zinspect.errors import NotMergeable

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent / "ds_resume"))
from expected import STUB_PICKLE, same_pickled  # noqa: E402

PARALLEL = FIXTURES / "parallel"
COMMITTED = "tp2_dp2_s2_llama_bf16_tied"
TOYS = ["tp2_dp2_s1_toy", "tp2_dp2_s2_toy", "tp2_dp2_s3_toy"]
#: tests/fixtures/tp_extra/: uneven 13/12 sub-param widths and dim-1 split; tp 4 with a 63-row
#: vocabulary split 16/16/16/15 (+ tied head); tp 2 x dp 1
EXTRA = ["tp2_dp2_s1_toy_uneven", "tp4_dp1_s1_llama_bf16_tied_vocab63", "tp2_dp1_s1_toy"]
DS_PYTHON = os.environ.get("ZINSPECT_DS_PYTHON")


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=STUB_PICKLE)


def _fixture(name: str) -> Path:
    return PARALLEL / name if name not in EXTRA else FIXTURES / "tp_extra" / name


def _deepspeeds(name: str, tmp: Path) -> Path:
    """DeepSpeed's zero/ folder for fixture `name` (committed, or converted now)."""
    if name == COMMITTED:
        return FIXTURES / "universal" / name / "global_step2_universal" / "zero"
    if not DS_PYTHON:
        pytest.skip("ZINSPECT_DS_PYTHON is not set (a python with deepspeed==0.19.8)")
    tag = (_fixture(name) / "latest").read_text().strip()
    out = tmp / "ds" / f"{tag}_universal"
    subprocess.run([DS_PYTHON, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(_fixture(name) / tag), "--output_folder", str(out),
                    "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True, capture_output=True, timeout=600)
    return out / "zero"


@pytest.mark.parametrize("name", [COMMITTED, *TOYS, *EXTRA])
def test_every_file_equals_deepspeeds_and_the_reference(tmp_path, name):
    theirs = _deepspeeds(name, tmp_path)
    result = write_universal(open_checkpoint(_fixture(name)), tmp_path / "uni")
    assert not result.unverified and result.verified
    tag = tmp_path / "uni" / result.tag
    assert (tmp_path / "uni" / "latest_universal").read_text() == theirs.parent.name == result.tag
    ours = tag / "zero"
    ckpt = open_checkpoint(_fixture(name))
    tied = {n for n, p in ckpt.params.items() if p.tied_to}
    ref = torch.load(_fixture(name) / "reference_fp32.pt", weights_only=True)
    compared = set()
    for p in sorted(theirs.rglob("*.pt")):
        rel = p.relative_to(theirs)
        a, b = _load(ours / rel), _load(p)
        if rel.name == "optimizer_state.pt":
            assert a["param_groups"] == b["param_groups"]
            for key in ("zero_stage", "partition_count", "group_paddings", "ds_version"):
                assert a.get(key) == b.get(key), key
            continue
        if rel.parent.name in tied:  # DeepSpeed writes tp rank 0's 16-bit module shard of an
            assert list(a) == list(b) == ["param"]  # alias; we the full master (the reference)
            assert torch.equal(a["param"], ref[rel.parent.name])
            continue
        same_pickled(a, b, str(rel))
        compared.add(str(rel))
    states = {r.rsplit("/", 1)[1] for r in compared}
    assert {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"} <= states and len(compared) >= 3 * 20
    for key, t in ref.items():  # every param at its full shape (vocab padding trimmed)
        got = _load(ours / key / "fp32.pt")["param"]
        assert got.shape == t.shape and torch.equal(got, t.to(got.dtype)), key
    # every tp rank's model-states files, as the source holds them
    src = sorted(f.name for f in ckpt.files_of("model"))
    assert sorted(f.name for f in tag.glob("*model_states.pt")) == src
    for f in src:
        same_pickled(_load(tag / f), _load(ckpt.path / f), f)


def test_vocab_param_is_trimmed_and_marked(tmp_path):
    result = write_universal(open_checkpoint(PARALLEL / COMMITTED), tmp_path / "uni")
    ours = tmp_path / "uni" / result.tag / "zero" / "model.embed_tokens.weight"
    for state in ("fp32", "exp_avg", "exp_avg_sq"):
        obj = _load(ours / f"{state}.pt")
        assert list(obj) == ["vocab_tensor", "param"] and obj["vocab_tensor"] is True
        assert tuple(obj["param"].shape) == (64, 16)


@pytest.mark.parametrize("name", ["z0_fp32"])  # pipelines: tests/test_universal_pipeline.py
def test_other_parallel_layouts_are_still_refused(tmp_path, name):
    if not (PARALLEL / name).exists():
        pytest.skip(f"no fixture {name}")
    with pytest.raises(NotMergeable, match="cannot be converted"):
        write_universal(open_checkpoint(PARALLEL / name), tmp_path / "u")
    assert not (tmp_path / "u").exists() or not os.listdir(tmp_path / "u")


def test_a_drifted_replica_is_refused_and_nothing_is_written(tmp_path):
    """tp rank 1's fp32 master of a replicated norm 0.25 off at one element (its zip CRC
    updated: bytes as saved): no one universal value exists (ds_to_universal asserts the copies
    are equal), so the conversion refuses, names the param and writes nothing."""
    import shutil
    import struct

    from damage import record_holding, set_crc

    name, norm = "tp2_dp2_s2_toy", "model.norm.weight"
    root = tmp_path / name
    shutil.copytree(PARALLEL / name, root)
    frag = next(f for f in open_checkpoint(root).params[norm].fragments if f.shard == 1)
    path = root / "global_step2" / frag.file
    with open(path, "r+b") as fh:
        fh.seek(frag.offset + 12)
        value = struct.unpack("<f", fh.read(4))[0]
        fh.seek(frag.offset + 12)
        fh.write(struct.pack("<f", value + 0.25))
    set_crc(path, record_holding(path, frag.offset)[0].split("/", 1)[1])
    with pytest.raises(NotMergeable, match=rf"zero/{norm}/fp32.pt: a replicated param differs on "
                       r"tp rank\(s\) \[1\] .*0\.25"):
        write_universal(open_checkpoint(root), tmp_path / "u")
    assert not (tmp_path / "u").exists() or not os.listdir(tmp_path / "u")


def _engine_holds(tmp: Path, ckpt: Path, name: str, world: int) -> dict:
    """{rank: what a real engine at `world` ranks holds after loading universal `ckpt`}."""
    result = tmp / f"held_{ckpt.name}"
    subprocess.run([DS_PYTHON, str(Path(__file__).parent / "ds_resume" / "tp_universal_worker.py"),
                    "--ckpt", str(ckpt), "--manifest", str(PARALLEL / name / "manifest.json"),
                    "--world-size", str(world), "--result", str(result)],
                   check=True, capture_output=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return {r: torch.load(f"{result}.{r}.pt", weights_only=False) for r in range(world)}


@pytest.mark.skipif(not DS_PYTHON, reason="set ZINSPECT_DS_PYTHON to a python with deepspeed==0.19.8")
def test_deepspeed_loads_it_at_another_dp_size_as_it_loads_its_own(tmp_path):
    """The tied Llama saved at tp 2 x dp 2, loaded with load_universal at tp 2 x dp 1 by real
    engines: every rank holds the same fp32 master shards and Adam moments from zinspect's
    universal checkpoint as from DeepSpeed's own ds_to_universal output, and the step; then each
    trains a step from it, with the same finite loss as from DeepSpeed's output."""
    import math
    import shutil

    name = COMMITTED
    theirs = tmp_path / "theirs"
    shutil.copytree(FIXTURES / "universal" / name, theirs)
    for f in (PARALLEL / name / "global_step2").glob("*model_states.pt"):  # what DeepSpeed copies
        shutil.copy(f, theirs / "global_step2_universal" / f.name)
    write_universal(open_checkpoint(PARALLEL / name), tmp_path / "ours")
    ours, want = _engine_holds(tmp_path, tmp_path / "ours", name, 2), _engine_holds(tmp_path, theirs, name, 2)
    ref = torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)
    compared = 0
    for rank, got in ours.items():
        assert (got["tp"], got["dp"], got["global_steps"], got["steps_after"]) == (rank, 0, 2, 3)
        assert math.isfinite(got["loss"]) and got["loss"] == want[rank]["loss"]
        for pname, states in want[rank]["held"].items():
            for state, t in states.items():
                assert t is not None and torch.equal(got["held"][pname][state], t), (rank, pname, state)
                compared += 1
            if pname in ref and ref[pname].shape == states["fp32"].shape:  # replicated: whole
                assert torch.equal(got["held"][pname]["fp32"], ref[pname]), pname
    assert compared == 2 * 3 * len(want[0]["held"]) and compared >= 100


@pytest.mark.parametrize("name", ["tp2_dp2_s1_toy_uneven", "tp4_dp1_s1_llama_bf16_tied_vocab63"])
def test_moments_equal_deepspeeds_without_deepspeed(tmp_path, name):
    """Without a DeepSpeed python: the exp_avg / exp_avg_sq files equal the moments DeepSpeed's
    ds_to_universal wrote for these checkpoints (reference_moments.pt: uneven vocabulary shards,
    uneven sub-param widths, a 13/12 dim-1 split) and fp32 the reference, bit for bit."""
    result = write_universal(open_checkpoint(_fixture(name)), tmp_path / "uni")
    zero = tmp_path / "uni" / result.tag / "zero"
    moments = torch.load(_fixture(name) / "reference_moments.pt", weights_only=True)
    states = {**moments, "fp32": torch.load(_fixture(name) / "reference_fp32.pt", weights_only=True)}
    compared = 0
    for state, want in states.items():
        for key, t in want.items():
            if state != "fp32" or key in moments["exp_avg"]:
                assert torch.equal(_load(zero / key / f"{state}.pt")["param"], t), (state, key)
                compared += 1
    assert compared == 3 * len(moments["exp_avg"]) > 0


@pytest.mark.parametrize("name", ["tp2_dp2_s2_toy_frozen", "tp2_dp2_s3_toy_frozen"])
def test_frozen_tp_shards_are_written_whole(tmp_path, name):
    """Frozen column, row and replicated params of real AutoTP ZeRO-2/3 runs (where
    ds_to_universal.py itself fails: "Unused patterns"): every fp32.pt, frozen ones joined from
    each tp rank's saved shard, equals the reference bit for bit."""
    root = FIXTURES / "tp_extra" / name
    result = write_universal(open_checkpoint(root), tmp_path / "uni")
    zero = tmp_path / "uni" / result.tag / "zero"
    ref = torch.load(root / "reference_fp32.pt", weights_only=True)
    frozen = json.loads((root / "manifest.json").read_text())["frozen"]
    assert frozen and set(frozen) <= set(ref)
    for key, t in ref.items():
        assert torch.equal(_load(zero / key / "fp32.pt")["param"], t), key
