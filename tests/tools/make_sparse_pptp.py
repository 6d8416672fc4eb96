"""make_sparse_ckpt.py --pp P --tp T: a huge Megatron-DeepSpeed pipeline x tensor-parallel ZeRO-1
checkpoint as sparse files, from a real make_ds_pptp.py checkpoint (its pickles re-saved with the
big model's names and shard shapes, every tensor's bytes a hole). Not a fixture: for timing
`zinspect info` / `validate` / a merge plan at 70B over tp 8 x pp 4 x dp 16.

Stand-ins keep the pickles small: a 2-D shard is saved with prime "marker" dims (its real dims
written into the pickle afterwards), a flat fp32 partition with a marker numel; their data records
become holes of the real size (make_sparse_ckpt.sparse_records). Unlike make_sparse_ckpt's, the
holes carry the CRC32 of their zeros, so a merge verifies and writes them (zeros).
"""

from __future__ import annotations

import functools
import math
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from make_sparse_ckpt import sparse_records
from sparse_zip import Record, write_zip

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # DeepSpeed's venv: zinspect's source
from zinspect.core.partition import zero12_partition, zero12_real  # noqa: E402 (pure arithmetic)

#: stand-in dims (primes: their products are unique) and flat-partition numels
DIM_MARKERS = (401, 409, 419, 421, 431, 433, 439, 443)
FLAT_MARKER = 100_003


def _times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: list[int]) -> list[int]:
    return [_times(mat, mat[n]) for n in range(32)]


@functools.cache
def zeros_crc(n: int) -> int:
    """zlib.crc32(bytes(n)) in O(log n): the CRC register times the n-zero-bytes operator (the
    GF(2) matrix squaring of zlib's crc32_combine)."""
    op = [0xEDB88320] + [1 << (i - 1) for i in range(1, 32)]  # one zero bit
    for _ in range(3):
        op = _square(op)  # one zero byte
    reg = 0xFFFFFFFF
    while n:
        if n & 1:
            reg = _times(op, reg)
        op = _square(op)
        n >>= 1
    return reg ^ 0xFFFFFFFF


class ZeroHole(Record):
    """A hole record whose CRC is that of its zeros (what a read of the hole gives)."""

    @property
    def crc(self) -> int:
        return zeros_crc(self.hole) if self.hole else super().crc


def with_crcs(records: list[Record]) -> list[Record]:
    return [ZeroHole(r.name, r.data, r.hole, r.at) if r.hole else r for r in records]


