"""Tensor-parallel params in the plan and the stream (issue 10): dim-0 and dim-1 splits, vocab
padding left out, sub-params, splits on a later dim, replicated params compared across tp ranks.

The checkpoints here are built by hand: a Checkpoint whose params have `shards` (shard tensors
and their Box maps) and fragments cutting each shard's flat elements into ranges held by
several files at odd byte offsets, as ZeRO partitions do. The merge output must equal the full
tensor the maps describe, bit for bit; the plan must never be one piece per row nor read more
than a block of rows at a time. The real tp2 fixtures are merged in tests/test_layout_tp.py.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from zinspect.core import open_checkpoint, shardplan
from zinspect.core.merge import merge
from zinspect.core.model import Box, Checkpoint, Fragment, Param, Shard
from zinspect.core.plan import plan_merge
from zinspect.errors import NotMergeable

JUNK = b"\xa5" * 13  # bytes between fragments: an off-by-one read shows in the output


def build(tmp_path, params: dict[str, tuple[np.ndarray, dict[int, tuple[np.ndarray, list]]]],
          cuts: int = 3, replicated: tuple[str, ...] = (), dtype: str = "float32") -> Checkpoint:
    """A tensor-parallel checkpoint of `params`: name -> (full tensor, {tp: (shard tensor,
    [(shard box, full box)...])}); each shard's flat elements are cut into `cuts` fragments held
    by different 'dp rank' files, saved as `dtype` (float32, or bfloat16 as frozen params are)."""
    tag = tmp_path / "global_step1"
    tag.mkdir(exist_ok=True)
    files: dict[str, bytearray] = {}
    ckpt = Checkpoint(tag, "global_step1", layout="tensor_parallel", stage=1, world_size=cuts)
    for name, (full, shards) in params.items():
        p = Param(name, tuple(full.shape), "float32", group=0, sub_group=0, fragments=[])
        for t, (data, maps) in shards.items():
            p.shards[t] = Shard(t, tuple(data.shape), [(Box(*a), Box(*b)) for a, b in maps],
                                replicated=name in replicated)
            flat = data.astype(np.float32).reshape(-1)
            raw = flat.tobytes() if dtype == "float32" else \
                torch.from_numpy(flat).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
            size = 4 if dtype == "float32" else 2
            bounds = sorted({0, flat.size, *(flat.size * (k + 1) // cuts + k for k in range(cuts - 1))})
            for dp, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                lo, hi = min(lo, flat.size), min(hi, flat.size)
                file = f"rank{dp}_tp{t}.bin"
                buf = files.setdefault(file, bytearray())
                buf += JUNK
                p.fragments.append(Fragment(dp, file, 0, lo, hi - lo, len(buf), dtype, shard=t))
                buf += raw[lo * size:hi * size]
        ckpt.params[name] = p
    for file, data in files.items():
        (tag / file).write_bytes(bytes(data))
    return ckpt


def box(offsets, sizes):
    return (tuple(offsets), tuple(sizes))


def merged(ckpt, tmp_path, **kwargs) -> dict:
    result = merge(ckpt, tmp_path / "out", hf_files=False, **kwargs)
    return load_file(tmp_path / "out" / "model.safetensors"), result


def dim1_split(full: np.ndarray, tp: int) -> dict:
    rows, cols = full.shape
    w = cols // tp
    return {t: (full[:, t * w:(t + 1) * w].copy(), [(box((0, 0), (rows, w)), box((0, t * w), (rows, w)))])
            for t in range(tp)}


def test_a_dim1_split_is_woven_in_blocks_never_a_piece_per_row(tmp_path, monkeypatch):
    monkeypatch.setattr(shardplan, "WEAVE_BYTES", 4096)
    full = np.arange(1000 * 12, dtype=np.float32).reshape(1000, 12) * 0.5 - 7
    ckpt = build(tmp_path, {"w": (full, dim1_split(full, 3))})
    t = plan_merge(ckpt).tensors[0]
    rows_per_block = 4096 // (12 * 4)
    assert len(t.weaves) == math.ceil(1000 / rows_per_block)
    assert all(w.read_nbytes <= 4096 and w.rows <= rows_per_block for _, w in t.weaves)
    # one range per shard per block (+1 where a ZeRO fragment boundary cuts it), not per row
    assert len(t.pieces) <= 3 * len(t.weaves) + 3 * 2
    got, result = merged(ckpt, tmp_path)
    assert torch.equal(got["w"], torch.from_numpy(full))
    assert result.drift == {}


def test_a_dim1_split_with_runs_longer_than_the_rows_uses_row_copies(tmp_path):
    """Wide runs (row copies) and narrow ones (strided copies per byte) give the same bytes."""
    full = np.random.default_rng(0).standard_normal((7, 600)).astype(np.float32)
    ckpt = build(tmp_path, {"w": (full, dim1_split(full, 2))})
    assert plan_merge(ckpt).tensors[0].weaves
    got, _ = merged(ckpt, tmp_path)
    assert torch.equal(got["w"], torch.from_numpy(full))


def test_rows_wider_than_a_block_are_plain_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(shardplan, "WEAVE_BYTES", 64)
    full = np.arange(5 * 40, dtype=np.float32).reshape(5, 40)
    ckpt = build(tmp_path, {"w": (full, dim1_split(full, 2))})
    t = plan_merge(ckpt).tensors[0]
    assert not t.weaves and len(t.pieces) >= 5 * 2
    got, _ = merged(ckpt, tmp_path)
    assert torch.equal(got["w"], torch.from_numpy(full))


def test_dim0_split_with_vocab_padding_left_out(tmp_path):
    """Vocab 10 over tp 2, padded to 12: tp 1's shard holds 4 real rows and 2 padding rows that
    no full box maps; they are never written."""
    full = np.arange(10 * 4, dtype=np.float32).reshape(10, 4) + 1
    pad = np.full((2, 4), 99.0, dtype=np.float32)
    shards = {0: (full[:6], [(box((0, 0), (6, 4)), box((0, 0), (6, 4)))]),
              1: (np.concatenate([full[6:], pad]), [(box((0, 0), (4, 4)), box((6, 0), (4, 4)))])}
    ckpt = build(tmp_path, {"embed": (full, shards)})
    t = plan_merge(ckpt).tensors[0]
    assert not t.weaves and t.src_nbytes == full.nbytes
    got, _ = merged(ckpt, tmp_path)
    assert torch.equal(got["embed"], torch.from_numpy(full))


def test_sub_params_several_maps_per_shard(tmp_path):
    """A fused QKV [q; k; v] column-split: each shard is [q_t; k_t; v_t]."""
    full = np.random.default_rng(1).standard_normal((12, 5)).astype(np.float32)
    shards = {}
    for t in range(2):
        parts = [full[4 * j + 2 * t:4 * j + 2 * t + 2] for j in range(3)]
        shards[t] = (np.concatenate(parts), [(box((2 * j, 0), (2, 5)), box((4 * j + 2 * t, 0), (2, 5)))
                                             for j in range(3)])
    ckpt = build(tmp_path, {"qkv": (full, shards)})
    got, _ = merged(ckpt, tmp_path)
    assert torch.equal(got["qkv"], torch.from_numpy(full))


def test_a_split_on_dim2_of_a_3d_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(shardplan, "WEAVE_BYTES", 100)
    full = np.arange(4 * 3 * 8, dtype=np.float32).reshape(4, 3, 8)
    shards = {t: (full[:, :, 4 * t:4 * t + 4].copy(),
                  [(box((0, 0, 0), (4, 3, 4)), box((0, 0, 4 * t), (4, 3, 4)))]) for t in range(2)}
    ckpt = build(tmp_path, {"w": (full, shards)})
    assert plan_merge(ckpt).tensors[0].weaves
    got, _ = merged(ckpt, tmp_path)
    assert torch.equal(got["w"], torch.from_numpy(full))


def test_a_split_on_two_dims_is_refused_with_the_param_named(tmp_path):
    full = np.zeros((4, 4, 4), dtype=np.float32)
    shards = {t: (full[2 * t:2 * t + 2, :, 2 * t:2 * t + 2].copy(),
                  [(box((0, 0, 0), (2, 4, 2)), box((2 * t, 0, 2 * t), (2, 4, 2)))]) for t in range(2)}
    ckpt = build(tmp_path, {"w": (full, shards)})
    with pytest.raises(NotMergeable, match="w"):
        plan_merge(ckpt)


def test_woven_rows_narrowed_to_bf16_equal_torch(tmp_path):
    full = np.random.default_rng(2).standard_normal((300, 10)).astype(np.float32)
    ckpt = build(tmp_path, {"w": (full, dim1_split(full, 2))})
    got, _ = merged(ckpt, tmp_path, dtype="bf16")
    assert got["w"].dtype == torch.bfloat16
    assert torch.equal(got["w"].view(torch.int16),
                       torch.from_numpy(full).to(torch.bfloat16).view(torch.int16))


def test_woven_16bit_shards_are_upcast_exactly(tmp_path):
    """Frozen params are saved 16-bit: woven first, then upcast to fp32 in the reader."""
    full = np.random.default_rng(4).standard_normal((50, 6)).astype(np.float32)
    ckpt = build(tmp_path, {"w": (full, dim1_split(full, 2))}, dtype="bfloat16")
    t = plan_merge(ckpt).tensors[0]
    assert t.weaves and (t.src_dtype, t.dtype) == ("bfloat16", "float32")
    got, _ = merged(ckpt, tmp_path)
    assert torch.equal(got["w"], torch.from_numpy(full).to(torch.bfloat16).float())


def replicated_ckpt(tmp_path, drift: float) -> tuple[Checkpoint, np.ndarray]:
    full = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    other = full.copy()
    other[1, 2] += drift
    whole = [(box((0, 0), (6, 4)), box((0, 0), (6, 4)))]
    return build(tmp_path, {"norm": (full, {0: (full, whole), 1: (other, whole), 2: (full, whole)})},
                 replicated=("norm",)), full


def test_replicated_params_are_written_from_tp0_and_compared(tmp_path):
    ckpt, full = replicated_ckpt(tmp_path, 0.0)
    t = plan_merge(ckpt).tensors[0]
    assert [m.replica for m in t.mirrors] == [1, 2]
    got, result = merged(ckpt, tmp_path)
    assert torch.equal(got["norm"], torch.from_numpy(full))
    assert result.drift == {} and result.warnings == []


def test_replica_drift_is_a_warning_with_the_max_difference(tmp_path):
    ckpt, full = replicated_ckpt(tmp_path, 0.25)
    got, result = merged(ckpt, tmp_path)
    assert torch.equal(got["norm"], torch.from_numpy(full))  # tp 0's copy
    want = float(np.float32(full[1, 2] + np.float32(0.25)) - full[1, 2])
    assert result.drift == {"norm": {1: pytest.approx(want, abs=0)}}
    assert [f.code for f in result.findings] == ["tp-replica-drift"]
    assert result.findings[0].severity == "warning" and result.findings[0].param == "norm"
    assert "tp rank(s) 1" in result.warnings[0]
    j = result.to_json()
    assert j["drift"] == {"norm": {"1": want}} and j["findings"][0]["code"] == "tp-replica-drift"


def test_replica_drift_under_strict_refuses_and_writes_nothing(tmp_path):
    ckpt, _ = replicated_ckpt(tmp_path, 1e-3)
    with pytest.raises(NotMergeable, match="norm.*tp rank"):
        merge(ckpt, tmp_path / "out", hf_files=False, strict=True)
    assert not (tmp_path / "out").exists()


def test_a_shard_not_fully_held_is_dropped_under_salvage(tmp_path):
    full = np.arange(20 * 6, dtype=np.float32).reshape(20, 6)
    ckpt = build(tmp_path, {"w": (full, dim1_split(full, 2)),
                            "b": (full[0], {0: (full[0], [(box((0,), (6,)), box((0,), (6,)))])})})
    p = ckpt.params["w"]
    p.fragments = [f for f in p.fragments if not (f.shard == 1 and f.rank == 1)]
    with pytest.raises(NotMergeable, match="w"):
        plan_merge(ckpt)
    plan = plan_merge(ckpt, salvage=True)
    assert [t.name for t in plan.tensors] == ["b"]
    assert "tp rank 1's shard" in plan.dropped["w"]


def test_real_tp2_replicas_are_read_verified_and_equal(tmp_path):
    """On the real ZeRO-3 tp2 fixture: every replicated param's tp 1 copy is read (its records
    CRC-checked along with the rest) and equals tp 0's."""
    ckpt = open_checkpoint(FIXTURES / "parallel" / "tp2_dp2_s3_toy")
    plan = plan_merge(ckpt)
    assert any(t.mirrors for t in plan.tensors) and any(t.weaves for t in plan.tensors)
    result = merge(ckpt, tmp_path / "out", hf_files=False)
    assert result.drift == {} and result.unverified == []
    tp1 = {f.name for f in ckpt.files if f.coords.tp == 1 and f.kind == "optim"}
    assert tp1 and result.verified >= 2 * len(tp1)


