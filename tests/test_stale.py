"""A stale rank file with the right shapes: the case every metadata check passes.

tests/fixtures/stale/ holds real optimizer files of the same toy runs as s2_w4_fp16 and
s3_w4_bf16, saved one step later (make_ds_checkpoints.py ... --steps 3). Dropped into the step-2
checkpoint, names, shapes, world size and stage all agree, and DeepSpeed's zero_to_fp32 merges
them without a word: for the ZeRO-2 case it returned 8 of 31 tensors wrong (checked by hand with
DeepSpeed 0.19.8). The optimizer's `step` is what gives them away.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import FIXTURES, copy_fixture, manifest, run_zinspect

from zinspect.core import open_checkpoint

STALE = FIXTURES / "stale"
CASES = {
    "s2_w4_fp16": ("s2_w4_fp16_step3_zero_pp_rank_2_mp_rank_00_optim_states.pt",
                   "zero_pp_rank_2_mp_rank_00_optim_states.pt", 2),
    "s3_w4_bf16": ("s3_w4_bf16_step3_bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                   "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 1),
}


@pytest.fixture(params=sorted(CASES))
def stale_copy(request, tmp_path):
    fixture = request.param
    source, target, rank = CASES[fixture]
    tag = copy_fixture(tmp_path, fixture)
    shutil.copy(STALE / source, tag / target)
    return tag, target, rank


def test_a_stale_rank_file_is_named(stale_copy):
    tag, target, rank = stale_copy
    ckpt = open_checkpoint(tag)
    errors = [f for f in ckpt.findings if f.severity == "error"]
    assert [f.code for f in errors] == ["step-mismatch"]  # nothing else notices it
    assert errors[0].file == target and errors[0].rank == rank
    assert "step 3" in errors[0].message and "step 2" in errors[0].message


def test_validate_and_merge_refuse_it(stale_copy, tmp_path):
    tag, target, _ = stale_copy
    proc = run_zinspect("validate", tag)
    assert proc.returncode == 1 and "step-mismatch" in proc.stdout and target in proc.stdout
    out = tmp_path / "merged"
    proc = run_zinspect("merge", tag, out)
    assert proc.returncode == 1 and "step" in proc.stderr
    assert not out.exists()


def test_every_fixture_has_one_step_on_all_ranks(fixture_name):
    ckpt = open_checkpoint(FIXTURES / fixture_name)
    steps = {f.step for f in ckpt.files_of("optim")}
    assert steps == {float(manifest(fixture_name)["steps"])}  # the steps the generator trained


def test_salvage_leaves_out_every_param_the_stale_file_holds(stale_copy, tmp_path):
    """--salvage must not write what a file from another step holds: its params are dropped,
    the rest is bit-exact, and the exit code says the output is partial."""
    import safetensors.torch
    import torch

    tag, target, rank = stale_copy
    fixture = tag.parent.name
    ckpt = open_checkpoint(tag)
    held = {n for n, p in ckpt.params.items() if any(f.file == target for f in p.fragments)}
    held |= {n for n, p in ckpt.params.items() if p.tied_to in held}
    assert held and len(held) < len(ckpt.params)
    out = tmp_path / "rescued"
    proc = run_zinspect("merge", tag, out, "--salvage", "--max-shard-size", "0", "--json")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    dropped = json.loads(proc.stdout)["dropped"]
    assert set(dropped) == held  # at ZeRO-3 every trainable param has a share in every rank
    owners = {n for n in held if not ckpt.params[n].tied_to}
    assert {dropped[n] for n in owners} == {f"{target} is not this checkpoint's (step-mismatch)"}
    got = safetensors.torch.load_file(str(out / "model.safetensors"))
    ref = torch.load(FIXTURES / fixture / "reference_fp32.pt", weights_only=True)
    assert set(got) == set(ref) - held
    for name, t in got.items():
        assert t.dtype == ref[name].dtype or t.dtype == torch.float32, name
        assert torch.equal(t.reshape(-1).view(torch.uint8), ref[name].reshape(-1).view(torch.uint8)), name


def test_a_file_beyond_the_world_size_is_one_finding_not_mapping_warnings(tmp_path):
    """The README's example: rank 2 lost, a leftover rank-7 file in the dir. The leftover is a
    stale-rank-file (and, saved a step later, a step-mismatch); its param_slice_mappings are not
    compared with a partition it does not have (that gave one slice-mapping-mismatch per group)."""
    tag = copy_fixture(tmp_path, "s2_w4_fp16")
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    shutil.copy(STALE / CASES["s2_w4_fp16"][0], tag / "zero_pp_rank_7_mp_rank_00_optim_states.pt")
    ckpt = open_checkpoint(tag)
    on_rank7 = sorted({f.code for f in ckpt.findings if f.rank == 7})
    assert on_rank7 == ["stale-rank-file", "step-mismatch"]
    assert not [f for f in ckpt.findings if f.code == "slice-mapping-mismatch"]
