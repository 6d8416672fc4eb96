"""A pipeline's tied param (`tied_modules.embed.weight`) has an fp32 master on every stage using
it: the merge writes the lowest stage's copy and reads the other stages' copies (CRC-verified)
to compare them with it, on the real pipeline fixtures. A copy that differs is a
`tied-copy-drift` warning naming the stages and the largest difference; `--strict` refuses."""

from __future__ import annotations

import json
import struct

import damage as D
import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_zinspect
from safetensors.torch import load_file

from zinspect.core import open_checkpoint
from zinspect.core.merge import merge, plan_merge

PIPELINES = ["parallel/pp2_dp2_s1_fp32", "parallel/pp2_dp2_s1_bf16_pmd"]
TIED = "tied_modules.embed.weight"


def reference(name: str) -> dict:
    return torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)


@pytest.mark.parametrize("name", PIPELINES)
def test_the_other_stages_copies_are_read_and_equal(tmp_path, name):
    root = D.copy_root(tmp_path, name, "intact")
    ckpt = open_checkpoint(root)
    p = ckpt.params[TIED]
    (t,) = [t for t in plan_merge(ckpt).tensors if t.mirrors]
    assert t.name == TIED and [(m.replica, m.axis) for m in t.mirrors] == [(1, "stage")]
    assert sorted(p.copies) == [1]
    assert [pc.path for pc in t.mirrors[0].pieces] == \
        [str(ckpt.path / f.file) for f in sorted(p.copies[1], key=lambda f: f.start) if f.numel]
    assert all("mp_rank_01" in pc.path for pc in t.mirrors[0].pieces)
    result = merge(ckpt, tmp_path / "out", hf_files=False)
    assert result.drift == {} and result.findings == [] and result.warnings == []
    assert result.unverified == []
    got, ref = load_file(tmp_path / "out" / "model.safetensors"), reference(name)
    assert set(got) == set(ref)
    for n, v in ref.items():
        assert got[n].dtype == v.dtype and torch.equal(got[n], v), n


def drifted_copy(tmp_path, name: str) -> tuple:
    """A copy of the fixture whose stage-1 copy of the tied embedding is 0.5 off at one element,
    its zip CRC updated; (root, the difference as float32 arithmetic gives it)."""
    root = D.copy_root(tmp_path, name, "drift")
    ckpt = open_checkpoint(root)
    frag = next(f for f in ckpt.params[TIED].copies[1] if f.numel)
    path = ckpt.path / frag.file
    at = frag.offset + 4 * (frag.numel // 2)
    with open(path, "r+b") as f:
        f.seek(at)
        old = struct.unpack("<f", f.read(4))[0]
        f.seek(at)
        f.write(struct.pack("<f", old + 0.5))
    D.set_crc(path, D.record_holding(path, at)[0].split("/", 1)[1])
    want = float(np.float32(np.float32(old) + np.float32(0.5)) - np.float32(old))
    assert open_checkpoint(root).findings == []  # only the merge's comparison can see it
    return root, want


@pytest.mark.parametrize("name", PIPELINES)
def test_a_drifted_stage_copy_is_a_warning_and_strict_refuses(tmp_path, name):
    """Stage 1's copy of the tied embedding is 0.5 off at one element, its zip CRC updated (a
    drifted run, not a corrupt file): `merge --json` exits 0 with a tied-copy-drift warning
    naming the param, stage 1 and the difference, and writes stage 0's copy (= the reference);
    `--strict` refuses and writes nothing."""
    root, want = drifted_copy(tmp_path, name)

    r = run_zinspect("merge", root, tmp_path / "out", "--json", "--no-hf-files")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["drift"] == {TIED: {"1": pytest.approx(want, rel=1e-6)}}
    assert [(f["code"], f["param"], f["severity"]) for f in j["findings"]] == \
        [("tied-copy-drift", TIED, "warning")]
    assert "pipeline stage(s) 1 differ" in j["findings"][0]["message"]
    assert f"{want:.6g}" in j["findings"][0]["message"]
    assert any("pipeline stage(s) 1 differ" in w for w in j["warnings"])
    assert TIED in r.stderr and "pipeline stage(s) 1" in r.stderr and "tp rank" not in r.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(got[TIED], reference(name)[TIED])

    r = run_zinspect("merge", root, tmp_path / "strict", "--strict", "--no-hf-files")
    assert r.returncode == 1 and TIED in r.stderr and "--strict" in r.stderr, r.stderr
    assert "pipeline stage(s) 1" in r.stderr
    assert not (tmp_path / "strict").exists()


def test_the_api_names_a_drifted_stage_copy_as_a_pipeline_stage(tmp_path):
    """get_fp32_state_dict warns about the drift in the words of its axis (it said "tp rank")."""
    import zinspect

    root, _ = drifted_copy(tmp_path, PIPELINES[0])
    with pytest.warns(RuntimeWarning, match=r"pipeline stage\(s\) 1 differ") as caught:
        state = zinspect.get_fp32_state_dict(root)
    assert not any("tp rank" in str(w.message) for w in caught)
    assert torch.equal(state[TIED], reference(PIPELINES[0])[TIED])