def test_real_tp2_replica_drift_end_to_end(tmp_path):
    """The real ZeRO-1 tp2 fixture with one element of tp rank 1's copy of a replicated param
    changed (its record's CRC updated: a drifted run, not a corrupt file): `merge --json` exits
    0 with a tp-replica-drift warning naming the param, rank 1 and the difference, writes tp 0's
    copy (= the reference); `--strict` refuses and writes nothing."""
    import json
    import struct

    import damage as D
    from conftest import run_zinspect

    name = "parallel/tp2_dp2_s1_toy"
    root = D.copy_root(tmp_path, name, "drift")
    ckpt = open_checkpoint(root)
    param = next(n for n, p in ckpt.params.items() if p.shards and p.shards[0].replicated)
    frag = next(f for f in ckpt.params[param].fragments if f.shard == 1 and f.numel)
    path = ckpt.path / frag.file
    with open(path, "r+b") as f:
        f.seek(frag.offset)
        old = struct.unpack("<f", f.read(4))[0]
        f.seek(frag.offset)
        f.write(struct.pack("<f", old + 0.5))
    D.set_crc(path, D.record_holding(path, frag.offset)[0].split("/", 1)[1])
    want = float(np.float32(np.float32(old) + np.float32(0.5)) - np.float32(old))

    r = run_zinspect("merge", root, tmp_path / "out", "--json", "--no-hf-files")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["drift"] == {param: {"1": pytest.approx(want, rel=1e-6)}}
    assert [(f["code"], f["param"]) for f in j["findings"]] == [("tp-replica-drift", param)]
    assert param in r.stderr and "tp rank(s) 1" in r.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    ref = torch.load(FIXTURES / name / "reference_fp32.pt")
    assert torch.equal(got[param], ref[param])

    r = run_zinspect("merge", root, tmp_path / "strict", "--strict", "--no-hf-files")
    assert r.returncode == 1 and param in r.stderr and "--strict" in r.stderr, r.stderr
    assert not (tmp_path / "strict").exists()


