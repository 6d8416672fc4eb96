"""`zinspect reshard` from the parallel layouts: tensor parallel (AutoTP, ZeRO-1/2/3), pipelines
(ZeRO-1, also with tensor parallelism) and native MoE (ZeRO-1/2), tp / pp / ep kept, the
data-parallel size changed.

- every state moves, nothing changes: the merged fp32 masters equal the fixture's reference bit
  for bit, and the Adam moments (merged with --state all) equal the source's;
- resharding to the same world size gives back every file's every tensor and pickled value
  (the layout is DeepSpeed's own), the layer and expert files included;
- real DeepSpeed 0.19.8 engines at the new world size load the output with plain
  `engine.load_checkpoint()`, hold exactly what engines at the old world size hold from the
  source (every fp32 master, exp_avg and exp_avg_sq, frozen param and buffer, gathered by
  DeepSpeed's safe_get_full_* helpers) and train a step (needs ZINSPECT_DS_PYTHON);
- and what zinspect writes at N has the layout DeepSpeed itself saves when trained at N.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES, copy_fixture, manifest
from test_reshard import (
    DS_PYTHON,
    _skeleton,
    assert_layout_of_deepspeed,
    needs_deepspeed,
    skip_unless_engines_build,
)

from zinspect.core import open_checkpoint
from zinspect.core.reshard import reshard
from zinspect.core.torchzip import read_torch_file
from zinspect.errors import NotMergeable

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors.torch")

TWINS = FIXTURES / "reshard_twins"
WORKER = Path(__file__).parent / "ds_resume" / "parallel_worker.py"
#: (fixture, world sizes to reshard to, the new topology's (dp, tp, pp, ep) at the first)
CASES = [("parallel/tp2_dp2_s1_toy", [2, 6], (1, 2, 1, 1)),
         ("parallel/tp2_dp2_s2_toy", [6, 2], (3, 2, 1, 1)),
         ("parallel/tp2_dp2_s3_toy", [2, 6], (1, 2, 1, 1)),
         ("parallel/tp2_dp2_s2_llama_bf16_tied", [2, 8], (1, 2, 1, 1)),
         ("parallel/pp2_dp2_s1_fp32", [2, 6], (1, 1, 2, 1)),
         ("parallel/pp2_dp2_s1_bf16_pmd", [6, 2], (3, 1, 2, 1)),
         ("parallel/pp2_tp2_dp2_s1_fp32", [4, 12], (1, 2, 2, 1)),
         ("parallel/pp2_tp2_dp1_s1_bf16", [8, 4], (2, 2, 2, 1)),
         ("parallel/moe_ep2_w4_s2_fp32", [2, 6], (2, 1, 1, 2)),
         ("parallel/moe_ep2_w4_s1_top2_res", [8, 2], (8, 1, 1, 2))]


def _resharded(tmp_path: Path, name: str, n: int) -> Path:
    out = tmp_path / f"{name.replace('/', '_')}_ws{n}"
    reshard(open_checkpoint(FIXTURES / name), out, n)
    return out


def _merged_states(tmp_path: Path, ckpt_dir: Path) -> dict:
    """{state: {name: tensor}}: zinspect's merge --state all of a checkpoint."""
    import zinspect

    out = tmp_path / f"merged_{ckpt_dir.name}_{len(list(tmp_path.iterdir()))}"
    zinspect.merge(ckpt_dir, out, state="all")
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        state = "fp32"
        for s in ("exp_avg_sq", "exp_avg"):
            if s in f.name:
                state = s
                break
        got.setdefault(state, {}).update(safetensors.load_file(f))
    return got


@pytest.mark.parametrize("name,sizes,topo", CASES)
def test_every_state_moves_unchanged(tmp_path, name, sizes, topo):
    import zinspect

    src = open_checkpoint(FIXTURES / name)
    ref = torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)
    want = _merged_states(tmp_path, FIXTURES / name)
    assert set(want) == {"fp32", "exp_avg", "exp_avg_sq"}
    for i, n in enumerate(sizes):
        out = _resharded(tmp_path, name, n)
        got = open_checkpoint(out)
        assert (got.layout, got.stage, got.world_size) == (src.layout, src.stage, n)
        assert not got.errors, [f.message for f in got.errors]
        if i == 0:
            t = got.topology
            assert (t.dp, t.tp, t.pp, t.ep) == topo
        merged = zinspect.get_fp32_state_dict(out)
        assert merged.keys() == ref.keys()
        for key, t in ref.items():
            assert merged[key].dtype == t.dtype and torch.equal(merged[key], t), key
        have = _merged_states(tmp_path, out)
        for state, tensors in want.items():
            assert have[state].keys() == tensors.keys(), state
            for key, t in tensors.items():
                assert torch.equal(have[state][key], t), (state, key)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_same_world_size_gives_back_the_source(tmp_path, name):
    """Every file, every tensor byte and pickled value as the source holds them (ZeRO-3's
    padding by shape: DeepSpeed leaves it uninitialized, we write zeros)."""
    src = open_checkpoint(FIXTURES / name)
    tag = FIXTURES / name / src.tag
    out = _resharded(tmp_path, name, src.world_size) / src.tag
    wanted = sorted(p.name for p in tag.iterdir())
    assert sorted(p.name for p in out.iterdir()) == wanted
    for file in wanted:
        want, have = _skeleton(tag / file, True), _skeleton(out / file, True)
        osd = want.get("optimizer_state_dict") or {}
        if "fp32_flat_groups" in osd:
            shapes = _skeleton(out / file, False)["optimizer_state_dict"]["fp32_flat_groups"]
            osd["fp32_flat_groups"] = have["optimizer_state_dict"]["fp32_flat_groups"] = shapes
        assert have == want, file


