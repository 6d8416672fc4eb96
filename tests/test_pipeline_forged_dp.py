"""A pipeline whose model-states `dp_world_size` is forged to a value that is no size (0, -2,
True; every CRC valid): the finding names the field, the file and what to do, and the real
rank-1 files are not called stale because of it (before, the size fell back to 1 and the dp-1
optimizer files of every stage were `stale-rank-file`s). The size is read from the other stages'
model states, else from the optimizer files' partition count. Real fixtures of
tests/fixtures/parallel/ (pp x dp and pp x tp x dp), rewritten by their pickle's opcodes."""

from __future__ import annotations

import pickle
import pickletools
import shutil
from pathlib import Path

import damage as D
import pytest
import safetensors.torch
import torch
from conftest import FIXTURES, run_zinspect

from zinspect.core import open_checkpoint
from zinspect.core.validate import validate

PARALLEL = FIXTURES / "parallel"
TAG = "global_step2"


def forge_dp_world_size(path: Path, value) -> None:
    """`dp_world_size` of the model states at `path` becomes `value` (its pickle's int opcode
    replaced; every CRC stays valid)."""
    raw = D.pickle_of(path)
    ops = list(pickletools.genops(raw))
    at = next(i for i, (op, arg, _) in enumerate(ops)
              if op.name.endswith("UNICODE") and arg == "dp_world_size")
    i = next(j for j in range(at + 1, len(ops)) if "PUT" not in ops[j][0].name and
             ops[j][0].name != "MEMOIZE")
    assert ops[i][0].name.startswith("BININT"), ops[i]
    # the opcode pushing `value` (a str without the BINPUT pickle.dumps adds: memo 0 is taken)
    new = b"X" + len(value).to_bytes(4, "little") + value.encode() if isinstance(value, str) \
        else pickle.dumps(value, protocol=2)[2:-1]
    D.rewrite_pickle(path, raw[:ops[i][2]] + new + raw[ops[i + 1][2]:])


def forged(tmp_path: Path, name: str, value, files: list[str]) -> Path:
    root = tmp_path / name
    shutil.copytree(PARALLEL / name, root, ignore=shutil.ignore_patterns("reference_*"))
    for leaf in files:
        forge_dp_world_size(root / TAG / leaf, value)
    return root


def errors(c) -> list[tuple[str, str | None]]:
    return sorted((f.code, f.file) for f in c.findings if f.severity == "error")


@pytest.mark.parametrize("value, said", [(0, "0"), (-2, "-2"), (True, "True"), ("2", "a str")])
@pytest.mark.parametrize("name, leaf", [("pp2_dp2_s1_fp32", "mp_rank_00_model_states.pt"),
                                        ("pp2_dp2_s1_bf16_pmd", "mp_rank_01_model_states.pt"),
                                        ("pp2_tp2_dp2_s1_fp32", "mp_rank_00_model_states.pt"),
                                        ("pp2_tp2_dp2_s1_fp32", "mp_rank_03_model_states.pt")])
def test_the_forged_field_is_named_and_no_real_file_is_stale(tmp_path, name, leaf, value, said):
    c = open_checkpoint(forged(tmp_path, name, value, [leaf]))
    validate(c)
    assert errors(c) == [("world-size-mismatch", leaf)]
    (f,) = [f for f in c.findings if f.code == "world-size-mismatch"]
    assert f.message.startswith(f"{leaf}: its dp_world_size is {said}, not a data-parallel "
                                "size; the checkpoint is read with 2 data-parallel ranks, as the "
                                "other model-states files record")
    assert "restore this file from a copy" in f.hint
    assert c.topology.dp == 2
    assert not any(f.code == "stale-rank-file" for f in c.findings)


def test_every_stage_forged_reads_the_optimizer_files_partition_count(tmp_path):
    leaves = ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    c = open_checkpoint(forged(tmp_path, "pp2_dp2_s1_fp32", 0, leaves))
    assert errors(c) == [("world-size-mismatch", leaf) for leaf in leaves]
    assert all(f.message.endswith("as the optimizer files are partitioned") for f in c.findings)
    assert (c.topology.dp, c.world_size) == (2, 4)


def test_a_zero0_pipeline_without_optimizer_files_falls_back_to_one_rank(tmp_path):
    leaves = [f"mp_rank_{s:02d}_model_states.pt" for s in range(3)]
    c = open_checkpoint(forged(tmp_path, "pp3_dp1_s0_fp32", -2, leaves))
    assert errors(c) == [("world-size-mismatch", leaf) for leaf in leaves]
    assert all("read with 1 data-parallel rank, as no file records a size" in f.message
               for f in c.findings if f.code == "world-size-mismatch")


def test_a_plausible_forged_size_on_stage_0_is_outvoted_by_the_partition_count(tmp_path):
    """Stage 0 says 1, stage 1 says 2: a tie the optimizer files (partitioned over 2) break, so
    stage 0 is the file named, and the dp-1 files are read, not stale."""
    c = open_checkpoint(forged(tmp_path, "pp2_dp2_s1_fp32", 1, ["mp_rank_00_model_states.pt"]))
    assert errors(c) == [("world-size-mismatch", "mp_rank_00_model_states.pt")]
    assert c.topology.dp == 2


@pytest.mark.parametrize("value", [0, True])
def test_validate_errors_and_salvage_writes_the_reference_bit_for_bit(tmp_path, value):
    name = "pp2_tp2_dp2_s1_fp32"
    root = forged(tmp_path, name, value, ["mp_rank_00_model_states.pt"])
    r = run_zinspect("validate", root)
    assert r.returncode == 1 and "dp_world_size is" in r.stdout, r.stdout + r.stderr
    assert run_zinspect("merge", root, tmp_path / "plain").returncode != 0
    r = run_zinspect("merge", root, tmp_path / "out", "--salvage", "--max-shard-size", "0")
    assert "Traceback" not in r.stderr, r.stderr
    (out,) = sorted((tmp_path / "out").glob("*.safetensors"))
    got = safetensors.torch.load_file(str(out))
    ref = torch.load(PARALLEL / name / "reference_fp32.pt", weights_only=True)
    assert set(got) == set(ref)
    for k, t in ref.items():
        assert torch.equal(got[k].view(torch.uint8), t.contiguous().view(torch.uint8)), k