def test_overlapping_boxes_with_the_right_total_are_refused(tmp_path):
    full = np.arange(16, dtype=np.float32).reshape(4, 4)
    shards = {0: (full[:2].copy(), [(box((0, 0), (2, 4)), box((0, 0), (2, 4)))]),
              1: (full[1:3].copy(), [(box((0, 0), (2, 4)), box((1, 0), (2, 4)))])}
    ckpt = build(tmp_path, {"w": (full, shards)})
    assert "overlap" in shardplan.problem(ckpt.params["w"])
    with pytest.raises(NotMergeable, match="w"):
        plan_merge(ckpt)


def test_a_forged_map_of_many_boxes_is_refused_within_a_bound():
    """1,100 one-element boxes in column 0 make 1,100 bands; 1,099 tall boxes span them all:
    1.2M (box, band) pairs, over the budget: refused, not walked."""
    n = 1100
    maps = [(Box((r, 0), (1, 1)), Box((r, 0), (1, 1))) for r in range(n)]
    maps += [(Box((0, c), (n, 1)), Box((0, c), (n, 1))) for c in range(1, n)]
    p = Param("w", (n, n), "float32", fragments=[Fragment(0, "f", 0, 0, n * n, 0, "float32", shard=0)],
              shards={0: Shard(0, (n, n), maps)})
    assert "too many" in shardplan.problem(p)


