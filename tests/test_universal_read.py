"""Universal checkpoints of the parallel layouts read back as input (layout "universal"):
zinspect's own output for tensor-parallel, pipeline, pipeline x tp and native MoE runs opens
without findings, names every param at its full shape (a pipeline's later stages from their own
model-states files, a tp shard's shape replaced by the joined one, a stacked MoE file split back
into its global experts), and merges to reference_fp32.pt bit for bit, frozen params and buffers
included; the moments it locates are the source's. DeepSpeed's own pipeline output holds no
buffers (it copies no layer file): the merge names them instead of dropping them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

import zinspect
from zinspect.core import open_checkpoint
from zinspect.core.universal import write_universal
from zinspect.errors import NotMergeable

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent / "ds_resume"))
from expected import expected_moe_states, expected_pipeline_states  # noqa: E402

PARALLEL = FIXTURES / "parallel"


def _moments(ckpt, name: str, state: str) -> torch.Tensor:
    out = []
    for f in sorted(ckpt.state_fragments(name, state), key=lambda f: f.start):
        with open(ckpt.path / f.file, "rb") as fh:
            fh.seek(f.offset)
            out.append(torch.frombuffer(bytearray(fh.read(f.nbytes)), dtype=torch.float32))
    return torch.cat(out)


@pytest.mark.parametrize("name", ["tp2_dp2_s2_toy", "pp2_dp2_s1_fp32", "pp2_dp2_s1_bf16_pmd",
                                  "pp2_tp2_dp2_s1_fp32", "moe_ep2_w4_s1_top2_res"])
def test_our_universal_output_reads_back_whole(tmp_path, name):
    write_universal(open_checkpoint(PARALLEL / name), tmp_path / "uni")
    ckpt = open_checkpoint(tmp_path / "uni")
    assert ckpt.layout == "universal" and not ckpt.errors, [f.message for f in ckpt.errors]
    ref = torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)
    merged = zinspect.get_fp32_state_dict(tmp_path / "uni")
    assert merged.keys() == ref.keys()
    for key, t in ref.items():
        assert merged[key].shape == t.shape and torch.equal(merged[key], t), key
    tag = PARALLEL / name / "global_step2"
    want = expected_moe_states(str(tag), 2) if name.startswith("moe") else \
        expected_pipeline_states(str(tag), 2) if name.startswith("pp2_dp") else {}
    for pname, states in want.items():
        for state in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(_moments(ckpt, pname, state), states[state]), (pname, state)


def test_deepspeeds_pipeline_output_names_the_buffers_it_lacks(tmp_path):
    """ds_to_universal's output of a pipeline holds no buffers (they live in the layer files it
    does not copy): every stage's buffers are named, and the merge refuses rather than drop them."""
    import os
    import shutil
    import subprocess

    ds = os.environ.get("ZINSPECT_DS_PYTHON")
    if not ds:
        pytest.skip("set ZINSPECT_DS_PYTHON to a python with deepspeed==0.19.8")
    name = "pp2_dp2_s1_fp32"
    out = tmp_path / "ds" / "global_step2_universal"
    subprocess.run([ds, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(PARALLEL / name / "global_step2"), "--output_folder", str(out),
                    "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True, capture_output=True, timeout=600)
    shutil.rmtree(out / "tmp", ignore_errors=True)
    ckpt = open_checkpoint(tmp_path / "ds")
    assert sorted(b for b, buf in ckpt.buffers.items() if not buf.intact) == \
        ["3.pos_scale", "4.pos_scale", "5.pos_scale", "6.pos_scale"]
    with pytest.raises(NotMergeable, match="3.pos_scale, 4.pos_scale, 5.pos_scale, 6.pos_scale"):
        zinspect.get_fp32_state_dict(tmp_path / "ds")
