"""The universal writer on pipeline x tensor-parallel checkpoints (Megatron-DeepSpeed style,
layout pipeline_tp: tests/fixtures/parallel/pp2_tp2_*, made by tests/tools/make_ds_pptp.py).

- every file DeepSpeed 0.19.8's own ds_to_universal.py writes for them (it handles
  Megatron-DeepSpeed natively) equals ours, key by key and bit for bit: the vocab-parallel tied
  embedding ({'cat_dim': 0, 'vocab_tensor': True}, padding trimmed), row-parallel weights
  ('cat_dim': 1), Megatron's 2-sub-param swiglu ('cat_dim': 0, 'param_n_sub_params': 2: the
  halves joined half by half), replicated norms ({'param'}), the model-states files;
- without DeepSpeed: fp32 = reference_fp32.pt, and each tp rank's shard of every moment cut
  back as DeepSpeed's loader cuts it equals that rank's saved one (expected.py, torch alone);
  a tied embedding whose stages drifted apart is refused;
- real PipelineEngines load it at another dp (pp2 x tp2 x dp2 -> dp1) and another pp (pp2 ->
  pp1, tp2), hold every tp shard of the source's masters and moments, and train a step.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES
from damage import record_holding, set_crc

from zinspect.core import open_checkpoint
from zinspect.core.universal import write_universal
from zinspect.errors import NotMergeable

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent / "ds_resume"))
from expected import STUB_PICKLE, expected_pipeline_states, same_pickled  # noqa: E402

PARALLEL = FIXTURES / "parallel"
PPTP = ["pp2_tp2_dp2_s1_fp32", "pp2_tp2_dp1_s1_bf16"]
TIED = "tied_modules.embed.word_embeddings.weight"
DS_PYTHON = os.environ.get("ZINSPECT_DS_PYTHON")
needs_ds = pytest.mark.skipif(not DS_PYTHON, reason="set ZINSPECT_DS_PYTHON to a python with "
                              "deepspeed==0.19.8")


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=STUB_PICKLE)


def manifest(name: str) -> dict:
    return json.loads((PARALLEL / name / "manifest.json").read_text())


@pytest.fixture(scope="module", params=PPTP)
def converted(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name) / "uni"
    result = write_universal(open_checkpoint(PARALLEL / name), out)
    return name, out, result


@needs_ds
def test_every_file_equals_deepspeeds(converted, tmp_path):
    name, out, result = converted
    tag = manifest(name)["tag"]
    theirs = tmp_path / "ds" / f"{tag}_universal"
    subprocess.run([DS_PYTHON, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(PARALLEL / name / tag), "--output_folder", str(theirs),
                    "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True, capture_output=True, timeout=600)
    ours = out / result.tag
    compared = set()
    for p in sorted(theirs.rglob("*.pt")):
        rel = p.relative_to(theirs)
        same_pickled(_load(ours / rel), _load(p), str(rel))
        compared.add(str(rel))
    assert {str(p.relative_to(ours)) for p in ours.rglob("*.pt")} == compared
    assert {f"mp_rank_{i:02d}_model_states.pt" for i in range(4)} | {
        f"zero/{TIED}/exp_avg.pt", "zero/3.mlp.dense_h_to_4h.weight/fp32.pt"} <= compared


def _shard(obj: dict, tp: int, t: int, rows: int | None) -> torch.Tensor:
    """Tp rank t's shard of a universal file's tensor, cut as DeepSpeed's loader cuts it
    (universal_checkpoint.py): replicated whole; vocab padded to `rows` per rank; n sub-params
    each cut; else cut on cat_dim."""
    full = obj["param"]
    if "cat_dim" not in obj:
        return full
    if obj.get("vocab_tensor"):
        full = torch.nn.functional.pad(full, (0, 0, 0, rows * tp - full.shape[0]))
    dim = obj["cat_dim"]
    if obj.get("param_n_sub_params", 1) > 1:
        return torch.cat([s.chunk(tp, dim)[t] for s in full.chunk(obj["param_n_sub_params"], dim)], dim)
    return full.chunk(tp, dim)[t]


def test_fp32_is_the_reference_and_each_tp_shard_the_sources(converted):
    name, out, result = converted
    m = manifest(name)
    zero = out / result.tag / "zero"
    ref = torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)
    kinds = {"vocab": ["cat_dim", "vocab_tensor", "param"], "row": ["cat_dim", "param"],
             "column": ["cat_dim", "param"], "replicated": ["param"],
             "two_sub_params": ["cat_dim", "param_n_sub_params", "param"]}
    compared = 0
    for t in range(m["tp"]):
        want = expected_pipeline_states(str(PARALLEL / name / m["tag"]), m["pp"], m["tp"], t)
        assert set(want) == set(ref)
        for pname, states in want.items():
            info = m["params"][pname]
            for state, saved in states.items():
                obj = _load(zero / pname / f"{state}.pt")
                assert list(obj) == kinds[info["kind"]], (pname, list(obj))
                if state == "fp32":
                    assert torch.equal(obj["param"], ref[pname]), pname
                rows = info["shard_shape"][0]
                got = _shard(obj, m["tp"], t, rows).reshape(-1)
                real = got.numel() if info["kind"] != "vocab" else \
                    max(0, min(rows, m["model"]["vocab"] - t * rows)) * info["shape"][1]
                assert torch.equal(got[:real], saved[:real]), (pname, state, t)  # not the padding
                compared += 1
    assert compared == 3 * m["tp"] * len(ref)


def test_a_drifted_tied_copy_is_refused_and_nothing_is_written(tmp_path):
    """The last stage's copy of the vocab-parallel tied embedding (tp rank 0's shard) 0.25 off at
    one element, its zip CRC updated: refused, the param and the stage named, nothing written."""
    name = "pp2_tp2_dp1_s1_bf16"
    root = tmp_path / name
    shutil.copytree(PARALLEL / name, root)
    frag = min(open_checkpoint(root).params[TIED].copies[1], key=lambda f: (f.shard or 0, f.start))
    path = root / manifest(name)["tag"] / frag.file
    with open(path, "r+b") as fh:
        fh.seek(frag.offset + 8)
        value = struct.unpack("<f", fh.read(4))[0]
        fh.seek(frag.offset + 8)
        fh.write(struct.pack("<f", value + 0.25))
    set_crc(path, record_holding(path, frag.offset)[0].split("/", 1)[1])
    with pytest.raises(NotMergeable, match=rf"zero/{TIED}/fp32.pt: a tied param differs on "
                       r"stage\(s\) \[1\]"):
        write_universal(open_checkpoint(root), tmp_path / "u")
    assert not (tmp_path / "u").exists() or not os.listdir(tmp_path / "u")


@needs_ds
@pytest.mark.parametrize("name,pp,dp", [("pp2_tp2_dp2_s1_fp32", 2, 1), ("pp2_tp2_dp1_s1_bf16", 1, 1)])
def test_pipeline_engines_load_it_at_another_pp_or_dp_and_train(tmp_path, name, pp, dp):
    m = manifest(name)
    tp = m["tp"]
    write_universal(open_checkpoint(PARALLEL / name), tmp_path / "uni")
    result = tmp_path / "held"
    subprocess.run([DS_PYTHON, str(Path(__file__).parent / "ds_resume" / "pptp_universal_worker.py"),
                    "--ckpt", str(tmp_path / "uni"), "--manifest", str(PARALLEL / name / "manifest.json"),
                    "--pp", str(pp), "--tp", str(tp), "--dp", str(dp), "--result", str(result)],
                   check=True, capture_output=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    want = {t: expected_pipeline_states(str(PARALLEL / name / m["tag"]), m["pp"], tp, t) for t in range(tp)}
    seen, compared = set(), 0
    for rank in range(pp * tp * dp):
        got = torch.load(f"{result}.{rank}.pt", weights_only=False)
        assert got["loaded"] and got["global_steps"] == m["global_steps"]
        assert got["steps_after"] == m["global_steps"] + 1 and got["loss_finite"]
        for pname, states in got["held"].items():
            info = m["params"][pname]
            for state, t in states.items():
                w, t = want[got["tp"]][pname][state], t.reshape(-1)
                if info["kind"] == "vocab":  # the padding rows: zeros after a universal load
                    rows = info["shard_shape"][0]
                    real = max(0, min(rows, m["model"]["vocab"] - got["tp"] * rows)) * info["shape"][1]
                    t, w = t[:real], w[:real]
                assert torch.equal(t, w), (rank, pname, state)
                compared += 1
            seen.add(pname)
    assert seen == set(want[0]) and compared >= 3 * tp * len(want[0])
