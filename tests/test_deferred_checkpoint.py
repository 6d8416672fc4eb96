"""The deferred pairs on a real DeepSpeed ZeRO-3 checkpoint (s3_w2_bf16_many: 2,651 params, made
by make_ds_checkpoints.py, buffers before and after the module's run): read the way a 300k-name
checkpoint is (its pickle through pickle_runs), `info --json` and `validate` leave the module
and param_shapes as lists, never inserted, and say exactly what they say when every pair is
inserted as read, or when the pickle is read the usual way; the merge is bit-exact."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES
from test_merge import assert_matches_reference, read_output, reference

from zinspect.core import load, open_checkpoint, pickle_bytes, torchzip, unpickle
from zinspect.core.merge import merge
from zinspect.core.unpickle import DeferredPairs
from zinspect.report_json import info_json

NAME = "s3_w2_bf16_many"


@pytest.fixture
def read(monkeypatch):
    """How the checkpoint is read ("runs": as a large pickle is, through pickle_runs, pairs
    deferred; "inserted": the same, each run's pairs inserted as set; "usual": as a pickle of
    its size is), and the model-states files the reads gave, by name."""
    files: dict = {}
    parse = load.read_torch_file

    def spied(path, memo=None):
        tf = parse(path, memo)
        files[path.name] = tf
        return tf
    monkeypatch.setattr(load, "read_torch_file", spied)

    chunk, memo, defer = torchzip.PICKLE_CHUNK_BYTES, pickle_bytes.PickleMemo.__init__.__defaults__, \
        unpickle.DEFER_AT_LEAST

    def setup(how: str) -> dict:
        large = how != "usual"
        monkeypatch.setattr(torchzip, "PICKLE_CHUNK_BYTES", 64 << 10 if large else chunk)
        monkeypatch.setattr(pickle_bytes.PickleMemo.__init__, "__defaults__",
                            (0, 0) if large else memo)
        monkeypatch.setattr(unpickle, "DEFER_AT_LEAST", 1 << 60 if how == "inserted" else defer)
        return files
    return setup


def _rank0(files: dict):
    return files["zero_pp_rank_0_mp_rank_00_model_states.pt"].obj


def test_the_fixture_is_read_through_the_runs_with_its_module_deferred(read):
    files = read("runs")
    ckpt = open_checkpoint(FIXTURES / NAME)
    report = json.dumps(info_json(ckpt))
    module = _rank0(files)["module"]
    assert type(module) is DeferredPairs  # neither validate nor the report inserted it
    assert dict.__len__(module) < 100 < len(module) == len(ckpt.buffers) + len(ckpt.params)
    assert ckpt.counts() == {"error": 0, "warning": 0, "info": 1} and '"int-buffers"' in report


@pytest.mark.parametrize("how", ["inserted", "usual"])
def test_info_and_validate_say_the_same_whether_the_pairs_are_deferred_or_not(read, how):
    got = info_json(open_checkpoint(FIXTURES / NAME))
    files = read("runs")  # (the usual read above; now the runs' read)
    deferred = info_json(open_checkpoint(FIXTURES / NAME))
    assert type(_rank0(files)["module"]) is DeferredPairs
    files.clear()
    read(how)
    other = info_json(open_checkpoint(FIXTURES / NAME))
    assert type(_rank0(files)["module"]) is unpickle.PickledOrderedDict
    assert deferred == other == got


def test_the_merge_from_a_deferred_module_is_bit_exact(read, tmp_path):
    read("runs")
    result = merge(open_checkpoint(FIXTURES / NAME), tmp_path / "out", hf_files=False)
    assert_matches_reference(read_output(result.files), reference(NAME))
