"""`zinspect reshard`: a ZeRO checkpoint rewritten for another data-parallel world size.

- every state moved, nothing changed: the fp32 masters (merged: bit-exact with the fixture's
  reference_fp32.pt) and Adam's moments (rebuilt from the files by torch alone) equal the source's;
- the layout is DeepSpeed's own: resharding to N gives the same partition sizes, paddings, slice
  mappings, param_shapes and sub-groups as the committed fixture DeepSpeed saved at N, and
  resharding to the same N gives back the source files' every tensor and value;
- refusals (other layouts, damaged input, an output that would clobber something);
- real DeepSpeed 0.19.8 engines at the new world size load the output with plain
  `engine.load_checkpoint()` and train a step (needs ZINSPECT_DS_PYTHON: tests/ds_resume/).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, copy_fixture, manifest, run_zinspect, tag_dir

from zinspect.core import open_checkpoint
from zinspect.core.reshard import reshard
from zinspect.core.torchzip import Opaque, TensorRef, read_torch_file
from zinspect.errors import MergeCancelled, NotMergeable, OutputError, UsageError

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent / "ds_resume"))
from expected import expected_states  # noqa: E402

PLAIN = ["s1_w2_bf16_bf16opt", "s1_w2_fp32", "s1_w4_bf16", "s2_w1_fp32", "s2_w2_bf16",
         "s2_w2_fp32_plain", "s2_w3_fp32_rr", "s2_w4_fp16", "s3_w2_fp32", "s3_w3_fp16_sub",
         "s3_w4_bf16", "s3_w5_bf16_small"]
DS_PYTHON = os.environ.get("ZINSPECT_DS_PYTHON")
RESUME = Path(__file__).parent / "ds_resume" / "resume_worker.py"


def _resharded(tmp_path: Path, name: str, n: int) -> Path:
    out = tmp_path / f"{name}_ws{n}"
    reshard(open_checkpoint(FIXTURES / name), out, n)
    return out


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("n", [1, 3])
def test_every_state_moves_unchanged(tmp_path, name, n):
    import zinspect

    src = open_checkpoint(FIXTURES / name)
    n = n if n != src.world_size else n + 1
    out = _resharded(tmp_path, name, n)
    got = open_checkpoint(out)
    assert (got.world_size, got.stage, got.layout) == (n, src.stage, src.layout)
    assert not got.errors, [f.message for f in got.errors]
    assert (out / "latest").read_text() == src.tag
    ref = torch.load(FIXTURES / name / "reference_fp32.pt", weights_only=True)
    merged = zinspect.get_fp32_state_dict(out)
    assert merged.keys() == ref.keys()
    for key, t in ref.items():
        assert merged[key].dtype == t.dtype and torch.equal(merged[key], t), key
    if not manifest(name)["ds_config"]["zero_optimization"].get("round_robin_gradients"):
        want, have = expected_states(str(tag_dir(name))), expected_states(str(out / src.tag))
        assert want.keys() == have.keys() and want
        for pname, states in want.items():
            for state, t in states.items():
                assert torch.equal(have[pname][state], t), (pname, state)


def _skeleton(path: Path, values: bool):
    """A file's pickle with each tensor as (dtype, shape[, sha1 of its bytes]) and each
    DeepSpeed record as (class, state)."""
    tf = read_torch_file(path)

    def walk(x):
        if isinstance(x, TensorRef):
            if not values:
                return ("tensor", x.shape)
            with open(path, "rb") as f:
                f.seek(tf.tensor_offset(x))
                return ("tensor", x.dtype, x.shape, hashlib.sha1(f.read(x.nbytes)).hexdigest())
        if isinstance(x, Opaque):
            return (x.qualname, walk(x.args), walk(x.state))
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x

    return walk(tf.obj)


@pytest.mark.parametrize("name", PLAIN)
def test_same_world_size_gives_back_the_source(tmp_path, name):
    """Every tensor byte and every pickled value of every file, DeepSpeed's records included,
    as the source holds them (ZeRO-3's fp32 and frozen partitions by shape: DeepSpeed leaves their padding
    uninitialized; their values are compared in test_every_state_moves_unchanged)."""
    src = open_checkpoint(FIXTURES / name)
    out = _resharded(tmp_path, name, src.world_size) / src.tag
    wanted = sorted(p.name for p in tag_dir(name).iterdir())
    assert sorted(p.name for p in out.iterdir()) == wanted
    for file in wanted:
        want, have = _skeleton(tag_dir(name) / file, True), _skeleton(out / file, True)
        osd = want.get("optimizer_state_dict") or {}
        if "fp32_flat_groups" in osd:  # ZeRO-3 leaves its padding uninitialized: we zero it
            shapes = _skeleton(out / file, False)["optimizer_state_dict"]["fp32_flat_groups"]
            osd["fp32_flat_groups"] = have["optimizer_state_dict"]["fp32_flat_groups"] = shapes
        if src.stage == 3 and want.get("frozen_param_fragments"):  # the same for frozen params
            want["frozen_param_fragments"] = have["frozen_param_fragments"] = \
                _skeleton(out / file, False)["frozen_param_fragments"]
        assert have == want, file


#: (source, N, the fixture DeepSpeed itself saved at N with the same model and groups)
TWINS = [("s1_w2_fp32", 4, "s1_w4_bf16"), ("s1_w4_bf16", 2, "s1_w2_fp32"),
         ("s2_w2_bf16", 4, "s2_w4_fp16"), ("s2_w4_fp16", 1, "s2_w1_fp32"),
         ("s3_w2_fp32", 4, "s3_w4_bf16"), ("s3_w4_bf16", 2, "s3_w2_fp32")]
LAYOUT_KEYS = ("single_partition_of_fp32_groups", "group_paddings", "partition_count",
               "param_slice_mappings", "fp32_flat_groups", "zero_stage")


@pytest.mark.parametrize("name,n,twin", TWINS)
def test_layout_is_what_deepspeed_saves_at_n(tmp_path, name, n, twin):
    assert_layout_of_deepspeed(_resharded(tmp_path, name, n) / manifest(name)["tag"], tag_dir(twin))


def assert_layout_of_deepspeed(out: Path, theirs: Path) -> None:
    """The files of `out` have the layout of those DeepSpeed saved in `theirs` (same model and
    groups at the same world size): names, partition sizes, paddings, counts, slice mappings,
    param_shapes, sub-groups, every tensor's shape."""
    assert sorted(p.name.removeprefix("bf16_") for p in out.iterdir()) == \
        sorted(p.name.removeprefix("bf16_") for p in theirs.iterdir())
    for ours in out.iterdir():
        twin_file = next(p for p in theirs.iterdir()
                         if p.name.removeprefix("bf16_") == ours.name.removeprefix("bf16_"))
        a, b = _skeleton(ours, False), _skeleton(twin_file, False)
        if "optimizer_state_dict" not in b:  # model states (and layer / expert files)
            for key in ("param_shapes", "dp_world_size", "frozen_param_shapes", "mp_world_size"):
                assert a.get(key) == b.get(key), (ours.name, key)
            assert (a.get("frozen_param_fragments") or {}).keys() == \
                (b.get("frozen_param_fragments") or {}).keys()
            for k, v in (b.get("frozen_param_fragments") or {}).items():
                assert a["frozen_param_fragments"][k] == v, k
            continue
        osd_a, osd_b = a["optimizer_state_dict"], b["optimizer_state_dict"]
        for key in LAYOUT_KEYS:
            assert osd_a.get(key) == osd_b.get(key), (ours.name, key)
        inner = "optimizer_state_dict" if "fp32_flat_groups" in osd_b else "base_optimizer_state"
        assert osd_a[inner]["state"] == osd_b[inner]["state"], ours.name
        assert [g["params"] for g in osd_a[inner]["param_groups"]] == \
            [g["params"] for g in osd_b[inner]["param_groups"]]


