"""`validate --deep` compares the copies of a param the merge compares (issue 10): a
replicated tensor-parallel param's other tp ranks and a tied param's other pipeline stages,
with the merge's codes and words ("tp-replica-drift" / "tied-copy-drift", the largest
difference), on the real AutoTP and pipeline fixtures and damaged copies of them."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from conftest import FIXTURES, run_zinspect
from damage import record_holding, set_crc
from test_pipeline_copies import PIPELINES, TIED, drifted_copy

from zinspect.core import open_checkpoint
from zinspect.core.deep import deep_check
from zinspect.core.merge import merge
from zinspect.core.plan import plan_merge

DRIFT_CODES = {"tp-replica-drift", "tied-copy-drift"}
PARALLEL = sorted(p.parent.relative_to(FIXTURES).as_posix() for pattern in
                  ("parallel/*/manifest.json", "tp_extra/*/manifest.json")
                  for p in FIXTURES.glob(pattern))
#: AutoTP runs with replicated params (norms, biases) on every tp rank
REPLICATED = ["parallel/tp2_dp2_s1_toy", "parallel/tp2_dp2_s2_toy", "parallel/tp2_dp2_s3_toy",
              "parallel/tp2_dp2_s2_llama_bf16_tied", "tp_extra/tp4_dp1_s1_llama_bf16_tied_vocab63"]
NORM = "model.norm.weight"


def compared(ckpt) -> dict[str, set[int]]:
    """name -> the tp ranks / stages whose copies the merge plan compares."""
    return {t.name: {m.replica for m in t.mirrors}
            for t in plan_merge(ckpt, salvage=True).tensors if t.mirrors}


@pytest.mark.parametrize("name", PARALLEL)
def test_copies_that_agree_give_no_drift(name):
    ckpt = open_checkpoint(FIXTURES / name)
    assert not DRIFT_CODES & {f.code for f in deep_check(ckpt)}


@pytest.mark.parametrize("name", REPLICATED)
def test_the_replicas_are_compared_on_every_other_tp_rank(name):
    ckpt = open_checkpoint(FIXTURES / name)
    assert ckpt.topology.tp > 1
    assert compared(ckpt)[NORM] == set(range(1, ckpt.topology.tp))


def drifted_replica(tmp_path, name: str = "parallel/tp2_dp2_s2_toy", by: float = 0.25):
    """A copy whose tp rank 1 fp32 master of the replicated final norm is `by` off at its 4th
    element, the record's zip CRC updated (the bytes are as saved: a drifted run, not a
    corrupt file); (root, the difference as float32 arithmetic gives it)."""
    import numpy as np

    root = tmp_path / name.split("/")[-1]
    shutil.copytree(FIXTURES / name, root)
    ckpt = open_checkpoint(root)
    frag = next(f for f in ckpt.params[NORM].fragments if f.shard == 1 and f.numel >= 4)
    path = ckpt.path / frag.file
    at = frag.offset + 12
    with open(path, "r+b") as fh:
        fh.seek(at)
        old = struct.unpack("<f", fh.read(4))[0]
        fh.seek(at)
        fh.write(struct.pack("<f", old + by))
    set_crc(path, record_holding(path, at)[0].split("/", 1)[1])
    assert open_checkpoint(root).findings == []  # only reading the values can see it
    return root, float(np.float32(np.float32(old) + np.float32(by)) - np.float32(old))


def test_a_drifted_replica_is_the_merges_finding_with_the_max_difference(tmp_path):
    root, want = drifted_replica(tmp_path)
    found = deep_check(open_checkpoint(root))
    assert [(f.code, f.param, f.severity) for f in found] == \
        [("tp-replica-drift", NORM, "warning")]
    assert found[0].message == (f"{NORM}: replicated on every tp rank, but tp rank(s) 1 differ "
                                f"from the copy written by up to {want:.6g}")
    merged = merge(open_checkpoint(root), tmp_path / "out", hf_files=False)
    assert [f.to_json() for f in merged.findings] == [f.to_json() for f in found]


def test_validate_deep_reports_it_in_the_cli(tmp_path):
    root, want = drifted_replica(tmp_path)
    r = run_zinspect("validate", root, "--deep", "--json")
    findings = json.loads(r.stdout)["findings"]
    drift = [f for f in findings if f["code"] in DRIFT_CODES]
    assert [(f["code"], f["param"]) for f in drift] == [("tp-replica-drift", NORM)]
    assert f"tp rank(s) 1 differ from the copy written by up to {want:.6g}" in drift[0]["message"]
    assert r.returncode == 0, r.stderr  # a warning: validate exits 1 on errors only
    assert "tp-replica-drift" not in run_zinspect("validate", root, "--json").stdout


def test_a_drifted_tied_stage_copy_is_the_merges_finding_too(tmp_path):
    root, want = drifted_copy(tmp_path, PIPELINES[0])
    found = [f for f in deep_check(open_checkpoint(root)) if f.code in DRIFT_CODES]
    assert [(f.code, f.param) for f in found] == [("tied-copy-drift", TIED)]
    assert f"pipeline stage(s) 1 differ from the copy written by up to {want:.6g}" in \
        found[0].message
