"""One root cause, one finding (issue 14.4) and one rule per check (issue 9): the params a lost
rank file leaves incomplete are folded under that file's finding; a partition of the wrong size
is reported once per rank and group; ZeRO-3 param_shapes a few elements off name the param
(issue 8.2). On damaged copies of the real fixtures."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter

import damage
import pytest

from zinspect.cli import main
from zinspect.core import open_checkpoint


def _run(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(map(str, args)))
    return code, out.getvalue()


@pytest.mark.parametrize(("build", "root_code", "rank"), [
    (damage.corrupt_pickle, "unreadable-file", 1),
    (damage.not_a_zip, "unreadable-file", 1),
    (damage.missing_optim, "missing-optimizer-file", 2),
    (damage.truncated_60, "truncated-file", 1),
    (damage.missing_model_z3, "missing-model-states-file", 2),
])
def test_knock_ons_of_a_lost_file_are_folded_under_it(tmp_path, build, root_code, rank):
    root = build(tmp_path)
    ckpt = open_checkpoint(root)
    roots = [f for f in ckpt.findings if f.code == root_code]
    knock = [f for f in ckpt.findings if f.code in ("param-coverage", "param-truncated")]
    assert len(roots) == 1 and knock
    assert all(f.cause == f"{root_code}: {roots[0].where()}" for f in knock)
    assert f"{len(knock)} param(s) lose elements with it: {knock[0].param}" in roots[0].message
    # human output: the file's finding, not the knock-ons (they stay in --verbose and --json)
    code, text = _run("validate", root)
    assert code == 1
    assert text.count("param-coverage") + text.count("param-truncated") == 0
    assert f"{len(knock)} knock-on finding(s)" in text
    code, text = _run("validate", root, "--verbose")
    assert text.count("param-coverage") + text.count("param-truncated") == len(knock)
    code, text = _run("validate", root, "--json")
    listed = [f for f in json.loads(text)["findings"] if f.get("cause")]
    assert [f["param"] for f in listed] == [f.param for f in knock]


def test_a_finding_without_a_lost_file_has_no_cause(tmp_path):
    """Params overlapped by a rank of another world size are not knock-ons of a lost file."""
    ckpt = open_checkpoint(damage.other_world_size(tmp_path))
    assert not any(f.cause for f in ckpt.findings)
    assert "cause" not in json.dumps([f.to_json() for f in ckpt.findings])


def test_partition_size_once_per_rank_and_group(tmp_path):
    """It was reported by the loader and by validate, with different numbers."""
    ckpt = open_checkpoint(damage.other_world_size(tmp_path))
    sizes = Counter((f.rank, f.group) for f in ckpt.findings if f.code == "partition-size")
    assert sizes == {(1, 0): 1, (1, 1): 1, (1, 2): 1}
    assert all("expected" in f.message for f in ckpt.findings if f.code == "partition-size")


def test_zero3_param_shapes_off_name_the_param(tmp_path):
    root = damage.shape_off_z3(tmp_path)
    forged = (root / "forged_param.txt").read_text()
    ckpt = open_checkpoint(root)
    found = [f for f in ckpt.findings if f.code == "partition-size"]
    assert [(f.param, f.rank, f.group) for f in found] == [(forged, None, 1)]
    assert f"{forged}'s declared shape (17) is off" in found[0].message
    assert found[0].file == damage.z3_model_name(0)
    # the param the shifted shares push out of the partitions is a knock-on of it
    assert all(f.cause == f"partition-size: {found[0].where()}"
               for f in ckpt.findings if f.code == "param-coverage")


def test_zero3_share_off_names_nobody_when_it_cannot_tell():
    from zinspect.core.partition import zero3_share_off

    assert zero3_share_off([("a", 17), ("b", 15), ("c", 60)], 4, 1) == "a"
    assert zero3_share_off([("a", 17), ("b", 17)], 4, 1) is None
    assert zero3_share_off([("a", 15), ("b", 58)], 4, -1) == "a"  # 15 -> 17, 58 -> 61
    assert zero3_share_off([], 4, 1) is None