def test_sub_groups_follow_the_new_world_size(tmp_path):
    """sub_group_size counts per-rank elements: 3 -> 1 rank makes each sub-group hold fewer
    params, as DeepSpeed's _create_fp16_sub_groups does."""
    src = open_checkpoint(FIXTURES / "s3_w3_fp16_sub")
    got = open_checkpoint(_resharded(tmp_path, "s3_w3_fp16_sub", 1))
    assert [g.params for g in got.groups] != [g.params for g in src.groups]
    assert sum(len(g.params) for g in got.groups) == sum(len(g.params) for g in src.groups)
    assert len(got.groups) > len(src.groups)


@pytest.mark.parametrize("layout_fixture,n,words", [
    ("parallel/z0_fp32", 3, "a zero0 checkpoint needs no reshard"),
    ("parallel/pp2_dp1_s0_bf16", 4, "no DeepSpeed engine loads one"),
    ("parallel/pp3_dp1_s0_fp32", 6, "needs no reshard"),
    ("parallel/moe_ep2_w4_s0_fp32", 2, "needs no reshard")])
def test_what_cannot_be_resharded_is_refused_by_name(tmp_path, layout_fixture, n, words):
    r = run_zinspect("reshard", FIXTURES / layout_fixture, tmp_path / "out", "--world-size", str(n))
    assert r.returncode == 1, r.stderr
    assert words in r.stderr and "hint:" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout_fixture,n,words", [
    ("parallel/tp2_dp2_s2_toy", 3, "not a multiple of tp 2 = 2"),
    ("parallel/pp2_dp2_s1_fp32", 5, "not a multiple of pp 2 = 2"),
    ("parallel/moe_ep2_w4_s2_fp32", 3, "not a multiple of ep 2 = 2")])