def layer_shapes(a, tp: int) -> dict[str, OrderedDict]:
    """Tp-shard shapes of the three kinds of layer file, keys in the real files' order."""
    h, qkv, ffn = a.hidden, a.hidden + 2 * a.kv_hidden, a.ffn
    block = OrderedDict([
        ("input_layernorm.weight", (h,)), ("input_layernorm.bias", (h,)),
        ("self_attention.query_key_value.weight", (qkv // tp, h)),
        ("self_attention.query_key_value.bias", (qkv // tp,)),
        ("self_attention.dense.weight", (h, h // tp)), ("self_attention.dense.bias", (h,)),
        ("post_attention_layernorm.weight", (h,)), ("post_attention_layernorm.bias", (h,)),
        ("mlp.dense_h_to_4h.weight", (2 * ffn // tp, h)), ("mlp.dense_h_to_4h.bias", (2 * ffn // tp,)),
        ("mlp.dense_4h_to_h.weight", (h, ffn // tp)), ("mlp.dense_4h_to_h.bias", (h,))])
    vocab = -(-a.vocab // (128 * tp)) * 128 * tp
    return {"embed": OrderedDict([("word_embeddings.weight", (vocab // tp, h))]), "block": block,
            "final": OrderedDict([("weight", (h,)), ("bias", (h,))])}


def stand_ins(shapes: OrderedDict, dims: dict[int, int]) -> tuple[OrderedDict, dict[int, int]]:
    """({key: small tensor with marker dims}, {marker int: real int}) for a layer file."""
    out, real = OrderedDict(), {}
    for key, shape in shapes.items():
        small = tuple(dims[n] for n in shape)
        out[key] = torch.zeros(small)
        real.update({dims[n]: n for n in shape})
        real[math.prod(small)] = math.prod(shape)
    return out, real


def stage_layers(a) -> list[list[int]]:
    """Global layer indices per stage, as PipelineModule type:ParallelTransformerLayerPipe cuts
    Megatron's list: 0 lambda, 1 embed, 2 lambda, 3.. blocks, lambda, final norm, tied head."""
    per = a.layers // a.pp
    blocks = [list(range(3 + s * per, 3 + (s + 1) * per)) for s in range(a.pp)]
    blocks[0] = [1, *blocks[0]]
    blocks[-1] = [*blocks[-1], 3 + a.layers + 1]
    return blocks


def write(a) -> None:
    from deepspeed.utils.tensor_fragment import fragment_address

    tp, pp = a.tp, a.pp
    dp = a.world_size // (pp * tp)
    assert dp * pp * tp == a.world_size and a.layers % pp == 0, "world size / layers do not fit"
    src_tag = (a.template / "latest").read_text().strip()
    src = a.template / src_tag
    state = torch.load(src / "mp_rank_00_model_states.pt", weights_only=False)
    optim_path = next(src.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    optim = torch.load(optim_path, weights_only=False)
    shapes = layer_shapes(a, tp)
    all_dims = sorted({n for kind in shapes.values() for s in kind.values() for n in s})
    dims = dict(zip(all_dims, DIM_MARKERS, strict=False))
    assert len(dims) == len(all_dims), "more distinct dims than markers"
    final = 3 + a.layers + 1

    tag = a.out / src_tag
    tag.mkdir(parents=True, exist_ok=True)
    (a.out / "latest").write_text(src_tag)
    files = 0
    kinds = {}
    for kind, kshapes in shapes.items():
        obj, real = stand_ins(kshapes, dims)
        kinds[kind] = with_crcs(sparse_records(obj, real, 4))
    for layers in stage_layers(a):
        for layer in layers:
            kind = "embed" if layer == 1 else "final" if layer == final else "block"
            for t in range(tp):
                write_zip(tag / f"layer_{layer:02d}-model_{t:02d}-model_states.pt", kinds[kind])
                files += 1
    tied = "tied_modules.embed.word_embeddings.weight"
    info = dict(state["universal_checkpoint_info"], original_vocab_size=a.vocab)
    prefix = optim_path.name.removesuffix("zero_pp_rank_0_mp_rank_00_optim_states.pt")
    params = 0
    for s, layers in enumerate(stage_layers(a)):
        mats, norms = OrderedDict(), OrderedDict()
        if s in (0, pp - 1):
            mats[tied] = shapes["embed"]["word_embeddings.weight"]
        for layer in layers:
            if layer == 1:
                continue
            kind = shapes["final" if layer == final else "block"]
            for key, shape in kind.items():
                (mats if len(shape) > 1 else norms)[f"{layer}.{key}"] = shape
        groups = [mats, norms]
        params += sum(math.prod(x) for g in groups for n, x in g.items() if n != tied or s == 0) * tp
        for t in range(tp):
            ss = s * tp + t
            state.update(param_shapes=[OrderedDict((n, torch.Size(x)) for n, x in g.items())
                                       for g in groups],
                         dp_world_size=dp, mp_world_size=pp * tp, universal_checkpoint_info=info,
                         checkpoint_parallel_dimensions={"pp_degree": pp, "tp_degree": tp})
            torch.save(state, tag / f"mp_rank_{ss:02d}_model_states.pt")
            files += 1
            for d in range(dp):
                write_zip(tag / f"{prefix}zero_pp_rank_{d}_mp_rank_{ss:02d}_optim_states.pt",
                          _optim_records(optim, groups, dp, d, fragment_address))
                files += 1
    apparent = sum(f.stat().st_size for f in tag.iterdir())
    print(f"{a.out}: {params / 1e9:.1f}B params, tp {tp} x pp {pp} x dp {dp} = {a.world_size} ranks, "
          f"{files} files, {apparent / 1e9:.0f} GB apparent")


def _optim_records(optim: dict, groups: list[OrderedDict], dp: int, d: int, fragment_address):
    """Dp rank d's ZeRO-1 optimizer file of one (stage, tp) slice: its partition of each flat
    group (padding stripped), the Adam moments, and the slice mappings."""
    osd = optim["optimizer_state_dict"]
    flat, pads, maps, state, real = [], [], [], {}, {}
    for gi, g in enumerate(groups):
        total = sum(math.prod(x) for x in g.values())
        part, held = zero12_partition(total, dp), zero12_real(total, dp, d)
        marker = FLAT_MARKER + 2 * gi
        real[marker] = held
        flat.append(torch.zeros(marker))
        pads.append(part - held if d == dp - 1 else 0)
        lo, hi, start, m = d * part, d * part + held, 0, OrderedDict()
        for name, x in g.items():
            n = math.prod(x)
            a, b = max(lo, start), min(hi, start + n)
            if b > a:
                m[name] = fragment_address(numel=b - a, start=a - lo)
            start += n
        maps.append(m)
        step = osd["base_optimizer_state"]["state"][gi]["step"]
        state[gi] = {"step": step, "exp_avg": torch.zeros(marker), "exp_avg_sq": torch.zeros(marker)}
    osd.update(single_partition_of_fp32_groups=flat, group_paddings=pads, partition_count=[dp] * 2,
               param_slice_mappings=maps, param_alignment_paddings=[[0] * len(g) for g in groups])
    osd["base_optimizer_state"] = dict(osd["base_optimizer_state"], state=state)
    return with_crcs(sparse_records(optim, real, 4))