def test_a_stream_with_a_smaller_chunk_than_a_weave_block_stays_exact(tmp_path):
    from zinspect.core.stream import BufferSink, ProgressMeter, copy_tensors

    full = np.random.default_rng(5).standard_normal((3000, 8)).astype(np.float32)
    ckpt = build(tmp_path, {"w": (full, dim1_split(full, 2))})
    tensors = plan_merge(ckpt).tensors
    assert max(w.read_nbytes for t in tensors for _, w in t.weaves) > 4096
    sink = BufferSink(tensors)
    copy_tensors(tensors, sink, ProgressMeter(0, None), chunk=4096)
    assert bytes(sink.buffers[0]) == full.tobytes()


@pytest.mark.parametrize("name", ["tp2_dp2_s1_toy", "tp2_dp2_s2_toy", "tp2_dp2_s3_toy",
                                  "tp2_dp2_s2_llama_bf16_tied"])
def test_real_tp2_merges_to_bf16_equal_torch(tmp_path, name):
    """Every real tp2 fixture merged to bf16: the woven, vocab-trimmed and replicated params
    equal torch's .to(bfloat16) of the reference bit for bit."""
    ref = torch.load(FIXTURES / "parallel" / name / "reference_fp32.pt")
    result = merge(open_checkpoint(FIXTURES / "parallel" / name), tmp_path / "out",
                   hf_files=False, dtype="bf16")
    assert result.unverified == [] and result.drift == {}
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(ref)
    for n, t in ref.items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert got[n].dtype == want.dtype and torch.equal(got[n].view(-1).view(torch.uint8),
                                                          want.view(-1).view(torch.uint8)), n
