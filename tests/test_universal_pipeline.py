"""The universal writer on pipeline checkpoints (`merge --format universal`, pp x dp, ZeRO-1 and
BF16_Optimizer at ZeRO-1).

- every file DeepSpeed 0.19.8's own ds_to_universal.py writes for the same checkpoint is written,
  equal key by key and bit for bit (the converter is run when ZINSPECT_DS_PYTHON is set); our
  only extra files are the frozen params' and buffers' fp32.pt (from the layer files);
- without DeepSpeed: fp32 = reference_fp32.pt, moments = the source's (expected.py, torch alone),
  the step; a tied param whose stages drifted apart is refused; ZeRO-0 pipelines are refused
  with DeepSpeed's reason (its engine never reads the zero/ tree there);
- real PipelineEngines load it with "checkpoint": {"load_universal": true} at another dp AND
  another pp (pp2 x dp2 -> pp2 x dp1 and pp3 x dp1), hold the source's masters and moments bit
  for bit, and train a step.
"""

from __future__ import annotations

import json
import os
import shutil
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
from expected import STUB_PICKLE, expected_pipeline_states, same_pickled  # noqa: E402

PARALLEL = FIXTURES / "parallel"
CONVERTED = ["pp2_dp2_s1_fp32", "pp2_dp2_s1_bf16_pmd"]
DS_PYTHON = os.environ.get("ZINSPECT_DS_PYTHON")
needs_ds = pytest.mark.skipif(not DS_PYTHON, reason="set ZINSPECT_DS_PYTHON to a python with "
                              "deepspeed==0.19.8")


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=STUB_PICKLE)


def _fixture(name: str) -> Path:
    return PARALLEL / name


def manifest(name: str) -> dict:
    return json.loads((_fixture(name) / "manifest.json").read_text())


@pytest.fixture(scope="module", params=CONVERTED)
def converted(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name) / "uni"
    result = write_universal(open_checkpoint(_fixture(name)), out)
    return name, out, result


