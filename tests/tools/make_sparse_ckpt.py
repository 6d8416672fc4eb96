#!/usr/bin/env python3
"""Make a huge ZeRO-3 checkpoint as sparse files, for timing `zinspect info` and the app at scale.

Not a test fixture. The pickles are DeepSpeed's own: the rank-0 files of a small real checkpoint
(made with make_ds_checkpoints.py) are loaded with torch + DeepSpeed, given the param shapes of
a LLaMA-style model (optionally with MoE experts, for hundreds of thousands of names), and saved
again. Every flat fp32 partition and Adam moment becomes a zip record whose bytes are a hole, so
a 70B-param, 512-rank checkpoint (785 GB apparent) takes a few MB of disk. The data records carry
CRC 0: `validate --deep` flags them; nothing else reads them.

    /work/dsvenv/bin/python tests/tools/make_sparse_ckpt.py tests/fixtures/s3_w4_bf16 \\
        /work/bench/sparse70b --world-size 512                       # LLaMA-2-70B shapes
    /work/dsvenv/bin/python tests/tools/make_sparse_ckpt.py tests/fixtures/s3_w4_bf16 \\
        /work/bench/moe306k --world-size 4 --layers 80 --experts 1270 --hidden 64 --ffn 128 \\
        --kv-hidden 64 --vocab 1000                                   # 306k param names

The template's first two optimizer groups are used: weights (matrices) and no-decay (norms).

With --pp and --tp, a Megatron-DeepSpeed (BLOOM-style) pipeline x tensor-parallel ZeRO-1 checkpoint
instead, from a real one made with make_ds_pptp.py (its pickles: layer files, mp_rank_SS model
states with universal_checkpoint_info, optimizer files): a GPT of --layers transformer layers
(query_key_value of hidden + 2 * kv-hidden rows, swiglu dense_h_to_4h of 2 * ffn rows, a
vocab-parallel tied embedding padded to a multiple of 128 * tp) on PipeModelDataParallelTopology
(dp = world size / (pp * tp)); every tensor a hole:

    /work/dsvenv/bin/python tests/tools/make_sparse_ckpt.py tests/fixtures/parallel/pp2_tp2_dp2_s1_fp32 \\
        /work/bench/pptp70b --world-size 512 --pp 4 --tp 8        # 70B, tp 8 x pp 4 x dp 16
"""

from __future__ import annotations

import argparse
import io
import math
import pickletools
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_zip import Record, write_zip  # noqa: E402

MARKER = 777_001  # numel of the stand-in tensors; rewritten in the pickle to the real numel


def model_shapes(a) -> tuple[OrderedDict, OrderedDict]:
    """(matrices, norms) of a LLaMA-style decoder, in model order."""
    mats, norms = OrderedDict(), OrderedDict()
    mats["model.embed_tokens.weight"] = (a.vocab, a.hidden)
    for i in range(a.layers):
        p = f"model.layers.{i}"
        for name, shape in (("q_proj", (a.hidden, a.hidden)), ("k_proj", (a.kv_hidden, a.hidden)),
                            ("v_proj", (a.kv_hidden, a.hidden)), ("o_proj", (a.hidden, a.hidden))):
            mats[f"{p}.self_attn.{name}.weight"] = shape
        experts = [f"{p}.mlp.experts.{e}" for e in range(a.experts)] if a.experts else [f"{p}.mlp"]
        for e in experts:
            mats[f"{e}.gate_proj.weight"] = (a.ffn, a.hidden)
            mats[f"{e}.up_proj.weight"] = (a.ffn, a.hidden)
            mats[f"{e}.down_proj.weight"] = (a.hidden, a.ffn)
        norms[f"{p}.input_layernorm.weight"] = (a.hidden,)
        norms[f"{p}.post_attention_layernorm.weight"] = (a.hidden,)
    norms["model.norm.weight"] = (a.hidden,)
    mats["lm_head.weight"] = (a.vocab, a.hidden)
    return mats, norms


def partition_numel(shapes: OrderedDict, world_size: int) -> int:
    """ZeRO-3: each param contributes ceil(numel / world_size) elements to every rank's flat group."""
    return sum(math.ceil(math.prod(s) / world_size) for s in shapes.values())