def test_a_world_size_the_kept_degrees_do_not_divide_is_bad_usage(tmp_path, layout_fixture, n, words):
    """--world-size counts every rank (dp x tp x pp, as DeepSpeed's world size): tp, pp and ep
    are kept, so they must divide it."""
    r = run_zinspect("reshard", FIXTURES / layout_fixture, tmp_path / "out", "--world-size", str(n))
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "--world-size counts every rank" in r.stderr
    assert not (tmp_path / "out").exists()


def test_damaged_input_is_refused_and_nothing_written(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w2_bf16")
    victim = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:-3000])
    with pytest.raises(NotMergeable):
        reshard(open_checkpoint(tag), tmp_path / "out", 3)
    assert not (tmp_path / "out").exists()


def test_a_flipped_byte_fails_its_crc_and_nothing_is_written(tmp_path):
    tag = copy_fixture(tmp_path, "s2_w2_bf16")
    victim = tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    tf = read_torch_file(victim)
    ref = tf.obj["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["exp_avg"]
    data = bytearray(victim.read_bytes())
    data[tf.tensor_offset(ref) + 40] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(NotMergeable, match="CRC"):
        reshard(open_checkpoint(tag), tmp_path / "out", 3)
    assert not (tmp_path / "out" / "latest").exists()
    assert not any((tmp_path / "out").rglob("*.pt"))


def test_output_places_that_would_clobber_are_refused(tmp_path):
    ckpt = open_checkpoint(FIXTURES / "s2_w2_bf16")
    with pytest.raises(OutputError):
        reshard(ckpt, FIXTURES / "s2_w2_bf16", 3)  # the checkpoint's own root
    out = tmp_path / "out"
    reshard(ckpt, out, 3)
    with pytest.raises(OutputError, match="latest"):
        reshard(ckpt, out, 4)
    reshard(ckpt, out, 4, force=True)
    assert open_checkpoint(out).world_size == 4
    with pytest.raises(UsageError):
        reshard(ckpt, tmp_path / "zero", 0)


def test_cancel_leaves_nothing(tmp_path):
    with pytest.raises(MergeCancelled):
        reshard(open_checkpoint(FIXTURES / "s3_w2_fp32"), tmp_path / "out", 3,
                should_stop=lambda: True)
    assert not (tmp_path / "out" / "latest").exists()
    assert not any((tmp_path / "out").rglob("*"))


def test_cli_json_and_exit_codes(tmp_path):
    r = run_zinspect("reshard", FIXTURES / "s3_w2_fp32", tmp_path / "o", "--world-size", "3",
                     "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["world_size"] == 3 and res["source_world_size"] == 2 and not res["unverified_records"]
    assert res["verified_records"] > 0
    assert len(res["files"]) == 6
    r = run_zinspect("reshard", FIXTURES / "s3_w2_fp32", tmp_path / "o", "--world-size", "3")
    assert r.returncode == 2 and "--force" in r.stderr


# ------------------------------------------------------------------ real DeepSpeed resumes
@functools.cache
def _cpu_builds_fp16_engines() -> bool:
    """DeepSpeed's CPU accelerator builds an fp16 engine only where torch's mkldnn does fp16 on
    this CPU (it did on the Intel hosts of earlier sessions; an AMD EPYC host raises 'Type fp16
    is not supported on your device')."""
    code = "from deepspeed.accelerator import get_accelerator as g; print(g().is_fp16_supported())"
    p = subprocess.run([DS_PYTHON, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return p.stdout.strip().splitlines()[-1:] == ["True"]


def skip_unless_engines_build(name: str) -> None:
    """Skip a real-engine resume of fixture `name` that this host's DeepSpeed cannot start (an
    fp16 run where the CPU does no fp16); what zinspect wrote is checked by the other tests."""
    if manifest(name).get("dtype") == "fp16" and not _cpu_builds_fp16_engines():
        pytest.skip(f"{name}: DeepSpeed cannot build an fp16 engine on this host's CPU")


def ds_resume(tmp_path: Path, name: str, ckpt_dir: Path, n: int, universal: bool = False) -> dict:
    """Start n real DeepSpeed engines on `ckpt_dir`; the worker's JSON result."""
    skip_unless_engines_build(name)
    result = tmp_path / "result.json"
    cmd = [DS_PYTHON, str(RESUME), "--ckpt", str(ckpt_dir), "--source", str(tag_dir(name)),
           "--manifest", str(FIXTURES / name / "manifest.json"), "--world-size", str(n),
           "--result", str(result)] + (["--universal"] if universal else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0 and result.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(result.read_text())


needs_deepspeed = pytest.mark.skipif(
    not DS_PYTHON, reason="set ZINSPECT_DS_PYTHON to a python with deepspeed==0.19.8 "
                          "(.ci/run makes .dsvenv) to resume in real DeepSpeed engines")


@needs_deepspeed
@pytest.mark.parametrize("name,n", [("s2_w2_bf16", 3), ("s3_w3_fp16_sub", 2),
                                    ("s1_w2_bf16_bf16opt", 1), ("parallel/offload_s3_w2", 1)])
def test_deepspeed_resumes_at_the_new_world_size(tmp_path, name, n):
    src = open_checkpoint(FIXTURES / name)
    res = ds_resume(tmp_path, name, _resharded(tmp_path, name, n), n)
    trainable = [p for p in src.params.values() if not p.frozen and not p.tied_to]
    frozen = [p.name for p in src.params.values() if p.frozen and not p.tied_to]
    assert res["loaded"] and res["global_steps"] == manifest(name)["global_steps"]
    assert res["compared"] == 3 * len(trainable) and frozen
    assert res["mismatches"] == [] and res["missing"] == []
    assert res["frozen_differ"] == [] and res["frozen_restored"] == frozen
    assert res["loss_finite"] and res["steps_after"] == res["global_steps"] + 1


@pytest.mark.parametrize("zip64_from", [0xFFFFFFFF, 64])
def test_torchsave_files_read_back_in_torch_zipfile_and_zinspect(tmp_path, monkeypatch, zip64_from):
    """The writer's zip (64-byte aligned records, CRCs, zip64 fields where sizes or offsets
    need them: forced here from 64 bytes on) is what zipfile, torch.load and torchzip read."""
    import struct
    import zipfile

    from zinspect.core import torchsave, zipwrite
    from zinspect.core.torchzip import ZeroStageEnum

    monkeypatch.setattr(zipwrite, "ZIP64_FROM", zip64_from)
    src = tmp_path / "src.bin"
    src.write_bytes(struct.pack("<8f", *range(8)) + bytes(range(200)))
    out = torchsave.OutFile("file.pt")
    ops: list = []
    torchsave.add_piece(ops, torchsave.Piece(str(src), 0, 16))
    torchsave.add_piece(ops, torchsave.Piece(str(src), 16, 16))  # merged with the first
    torchsave.add_zeros(ops, 8)
    assert len(ops) == 2
    t = out.tensor("float32", (2, 5), ops)
    out.obj = {"t": t, "view": torchsave.NewTensor(t.storage, torchsave.Size((3,)), 2),
               "stage": ZeroStageEnum(2), "shape": torchsave.Size((4, 5))}
    files = [out]
    sink = torchsave.FilesSink(files, lambda name: os.open(tmp_path / name, os.O_WRONLY |
                                                           os.O_CREAT, 0o644),
                               lambda name, fd: os.close(fd))
    for tensor in torchsave.stream_tensors(files):
        for piece in tensor.pieces:
            with open(piece.path, "rb") as f:
                f.seek(piece.offset)
                sink(memoryview(f.read(piece.nbytes)))
    sink.finish()
    path = tmp_path / "file.pt"
    with zipfile.ZipFile(path) as z:  # every CRC checked
        assert z.testzip() is None
        assert [i.filename for i in z.infolist()][:2] == ["file/data.pkl", "file/.format_version"]
    tf = read_torch_file(path)
    assert tf.tensor_offset(tf.obj["t"]) % 64 == 0
    assert tf.obj["stage"] == 2 and tf.obj["shape"] == (4, 5)
    got = torch.load(path, weights_only=False, pickle_module=_stub_pickle())
    assert torch.equal(got["t"], torch.tensor([[0., 1, 2, 3, 4], [5, 6, 7, 0, 0]]))
    assert torch.equal(got["view"], torch.tensor([2., 3, 4])) and got["shape"] == torch.Size([4, 5])


def _stub_pickle():
    from expected import STUB_PICKLE

    return STUB_PICKLE


def test_the_public_api_reshards(tmp_path):
    """zinspect.reshard is the CLI's engine: the result says where and for how many ranks, and
    the output merges to the reference at the new world size."""
    import zinspect

    result = zinspect.reshard(FIXTURES / "s2_w2_bf16", tmp_path / "out", world_size=3)
    assert result.to_json()["world_size"] == 3
    got = open_checkpoint(tmp_path / "out")
    assert (got.world_size, got.stage) == (3, 2) and not got.errors
    ref = torch.load(FIXTURES / "s2_w2_bf16" / "reference_fp32.pt", weights_only=True)
    merged = zinspect.get_fp32_state_dict(tmp_path / "out")
    assert all(torch.equal(merged[k], t) for k, t in ref.items()) and merged.keys() == ref.keys()


def test_crc32_combine_is_zlibs():
    import random
    import zlib

    from zinspect.core.reshard_verify import crc32_combine

    rng = random.Random(3)
    for n in (0, 1, 7, 4096, 100_003):
        a, b = rng.randbytes(rng.randrange(1, 999)), rng.randbytes(n)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n) == zlib.crc32(a + b), n


def test_records_read_out_of_order_are_checked_whole_at_any_size(tmp_path, monkeypatch):
    """ZeRO-3 at another size reads each old rank's flat partition interleaved across two new
    files. The in-order check of a merge re-reads such a record only when it is small
    (verify.RECHECK_BYTES, 16 MiB) and names a bigger one unverified: lowered to 0 here, what
    every record of a real checkpoint is. The reshard's check joins the pieces' CRCs in any
    order: nothing unverified, and a flipped byte in such a record is found."""
    from zinspect.core import verify

    monkeypatch.setattr(verify, "RECHECK_BYTES", 0)
    monkeypatch.setattr(verify, "GAP_BYTES", 0)
    result = reshard(open_checkpoint(FIXTURES / "s3_w2_fp32"), tmp_path / "ok", 3)
    assert result.unverified == [] and result.verified > 0
    tag = copy_fixture(tmp_path, "s3_w2_fp32")
    victim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    tf = read_torch_file(victim)
    ref = tf.obj["optimizer_state_dict"]["fp32_flat_groups"][0]
    data = bytearray(victim.read_bytes())
    data[tf.tensor_offset(ref) + 4 * (ref.numel - 3)] ^= 0x10  # near its end: read last
    victim.write_bytes(bytes(data))
    with pytest.raises(NotMergeable, match="CRC"):
        reshard(open_checkpoint(tag), tmp_path / "out", 3)
    assert not (tmp_path / "out" / "latest").exists()
