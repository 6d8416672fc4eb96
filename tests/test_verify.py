"""The verifying merge (issue 8, item 1): every zip record it reads whole is CRC-checked as it
streams, source files are pinned, NaN/Inf are counted per param; on real fixtures."""

from __future__ import annotations

import json

import damage as D
import pytest
import torch
from conftest import fixture_dirs, run_zinspect, tag_dir
from test_merge import assert_matches_reference, read_output, reference

import zinspect
from zinspect.core import open_checkpoint
from zinspect.core.deep import deep_check
from zinspect.core.merge import merge
from zinspect.core.verify import count_nonfinite
from zinspect.errors import NotMergeable

TIMEOUT = 120


def _params_in_record(root, file: str, record: tuple[str, int, int]) -> set[str]:
    """Params with a piece inside `record` of `file`, from the model (not from the merge)."""
    _, off, size = record
    ckpt = open_checkpoint(root)
    return {name for name, p in ckpt.params.items()
            if any(f.file == file and off <= f.offset < off + size for f in p.fragments)}


def _flipped(tmp_path):
    root = D.flipped_fp32_record(tmp_path)
    frag = next(f for f in open_checkpoint(root).params["encoder.cube"].fragments if f.rank == 1)
    record = D.record_holding(root / D.TAG / frag.file, frag.offset)
    return root, frag.file, record


def test_flipped_bytes_in_an_fp32_record_refuse_the_merge(tmp_path):
    root, file, record = _flipped(tmp_path)
    assert run_zinspect("validate", root, timeout=TIMEOUT).returncode == 0, \
        "the metadata alone does not see it: only the CRC does"
    out = tmp_path / "out"
    r = run_zinspect("merge", root, out, timeout=TIMEOUT)
    assert r.returncode == 1, r.stderr
    assert "CRC32" in r.stderr and file in r.stderr and record[0] in r.stderr
    assert "encoder.cube" in r.stderr  # the params it holds are named
    assert "Traceback" not in r.stderr
    assert not out.exists(), "nothing may be left"


def test_salvage_drops_exactly_the_params_of_the_bad_record(tmp_path):
    root, file, record = _flipped(tmp_path)
    in_record = _params_in_record(root, file, record)
    assert "encoder.cube" in in_record and len(in_record) < len(open_checkpoint(root).params)
    out = tmp_path / "out"
    r = run_zinspect("merge", root, out, "--salvage", "--json", timeout=TIMEOUT)
    assert r.returncode == 1, r.stderr  # dropped params: exit 1, as --salvage always does
    result = json.loads(r.stdout)
    assert set(result["dropped"]) == in_record
    assert all("CRC32" in why for why in result["dropped"].values())
    got = read_output([out / f for f in result["files"]])
    assert_matches_reference(got, reference("s3_w2_fp32"), leave_out=in_record)


def test_api_refuses_a_bad_record(tmp_path):
    root, _, _ = _flipped(tmp_path)
    with pytest.raises(NotMergeable, match="CRC32"):
        zinspect.get_fp32_state_dict(root)


def test_a_rank_file_rewritten_during_the_merge_fails_it(tmp_path):
    root = D.copy_root(tmp_path, "s3_w2_fp32")
    victim = root / D.TAG / D.optim_name(1)
    rewritten = []

    def progress(done, total, name):
        if not rewritten:  # the same bytes, written again in place: only the pin can tell
            data = victim.read_bytes()
            with open(victim, "r+b") as f:
                f.write(data)
            rewritten.append(True)

    out = tmp_path / "out"
    with pytest.raises(NotMergeable, match="changed while the merge read it") as e:
        merge(open_checkpoint(root), out, progress=progress)
    assert rewritten and D.optim_name(1) in e.value.message
    assert not out.exists()