def rewrite_numels(pkl: bytes, numel: dict[int, int]) -> bytes:
    """Replace every pickled int equal to a key of `numel` (the stand-ins' sizes) by its value."""
    out = bytearray()
    ops = list(pickletools.genops(pkl))
    for (op, arg, pos), nxt in zip(ops, ops[1:] + [(None, None, len(pkl))], strict=True):
        end = nxt[2]
        if op.name in ("BININT", "BININT1", "BININT2", "LONG1") and arg in numel:
            value = numel[arg]
            out += (b"J" + struct.pack("<i", value) if value < 2**31 else
                    b"\x8a\x08" + struct.pack("<q", value))
        else:
            out += pkl[pos:end]
    return bytes(out)


def sparse_records(obj, numel: dict[int, int], itemsize: int) -> list[Record]:
    """The zip records of torch.save(`obj`), each stand-in storage a hole of its real size."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    records = []
    with zipfile.ZipFile(buf) as z:
        for info in z.infolist():
            data = z.read(info)
            name = info.filename.encode()
            if info.filename.endswith("data.pkl"):
                records.append(Record(name, rewrite_numels(data, numel)))
            elif "/data/" in info.filename and len(data) // itemsize in numel:
                records.append(Record(name, hole=numel[len(data) // itemsize] * itemsize))
            else:
                records.append(Record(name, data))
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("template", type=Path, help="a real ZeRO-3 checkpoint root (holding latest)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--world-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--kv-hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=28672)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=0, help="MoE experts per layer (0: dense MLP)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (> 1: a pipeline x tp checkpoint)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (with --pp)")
    a = ap.parse_args(argv)
    if a.pp > 1:
        import make_sparse_pptp

        make_sparse_pptp.write(a)
        return

    src_tag = (a.template / "latest").read_text().strip()
    src = a.template / src_tag
    model = torch.load(src / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    optim_path = next(src.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    optim = torch.load(optim_path, weights_only=False)

    groups = model_shapes(a)
    sizes = [partition_numel(g, a.world_size) for g in groups]
    markers = {MARKER + 2 * i: n for i, n in enumerate(sizes)}  # stand-in numel -> real numel
    model.update(
        module=OrderedDict((n, torch.empty(0, dtype=torch.bfloat16)) for g in groups for n in g),
        param_shapes=[OrderedDict((n, torch.Size(s)) for n, s in g.items()) for g in groups],
        buffer_names=[], frozen_param_shapes=OrderedDict(), frozen_param_fragments=OrderedDict(),
        shared_params={}, dp_world_size=a.world_size)
    osd = optim["optimizer_state_dict"]
    osd["partition_count"] = a.world_size
    osd["fp32_flat_groups"] = [torch.zeros(m) for m in markers]
    inner = osd["optimizer_state_dict"]
    inner["param_groups"] = inner["param_groups"][: len(groups)]
    inner["state"] = {i: {"step": inner["state"][i]["step"], "exp_avg": torch.zeros(m),
                          "exp_avg_sq": torch.zeros(m)} for i, m in enumerate(markers)}

    tag = a.out / src_tag
    tag.mkdir(parents=True, exist_ok=True)
    (a.out / "latest").write_text(src_tag)
    prefix = optim_path.name.removesuffix("zero_pp_rank_0_mp_rank_00_optim_states.pt")
    model_records = sparse_records(model, markers, 4)
    optim_records = sparse_records(optim, markers, 4)
    # every rank's pickles say the same (ZeRO-3 ranks differ only in their bytes), but each rank
    # gets its own file, so that a cold-cache run reads them all
    for r in range(a.world_size):
        write_zip(tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", model_records)
        write_zip(tag / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt", optim_records)
    params = sum(math.prod(s) for g in groups for s in g.values())
    apparent = sum(f.stat().st_size for f in tag.iterdir())
    print(f"{a.out}: {params / 1e9:.1f}B params, {sum(len(g) for g in groups):,} names, "
          f"{a.world_size} ranks, {2 * a.world_size} files, {apparent / 1e9:.0f} GB apparent")


if __name__ == "__main__":
    main()
