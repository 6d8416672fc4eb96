"""`zinspect validate --deep`: zip CRCs of every record and NaN/Inf counts per param, streamed.

Damage is written at byte offsets taken from the zip directory (for records) and from the
model's fragments (for param values); the expected counts are what was written.
"""

from __future__ import annotations

import json
import struct
import zipfile

import damage as D
import pytest
from conftest import fixture_names, run_zinspect, tag_dir

from zinspect.core import open_checkpoint
from zinspect.core.deep import count_nonfinite, deep_check
from zinspect.errors import MergeCancelled

TIMEOUT = 60
DEEP_CODES = {"crc-mismatch", "record-unreadable", "nan-values", "inf-values", "crc-unavailable",
              "values-unchecked"}
NAN32, INF32, NINF32 = struct.pack("<I", 0x7FC00000), struct.pack("<f", float("inf")), \
    struct.pack("<f", float("-inf"))


def codes(findings) -> list[str]:
    return sorted(f.code for f in findings)


@pytest.mark.parametrize("name", fixture_names)
def test_clean_fixtures_have_no_deep_findings(name):
    ckpt = open_checkpoint(tag_dir(name))
    assert deep_check(ckpt) == []


def test_clean_fixture_cli(tmp_path):
    r = run_zinspect("validate", tag_dir("s3_w4_bf16"), "--deep", "--json", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert not DEEP_CODES & {f["code"] for f in json.loads(r.stdout)["findings"]}


def _storage_record(path, not_key=None) -> tuple[str, int, int]:
    """(record name, data offset, size) of the largest tensor record of a torch.save zip."""
    with zipfile.ZipFile(path) as zf:
        infos = [z for z in zf.infolist() if "/data/" in z.filename and
                 z.filename.rsplit("/", 1)[-1] != not_key]
    zi = max(infos, key=lambda z: z.file_size)
    off, size = D.zip_entry(path, zi.filename.split("/", 1)[1])
    return zi.filename, off, size


def test_flipped_bytes_in_a_record_fail_the_crc(tmp_path):
    """Bytes changed inside a tensor record (not the pickle): the metadata checks cannot see it,
    the deep check names the file and the record."""
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    victim = root / D.TAG / D.optim_name(1)
    record, off, size = _storage_record(victim)
    D.flip(victim, off + size // 2, 4)
    r = run_zinspect("validate", root, "--json", timeout=TIMEOUT)
    assert r.returncode == 0, "the metadata alone should not notice"
    r = run_zinspect("validate", root, "--deep", "--json", timeout=TIMEOUT)
    assert r.returncode == 1, r.stderr
    found = [f for f in json.loads(r.stdout)["findings"] if f["code"] in DEEP_CODES]
    assert [f["code"] for f in found] == ["crc-mismatch"], found
    assert found[0]["file"] == D.optim_name(1) and found[0]["rank"] == 1
    assert found[0]["severity"] == "error" and record in found[0]["message"]


def _poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_nan_and_inf_in_fp32_masters(tmp_path):
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    ckpt = open_checkpoint(root)
    p = ckpt.params["encoder.cube"]
    frag = next(f for f in p.fragments if f.numel >= 4)
    assert frag.dtype == "float32" and frag.source == "master"
    _poke(ckpt.path / frag.file, frag.offset, NAN32 + INF32 + NINF32)
    r = run_zinspect("validate", root, "--deep", "--json", timeout=TIMEOUT)
    assert r.returncode == 1, r.stderr
    found = {f["code"]: f for f in json.loads(r.stdout)["findings"] if f["code"] in DEEP_CODES}
    assert set(found) == {"crc-mismatch", "nan-values", "inf-values"}
    assert found["crc-mismatch"]["file"] == frag.file
    for code, count in (("nan-values", 1), ("inf-values", 2)):
        f = found[code]
        assert f["param"] == "encoder.cube" and f["file"] == frag.file and f["rank"] == frag.rank
        assert f["severity"] == "warning"
        assert f["message"].startswith(f"encoder.cube: {count} of {p.numel}")


def test_small_chunks_give_the_same_counts(tmp_path):
    """The values are read in chunks; NaNs on both sides of chunk borders are all counted."""
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    ckpt = open_checkpoint(root)
    p = ckpt.params["encoder.blocks.0.mlp.up.weight"]
    nans = 0
    for frag in p.fragments:
        for i in range(0, frag.numel, 7):
            _poke(ckpt.path / frag.file, frag.offset + 4 * i, NAN32)
            nans += 1
    big = {(f.code, f.message) for f in deep_check(open_checkpoint(root))}
    small = {(f.code, f.message) for f in deep_check(open_checkpoint(root), chunk=64)}
    assert big == small
    assert any(c == "nan-values" and m.startswith(f"{p.name}: {nans} of ") for c, m in big)


def test_nan_in_a_16bit_frozen_param(tmp_path):
    """fp16 frozen values (ZeRO-2 keeps them whole in the model states) are checked as fp16."""
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    ckpt = open_checkpoint(root)
    p = ckpt.params["encoder.frozen_proj.weight"]
    frag = p.fragments[0]
    assert p.frozen and frag.dtype == "float16"
    _poke(ckpt.path / frag.file, frag.offset + 2 * 3, struct.pack("<HH", 0x7E00, 0xFC00))
    found = {f.code: f for f in deep_check(open_checkpoint(root))}
    assert set(found) == {"crc-mismatch", "nan-values", "inf-values"}
    assert found["nan-values"].param == p.name and found["nan-values"].file == D.MODEL
    assert "1 of" in found["inf-values"].message


def test_nan_in_bf16_values(tmp_path):
    """bf16: the ZeRO-1 BF16_Optimizer fixture's frozen param lives only in the bf16 module."""
    root = D.copy_root(tmp_path, "s1_w2_bf16_bf16opt")
    ckpt = open_checkpoint(root)
    p = next(p for p in ckpt.owners() if p.fragments and p.fragments[0].dtype == "bfloat16")
    frag = p.fragments[0]
    _poke(ckpt.path / frag.file, frag.offset, struct.pack("<HHH", 0x7FC0, 0x7F80, 0xFF80))
    found = {f.code: f for f in deep_check(open_checkpoint(root))}
    assert found["nan-values"].param == p.name and "1 of" in found["nan-values"].message
    assert found["inf-values"].param == p.name and "2 of" in found["inf-values"].message


def test_tied_param_is_reported_once(tmp_path):
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    ckpt = open_checkpoint(root)
    assert ckpt.params["head.weight"].tied_to == "embed.weight"
    frag = ckpt.params["embed.weight"].fragments[0]
    _poke(ckpt.path / frag.file, frag.offset, NAN32)
    nan = [f for f in deep_check(open_checkpoint(root)) if f.code == "nan-values"]
    assert [f.param for f in nan] == ["embed.weight"]


def test_damaged_files_become_findings_not_exceptions(tmp_path):
    for i, (build, expect) in enumerate([
        (D.truncated_60, {"crc-unavailable"}),  # directory lost: nothing to check it against
        (D.not_a_zip, set()),  # unreadable: already an error of the metadata checks
        (D.malicious_pickle, {"values-unchecked"}),
    ]):
        tmp = tmp_path / str(i)
        tmp.mkdir()
        path = build(tmp, tmp / "M") if build is D.malicious_pickle else build(tmp)
        found = deep_check(open_checkpoint(path))
        assert {f.code for f in found} == expect, (build.__name__, found)


def test_file_shrunk_after_open_is_a_finding(tmp_path):
    """A file truncated between `open_checkpoint` and the deep check (a copy still running)."""
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    ckpt = open_checkpoint(root)
    D.truncate(root / D.TAG / D.optim_name(3), 5000)
    found = deep_check(ckpt)
    bad = [f for f in found if f.code == "record-unreadable"]
    assert bad and all(f.file == D.optim_name(3) for f in bad)


def test_zip_directory_damaged_after_open_is_a_finding(tmp_path):
    """The end record overwritten between `open_checkpoint` and the deep check: one finding for
    that file (its records cannot be listed), the other files are still checked."""
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    ckpt = open_checkpoint(root)
    victim = root / D.TAG / D.optim_name(2)
    _poke(victim, victim.stat().st_size - 22, bytes(22))
    found = deep_check(ckpt)
    bad = [f for f in found if f.code == "record-unreadable"]
    assert len(bad) == 1 and bad[0].file == D.optim_name(2) and bad[0].rank == 2
    assert "zip directory cannot be read now" in bad[0].message
    assert not [f for f in found if f.code == "crc-mismatch"]


def test_file_removed_after_open_is_a_finding(tmp_path):
    root = D.copy_root(tmp_path, "s2_w4_fp16")
    ckpt = open_checkpoint(root)
    (root / D.TAG / D.optim_name(1)).unlink()
    found = deep_check(ckpt)
    bad = [f for f in found if f.code == "record-unreadable"]
    assert bad and all(f.file == D.optim_name(1) for f in bad)
    assert "zip directory cannot be read now" in bad[0].message


def test_progress_and_cancel(tmp_path):
    ckpt = open_checkpoint(tag_dir("s3_w5_bf16_small"))
    calls = []
    deep_check(ckpt, progress=lambda done, total, name: calls.append((done, total, name)),
               chunk=4096)
    assert calls and calls[-1][0] == calls[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(MergeCancelled):
        deep_check(ckpt, should_stop=stop, chunk=4096)
    assert len(polls) == 3


# ------------------------------------------------------------------ the counter itself
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_count_nonfinite_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(20011, generator=g) * 100).to(getattr(torch, dtype))
    idx = torch.randperm(x.numel(), generator=g)
    x[idx[:37]] = float("nan")
    x[idx[37:60]] = float("inf")
    x[idx[60:71]] = float("-inf")
    x[idx[71]] = torch.finfo(x.dtype).max  # largest finite: exponent all ones but one bit
    x[idx[72]] = -torch.finfo(x.dtype).max
    x[idx[73]] = 0.0
    raw = bytes(x.view(torch.uint8).tolist())
    assert count_nonfinite(raw, dtype) == (37, 34)
    assert count_nonfinite(bytes(len(raw)), dtype) == (0, 0)


def test_count_nonfinite_ignores_ints():
    assert count_nonfinite(b"\xff" * 64, "int64") == (0, 0)


def test_a_rank_file_swapped_for_a_fifo_is_a_finding_not_a_hang(tmp_path):
    """The deep check opens each zip to read its directory: a FIFO put at a rank file's name
    after the checkpoint was opened is a located finding at once (O_NONBLOCK + fstat)."""
    import os
    import threading

    root = D.copy_root(tmp_path, "s3_w2_fp32")
    ckpt = open_checkpoint(root)
    victim = root / D.TAG / D.optim_name(1)
    victim.unlink()
    os.mkfifo(victim)
    found = []
    worker = threading.Thread(target=lambda: found.extend(deep_check(ckpt)), daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():
        os.close(os.open(victim, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the deep check blocked on a FIFO")
    bad = [f for f in found if f.file == D.optim_name(1) and f.code == "record-unreadable"]
    assert bad and "FIFO" in bad[0].message, [(f.code, f.message) for f in found]