@needs_ds
def test_every_file_equals_deepspeeds(converted, tmp_path):
    name, out, result = converted
    tag = manifest(name)["tag"]
    theirs = tmp_path / "ds" / f"{tag}_universal"
    subprocess.run([DS_PYTHON, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(_fixture(name) / tag), "--output_folder", str(theirs), "--inject_missing_state",
                    "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True, capture_output=True, timeout=600)
    assert (tmp_path / "ds" / "latest_universal").read_text() == \
        (out / "latest_universal").read_text() == result.tag
    ours = out / result.tag
    compared = set()
    for p in sorted(theirs.rglob("*.pt")):  # the model-states files, zero/ (tied param included)
        rel = p.relative_to(theirs)
        same_pickled(_load(ours / rel), _load(p), str(rel))
        compared.add(str(rel))
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
            "zero/optimizer_state.pt", "zero/tied_modules.embed.weight/exp_avg_sq.pt"} <= compared
    assert len(compared) > 100
    extra = {str(p.relative_to(ours)) for p in ours.rglob("*.pt")} - compared
    m = manifest(name)
    assert extra == {f"zero/{n}/fp32.pt" for n in [*m["frozen"], *m["buffers"]]} != set()


def test_states_are_the_sources(converted):
    """fp32 = the reference, exp_avg / exp_avg_sq = the source's (rebuilt by torch alone from
    each stage's files), step = the run's, keys DeepSpeed's; the tree holds every stage's
    model-states file and no layer file (DeepSpeed's universal load reads none)."""
    name, out, result = converted
    m = manifest(name)
    zero = out / result.tag / "zero"
    ref = torch.load(_fixture(name) / "reference_fp32.pt", weights_only=True)
    want = expected_pipeline_states(str(_fixture(name) / m["tag"]), m["pp"])
    assert set(want) == set(ref) - set(m["frozen"]) - set(m["buffers"])
    for pname, states in want.items():
        for state, t in states.items():
            got = _load(zero / pname / f"{state}.pt")
            assert list(got) == ["cat_dim", "param"] and got["cat_dim"] == 0, (pname, state)
            assert torch.equal(got["param"].reshape(-1), t), (pname, state)
        assert torch.equal(_load(zero / pname / "fp32.pt")["param"], ref[pname]), pname
        assert int(_load(zero / pname / "step.pt")) == m["global_steps"]
    for key in [*m["frozen"], *m["buffers"]]:
        assert torch.equal(_load(zero / key / "fp32.pt")["param"], ref[key]), key
    tops = sorted(p.name for p in (out / result.tag).iterdir() if p.is_file())
    assert tops == [f"mp_rank_{s:02d}_model_states.pt" for s in range(m["pp"])]
    assert not result.unverified and result.verified


@pytest.mark.parametrize("name", ["pp2_dp1_s0_bf16", "pp3_dp1_s0_fp32"])
def test_zero0_pipelines_are_refused_with_deepspeeds_reason(tmp_path, name):
    with pytest.raises(NotMergeable, match=r"ZeRO-0 pipeline .* only through a ZeRO optimizer "
                       r"\(deepspeed/runtime/engine.py"):
        write_universal(open_checkpoint(_fixture(name)), tmp_path / "u")
    assert not (tmp_path / "u").exists() or not os.listdir(tmp_path / "u")


def test_a_drifted_tied_copy_is_refused_and_nothing_is_written(tmp_path):
    """Stage 1's copy of the tied embedding 0.25 off at one element (its zip CRC updated: bytes
    as saved): there is no one value to write, so the conversion refuses, names the param and
    the stage, and writes nothing."""
    import struct

    from damage import record_holding, set_crc

    name, tied = "pp2_dp2_s1_fp32", "tied_modules.embed.weight"
    root = tmp_path / name
    shutil.copytree(_fixture(name), root)
    frag = open_checkpoint(root).params[tied].copies[1][0]
    path = root / "global_step2" / frag.file
    with open(path, "r+b") as fh:
        fh.seek(frag.offset + 8)
        value = struct.unpack("<f", fh.read(4))[0]
        fh.seek(frag.offset + 8)
        fh.write(struct.pack("<f", value + 0.25))
    set_crc(path, record_holding(path, frag.offset)[0].split("/", 1)[1])
    with pytest.raises(NotMergeable, match=rf"zero/{tied}/fp32.pt: a tied param differs on "
                       r"stage\(s\) \[1\] from the lowest stage .*0\.25"):
        write_universal(open_checkpoint(root), tmp_path / "u")
    assert not (tmp_path / "u").exists() or not os.listdir(tmp_path / "u")


def _engines_hold(tmp: Path, ckpt: Path, name: str, pp: int, dp: int) -> dict:
    """{rank: what a real PipelineEngine at pp x dp holds after loading universal `ckpt` and
    what its training step did}."""
    result = tmp / f"held_{pp}x{dp}"
    subprocess.run([DS_PYTHON, str(Path(__file__).parent / "ds_resume" / "pp_universal_worker.py"),
                    "--ckpt", str(ckpt), "--manifest", str(_fixture(name) / "manifest.json"),
                    "--pp", str(pp), "--dp", str(dp), "--result", str(result)],
                   check=True, capture_output=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return {r: torch.load(f"{result}.{r}.pt", weights_only=False) for r in range(pp * dp)}


@needs_ds
@pytest.mark.parametrize("name,pp,dp", [("pp2_dp2_s1_fp32", 2, 1), ("pp2_dp2_s1_bf16_pmd", 3, 1)])
def test_pipeline_engines_load_it_at_another_pp_and_dp_and_train(tmp_path, name, pp, dp):
    write_universal(open_checkpoint(_fixture(name)), tmp_path / "uni")
    held = _engines_hold(tmp_path, tmp_path / "uni", name, pp, dp)
    m = manifest(name)
    want = expected_pipeline_states(str(_fixture(name) / m["tag"]), m["pp"])
    seen = set()
    for rank, got in held.items():
        assert got["loaded"] and got["global_steps"] == m["global_steps"], rank
        assert got["steps_after"] == m["global_steps"] + 1 and got["loss_finite"] is not False
        for pname, states in got["held"].items():
            for state, t in states.items():
                assert t is not None and torch.equal(t.reshape(-1), want[pname][state]), \
                    (rank, pname, state)
            seen.add(pname)
    assert seen == set(want)  # every trainable param held by some stage
    assert sorted({g["stage"] for g in held.values()}) == list(range(pp))