def test_layer_and_expert_files_are_copied_byte_for_byte(tmp_path):
    """What no data-parallel size changes (a pipeline's layer files, the MoE expert files) is
    the source file's every byte at the new world size."""
    for name, n in (("parallel/pp2_dp2_s1_fp32", 6), ("parallel/moe_ep2_w4_s2_fp32", 6)):
        src = open_checkpoint(FIXTURES / name)
        out = _resharded(tmp_path, name, n) / src.tag
        files = sorted((FIXTURES / name / src.tag).glob("layer_*"))
        assert files
        for file in files:
            assert (out / file.name).read_bytes() == file.read_bytes(), file.name


def test_a_flipped_byte_in_a_copied_file_fails_its_crc_and_nothing_is_written(tmp_path):
    """A copied file's records are CRC-checked as they stream, as every other read is."""
    tag = copy_fixture(tmp_path, "parallel/pp2_dp2_s1_fp32")
    victim = tag / "layer_03-model_states.pt"
    tf = read_torch_file(victim)
    data = bytearray(victim.read_bytes())
    data[tf.tensor_offset(tf.obj["up.weight"]) + 8] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(NotMergeable, match="CRC"):
        reshard(open_checkpoint(tag), tmp_path / "out", 6)
    assert not (tmp_path / "out" / "latest").exists()
    assert not any((tmp_path / "out").rglob("*.pt"))


@pytest.mark.parametrize("name,n,twin", [("parallel/tp2_dp2_s2_toy", 2, "tp2_dp1_s2_toy"),
                                         ("parallel/tp2_dp2_s3_toy", 6, "tp2_dp3_s3_toy"),
                                         ("parallel/pp2_dp2_s1_fp32", 2, "pp2_dp1_s1_fp32"),
                                         ("parallel/pp2_tp2_dp2_s1_fp32", 4, "pp2_tp2_dp1_s1_fp32"),
                                         ("parallel/moe_ep2_w4_s2_fp32", 2, "moe_ep2_w2_s2_fp32"),
                                         ("parallel/moe_ep2_w4_s1_top2_res", 6,
                                          "moe_ep2_w6_s1_top2_res")])
def test_layout_is_what_deepspeed_saves_at_n(tmp_path, name, n, twin):
    """tests/fixtures/reshard_twins/: the same model trained by DeepSpeed itself at N (the
    generators with the fixture's arguments but --world-size N, --steps 2): every file name,
    partition size, padding, partition count, slice mapping (an MoE expert's under its local
    name), param_shapes, ZeRO-3 sub-group and tensor shape of zinspect's output is DeepSpeed's."""
    src = open_checkpoint(FIXTURES / name)
    assert_layout_of_deepspeed(_resharded(tmp_path, name, n) / src.tag, TWINS / twin / src.tag)


# ------------------------------------------------------------------ real DeepSpeed resumes
def engines(tmp_path: Path, name: str, ckpt: Path, n: int, label: str, worker: Path = WORKER) -> dict:
    """What `n` engines (the fixture `name`'s model, `worker`) hold after loading `ckpt`."""
    skip_unless_engines_build(name)
    result = tmp_path / f"{label}.pt"
    cmd = [DS_PYTHON, str(worker), "--ckpt", str(ckpt), "--manifest",
           str(FIXTURES / name / "manifest.json"), "--world-size", str(n), "--result", str(result)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0 and result.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return torch.load(result, weights_only=False)


@needs_deepspeed
@pytest.mark.parametrize("name,n", [("parallel/tp2_dp2_s2_toy", 6), ("parallel/tp2_dp2_s3_toy", 2),
                                    ("parallel/pp2_dp2_s1_fp32", 2),
                                    ("parallel/pp2_dp2_s1_bf16_pmd", 6),
                                    ("parallel/pp2_tp2_dp1_s1_bf16", 8),
                                    ("parallel/moe_ep2_w4_s2_fp32", 2),
                                    ("parallel/moe_ep2_w4_s1_top2_res", 6)])
def test_deepspeed_resumes_at_the_new_world_size(tmp_path, name, n):
    """Engines at N loading zinspect's output hold what engines at the old size hold loading
    DeepSpeed's own files, every value, and train on."""
    src = open_checkpoint(FIXTURES / name)
    before = engines(tmp_path, name, FIXTURES / name, src.world_size, "source")
    after = engines(tmp_path, name, _resharded(tmp_path, name, n), n, "resharded")
    assert_engines_agree(before, after, manifest(name)["global_steps"], src.world_size, n)


def assert_engines_agree(before: dict, after: dict, steps: int, n_before: int, n_after: int) -> list[str]:
    """`after`'s engines hold every value `before`'s hold (masters and moments of every trainable
    param), at the saved step on every rank, and took one more step; the trainable keys."""
    assert before["steps_every_rank"] == [steps] * n_before
    assert after["steps_every_rank"] == [steps] * n_after
    assert before["disagree"] == [] and after["disagree"] == []
    assert after["held"].keys() == before["held"].keys()
    compared = 0
    for key, states in before["held"].items():
        assert after["held"][key].keys() == states.keys(), key
        for state, t in states.items():
            assert t is not None and after["held"][key][state] is not None, (key, state)
            assert torch.equal(after["held"][key][state], t), (key, state)
            compared += 1
    trainable = [k for k, s in after["held"].items() if "fp32" in s]
    assert trainable and compared >= 3 * len(trainable)
    assert after["loss_finite"] and after["steps_after"] == steps + 1
    return trainable
