"""The merge against DeepSpeed's true fp32 master weights (reference_fp32.pt), bit for bit."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, copy_fixture, manifest, run_zinspect
from safetensors import safe_open
from safetensors.torch import load_file

import zinspect
from zinspect.core import open_checkpoint
from zinspect.core.merge import merge, parse_size, plan_merge
from zinspect.core.selection import Selection
from zinspect.errors import MergeCancelled, NotMergeable, OutputError, UsageError


def reference(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8),
                       b.contiguous().view(-1).view(torch.uint8))


def read_output(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        if f.suffix == ".safetensors":
            out.update(load_file(f))
        elif f.suffix == ".bin":
            out.update(torch.load(f, weights_only=True))
    return out


def assert_matches_reference(got: dict, ref: dict, leave_out: set[str] = frozenset()) -> None:
    assert set(got) == set(ref) - leave_out
    wrong = [k for k in got if not same_bits(got[k], ref[k])]
    assert not wrong, f"differ from reference: {wrong}"


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("shard", [None, "3KB"])
def test_every_fixture_merges_bit_exact(fixture_name, fmt, shard, tmp_path):
    ckpt = open_checkpoint(FIXTURES / fixture_name)
    # hf_files=False: the plain state dict (the hf_* fixtures' HF folders: test_hf_outputs.py)
    result = merge(ckpt, tmp_path / "out", fmt=fmt, max_shard_size=shard, hf_files=False)
    assert_matches_reference(read_output(result.files), reference(fixture_name))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(p.name for p in result.files)  # no temporary files left
    if shard:
        index_name = "model.safetensors.index.json" if fmt == "safetensors" else \
            "pytorch_model.bin.index.json"
        index = json.loads((tmp_path / "out" / index_name).read_text())
        assert set(index["weight_map"]) == set(reference(fixture_name))
        shards = {p.name: p for p in result.files if p.name != index_name}
        assert set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == result.bytes
        for shard_name, path in shards.items():  # no shard holds bytes of another
            held = set(read_output([path]))
            assert held == {k for k, v in index["weight_map"].items() if v == shard_name}
    else:
        assert len(result.files) == 1


def test_tied_params_are_written_under_both_names(tmp_path):
    result = merge(open_checkpoint(FIXTURES / "s3_w4_bf16"), tmp_path / "o")
    got = read_output(result.files)
    assert same_bits(got["head.weight"], got["embed.weight"])


def test_pt_output_keeps_tied_params_shared(tmp_path):
    result = merge(open_checkpoint(FIXTURES / "s2_w2_bf16"), tmp_path / "o", fmt="pt")
    got = torch.load(result.files[0], weights_only=True)
    assert got["head.weight"].data_ptr() == got["embed.weight"].data_ptr()


def test_stage1_frozen_params_recovered_and_int_buffers_kept(tmp_path):
    result = merge(open_checkpoint(FIXTURES / "s1_w4_bf16"), tmp_path / "o")
    got = read_output(result.files)
    assert got["encoder.frozen_proj.weight"].dtype == torch.float32
    assert got["bn.num_batches_tracked"].dtype == torch.int64


def test_output_loads_strictly_into_the_model(tmp_path):
    ref = reference("s3_w4_bf16")
    module = torch.nn.Module()
    for name, value in ref.items():  # a module with exactly the checkpoint's state_dict keys
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(leaf, torch.zeros_like(value))
    zinspect.load_into(module, FIXTURES / "s3_w4_bf16", strict=True)
    assert same_bits(module.state_dict()["encoder.cube"], ref["encoder.cube"])


def test_get_fp32_state_dict_api(fixture_name):
    sd = zinspect.get_fp32_state_dict(FIXTURES / fixture_name)
    assert_matches_reference(sd, reference(fixture_name))
    tied = manifest(fixture_name)["tied"]
    for alias, owner in tied.items():
        assert sd[alias] is sd[owner]


def test_exclusions(tmp_path):
    ckpt = open_checkpoint(FIXTURES / "s2_w4_fp16")
    sel = Selection(exclude={"head.bias"}, exclude_globs=["encoder.blocks.1.*"],
                    exclude_frozen=True)
    result = merge(ckpt, tmp_path / "o", selection=sel)
    ref = reference("s2_w4_fp16")
    gone = {"head.bias", "encoder.frozen_proj.weight"} | {
        k for k in ref if k.startswith("encoder.blocks.1.")}
    assert_matches_reference(read_output(result.files), ref, leave_out=gone)
    assert set(result.excluded) == gone


def test_plan_reads_only_the_fp32_partitions():
    ckpt = open_checkpoint(FIXTURES / "s3_w5_bf16_small")
    plan = plan_merge(ckpt)
    optim_bytes = sum(f.size for f in ckpt.files_of("optim"))
    # fp32 master + 2 Adam moments: the masters are about a third of the optimizer files
    assert plan.read_bytes < 0.4 * optim_bytes


def test_cancel_leaves_nothing(tmp_path):
    ckpt = open_checkpoint(FIXTURES / "s3_w5_bf16_small")
    calls = []
    with pytest.raises(MergeCancelled):
        merge(ckpt, tmp_path / "out", max_shard_size="50KB",
              progress=lambda d, t, n: calls.append(d), should_stop=lambda: len(calls) > 0)
    assert calls, "the merge never reported progress"
    assert not (tmp_path / "out").exists()


def test_cancel_in_existing_dir_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    ckpt = open_checkpoint(FIXTURES / "s3_w2_fp32")
    with pytest.raises(MergeCancelled):
        merge(ckpt, out, force=True, should_stop=lambda: True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_refuses_non_empty_dir_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    ckpt = open_checkpoint(FIXTURES / "s3_w2_fp32")
    with pytest.raises(OutputError, match="already holds model.safetensors"):
        merge(ckpt, out)
    assert (out / "model.safetensors").read_bytes() == b"old"
    merge(ckpt, out, force=True)
    assert_matches_reference(load_file(out / "model.safetensors"), reference("s3_w2_fp32"))


def test_refuses_to_write_inside_the_tag_dir(tmp_path):
    tag = copy_fixture(tmp_path, "s3_w2_fp32")
    with pytest.raises(OutputError, match="inside the checkpoint"):
        merge(open_checkpoint(tag), tag / "merged")
    assert not (tag / "merged").exists()


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    ckpt = open_checkpoint(FIXTURES / "s3_w5_bf16_small")
    real_write, written = os.write, []

    def filling_write(fd, data):
        if written and sum(written) > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, data)
        written.append(n)
        return n

    monkeypatch.setattr(os, "write", filling_write)
    with pytest.raises(OutputError, match="disk is full"):
        merge(ckpt, tmp_path / "out", max_shard_size="100KB")
    assert sum(written) > 100_000
    assert not (tmp_path / "out").exists()


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OutputError, match="only 1,000 are free"):
        merge(open_checkpoint(FIXTURES / "s3_w2_fp32"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_validation_errors_refuse_the_merge(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w4_fp16")
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(NotMergeable, match="rank 2"):
        merge(open_checkpoint(tag), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("20KB") == 20_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500") == 500
    with pytest.raises(UsageError):
        parse_size("five gigs")


def test_safetensors_header_is_aligned_and_has_metadata(tmp_path):
    result = merge(open_checkpoint(FIXTURES / "s2_w2_bf16"), tmp_path / "o")
    raw = result.files[0].read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 64 == 0
    with safe_open(result.files[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("name", ["s3_w4_bf16", "s1_w2_fp32"])
def test_cli_merge_both_formats(tmp_path, name):
    for fmt, single in (("safetensors", "model.safetensors"), ("pt", "pytorch_model.bin")):
        out = tmp_path / fmt
        proc = run_zinspect("merge", FIXTURES / name, out, "--format", fmt, "--json")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert [Path(f).name for f in summary["files"]] == [single]
        assert_matches_reference(read_output([out / single]), reference(name))


def test_reader_threads_open_each_file_once(monkeypatch):
    """Four reader threads start on the same file: a slow open must not leave an fd behind."""
    import time

    from zinspect.core import stream

    plan = plan_merge(open_checkpoint(FIXTURES / "s3_w4_bf16"))
    real_open = os.open

    def slow_open(*args, **kwargs):
        time.sleep(0.005)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(stream.os, "open", slow_open)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        sink = stream.BufferSink(plan.tensors)
        stream.copy_tensors(plan.tensors, sink, stream.ProgressMeter(plan.total_bytes, None),
                            chunk=4096)
    assert len(os.listdir("/proc/self/fd")) == before


def test_too_many_open_files_raises_the_soft_limit(monkeypatch):
    """1024 rank files against a soft limit of 1024: the soft limit goes up to the hard one."""
    import resource

    from zinspect.core import stream

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 64)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    held = []
    try:
        while True:  # use up the descriptors
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        files = stream.SourceFiles()
        fd = files.fd(str(FIXTURES / "s3_w4_bf16" / "latest"))
        assert fd >= 0 and resource.getrlimit(resource.RLIMIT_NOFILE)[0] > low
        files.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- the writer registry (issue 9) ------------------------------------------------------------
def test_every_registered_writer_is_a_format_choice_and_in_help():
    from zinspect.core.writers import WRITERS

    r = run_zinspect("merge", "--help")
    assert r.returncode == 0
    assert "{" + ",".join(WRITERS) + "}" in r.stdout.replace("\n", "").replace(" ", "")
    for w in WRITERS.values():
        assert f"  {w.name}" in r.stdout, w.name
    assert set(WRITERS) >= {"safetensors", "pt", "universal"}


def test_a_dtype_the_writer_cannot_write_is_refused_before_anything(tmp_path):
    with pytest.raises(UsageError, match="universal writes fp32 only"):
        merge(open_checkpoint(FIXTURES / "s2_w2_bf16"), tmp_path / "o", fmt="universal",
              dtype="bf16")
    assert not (tmp_path / "o").exists()


def test_format_universal_writes_the_tree_and_says_what_it_leaves_out(tmp_path):
    out = tmp_path / "u"
    r = run_zinspect("merge", FIXTURES / "s2_w2_bf16", out, "--format", "universal", "--json")
    assert r.returncode == 0, r.stderr
    tag = (out / "latest_universal").read_text().strip()
    ref = reference("s2_w2_bf16")
    ckpt = open_checkpoint(FIXTURES / "s2_w2_bf16")
    trainable = [n for n, p in ckpt.params.items() if not p.frozen and not p.tied_to]
    for name in trainable:
        got = torch.load(out / tag / "zero" / name / "fp32.pt", weights_only=False)["param"]
        assert same_bits(got, ref[name]), name
    assert "frozen params and buffers" in r.stderr  # the universal load's blind spot, said
    assert json.loads(r.stdout)["format"] == "universal"


@pytest.mark.parametrize("args", [["--exclude", "encoder.cube"], ["--salvage"]])
def test_format_universal_refuses_what_it_cannot_honour(tmp_path, args):
    out = tmp_path / "u"
    r = run_zinspect("merge", FIXTURES / "s2_w2_bf16", out, "--format", "universal", *args)
    assert r.returncode == 2 and args[0] in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_previewed_size_is_what_the_plan_writes(dtype):
    """The app's size preview (plan.output_nbytes) follows the same dtype rule as the plan:
    16-bit floats for params and float buffers, int buffers as they are."""
    from zinspect.core.plan import output_nbytes

    ckpt = open_checkpoint(FIXTURES / "s2_w2_bf16")
    excluded = {"encoder.cube"}
    plan = plan_merge(ckpt, Selection(exclude_globs=["encoder.cube"]), dtype=dtype)
    assert output_nbytes(ckpt, excluded, dtype) == plan.total_bytes
    assert any(b.dtype == "int64" for b in ckpt.buffers.values())