def test_nan_in_a_master_is_a_warning_naming_the_param(tmp_path):
    root = D.nan_in_master(tmp_path)
    out = tmp_path / "out"
    r = run_zinspect("merge", root, out, "--json", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["nonfinite"] == {"encoder.cube": {"nan": 1, "inf": 1}}
    assert any(w.startswith("encoder.cube: ") for w in result["warnings"])
    assert "warning: encoder.cube: 1 NaN and 1 Inf" in r.stderr
    # reported as validate --deep, stats and diff report it (issue 13: the same codes)
    numel = open_checkpoint(root).params["encoder.cube"].numel
    assert [(f["code"], f["param"], f["message"]) for f in result["findings"]] == [
        ("nan-values", "encoder.cube", f"encoder.cube: 1 of {numel:,} values are NaN in the output"),
        ("inf-values", "encoder.cube", f"encoder.cube: 1 of {numel:,} values are Inf in the output")]
    assert (out / "model.safetensors").exists()
    deep = {f.code: f for f in deep_check(open_checkpoint(root))}  # the same counter
    assert set(deep) == {"nan-values", "inf-values"} and deep["nan-values"].param == "encoder.cube"


def test_strict_turns_nan_into_an_error(tmp_path):
    root = D.nan_in_master(tmp_path)
    out = tmp_path / "out"
    r = run_zinspect("merge", root, out, "--strict", timeout=TIMEOUT)
    assert r.returncode == 1, r.stderr
    assert "encoder.cube" in r.stderr and "--strict" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("fixture", [d.name for d in fixture_dirs])
def test_verified_merges_stay_bit_exact(tmp_path, fixture):
    ckpt = open_checkpoint(tag_dir(fixture))
    result = merge(ckpt, tmp_path / "out", hf_files=False)  # the plain state dict, every alias
    assert result.verified > 0 and not result.nonfinite
    got, ref = read_output(result.files), reference(fixture)
    tied = {n for n, p in ckpt.params.items() if p.tied_to}  # HF output may leave these out
    assert set(ref) - set(got) <= tied
    assert_matches_reference(got, ref, leave_out=set(ref) - set(got))


def test_padding_between_zero3_pieces_is_read_for_the_crc():
    """ZeRO-3 pads each param's last partition: those bytes are read too, so that the fp32
    records are checked whole instead of being named unverified."""
    result_ckpt = open_checkpoint(tag_dir("s3_w2_fp32"))
    from zinspect.core.plan import plan_merge
    from zinspect.core.verify import Verification

    v = Verification(plan_merge(result_ckpt).tensors)
    assert not v.unverified
    assert any(not s.sink for segs in v.segments.values() for s in segs)


def test_count_nonfinite_takes_views_and_bytes():
    raw = bytes(8) + bytes.fromhex("0000c07f") + bytes.fromhex("0000807f")
    assert count_nonfinite(raw, "float32") == count_nonfinite(memoryview(raw), "float32") == (1, 1)
    t = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.bfloat16)
    assert count_nonfinite(t.view(torch.uint8).numpy().tobytes(), "bfloat16") == (1, 1)


def _reversed_plan(root):
    """The merge plan of `root` with its tensors in reverse order: every fp32 record is then
    read out of order (as ZeRO-2 round robin's are)."""
    from dataclasses import replace

    from zinspect.core.plan import plan_merge

    plan = plan_merge(open_checkpoint(root))
    return replace(plan, tensors=plan.tensors[::-1])


def test_records_read_out_of_order_are_checked_by_a_second_read(tmp_path):
    from zinspect.core.verify import Verification

    v = Verification(_reversed_plan(tag_dir("s3_w2_fp32")).tensors)
    assert not v.unverified and v.checks
    result = merge(open_checkpoint(tag_dir("s3_w2_fp32")), tmp_path / "out", hf_files=False,
                   plan=_reversed_plan(tag_dir("s3_w2_fp32")))
    assert result.unverified == [] and result.verified == len(v.checks)
    assert_matches_reference(read_output(result.files), reference("s3_w2_fp32"))


def test_a_flipped_record_read_out_of_order_still_refuses(tmp_path):
    root, file, record = _flipped(tmp_path)
    with pytest.raises(NotMergeable, match="CRC32") as e:
        merge(open_checkpoint(root), tmp_path / "out", plan=_reversed_plan(root))
    assert file in e.value.message and record[0] in e.value.message
    assert not (tmp_path / "out").exists()


def test_only_records_over_the_recheck_size_are_named_unverified(tmp_path, monkeypatch):
    """Params left out leave large gaps: a record up to RECHECK_BYTES is read whole for its
    CRC, a bigger one is named (here the bound is lowered to below the fixture's records)."""
    from zinspect.core import verify
    from zinspect.core.selection import Selection

    monkeypatch.setattr(verify, "GAP_BYTES", 0)
    sel = Selection(exclude_globs=["encoder.blocks.*"])
    ckpt = open_checkpoint(tag_dir("s3_w2_fp32"))
    result = merge(ckpt, tmp_path / "a", hf_files=False, selection=sel)
    assert result.unverified == [] and result.verified
    monkeypatch.setattr(verify, "RECHECK_BYTES", 0)
    result = merge(ckpt, tmp_path / "b", hf_files=False, selection=sel)
    assert result.unverified and all(": " in r for r in result.unverified)


def test_a_rank_file_swapped_for_a_fifo_never_blocks_the_merge(tmp_path):
    """Between opening the checkpoint and the merge's reads, a rank file becomes a FIFO: the
    merge must refuse at once naming it (O_NONBLOCK + fstat), never wait for a writer."""
    import os
    import threading

    from zinspect.errors import UnreadableFile

    root = D.copy_root(tmp_path, "s3_w2_fp32")
    ckpt = open_checkpoint(root)
    victim = root / D.TAG / D.optim_name(1)
    victim.unlink()
    os.mkfifo(victim)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_try_merge(ckpt, tmp_path / "out")),
                              daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():  # unblock it before failing: open the FIFO for writing
        os.close(os.open(victim, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the merge blocked on a FIFO")
    assert isinstance(outcome[0], UnreadableFile), outcome
    assert D.optim_name(1) in outcome[0].message and "FIFO" in outcome[0].message
    assert not (tmp_path / "out").exists()


def _try_merge(ckpt, out):
    try:
        return merge(ckpt, out, hf_files=False)
    except Exception as e:  # noqa: BLE001 (the test looks at it)
        return e
