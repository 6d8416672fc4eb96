#!/usr/bin/env python3
# ruff: noqa  -- a generator run in the DeepSpeed venv, in the style of the team's generators
"""Generate REAL DeepSpeed pipeline x tensor-parallel checkpoints (Megatron-DeepSpeed / BLOOM style) on CPU.

Trains a small GPT-like model with DeepSpeed's PipelineModule on the 3-D topology
PipeModelDataParallelTopology(num_pp=--pp, num_mp=--tp, num_dp=--dp) (world size pp*tp*dp, CPU processes,
gloo on 127.0.0.1), ZeRO stage 0 or 1 (DeepSpeed refuses 2/3 with pipelines), then
engine.save_checkpoint(client_state={"universal_checkpoint_info": ...}) as Megatron-DeepSpeed does.
The layers are hand-written Megatron-style tensor-parallel layers under Megatron's names:

  tied_modules.embed.word_embeddings.weight   vocab-parallel embedding (rows padded to a multiple of tp),
                                              reused as the output head on the last stage (TiedLayerSpec)
  N.input_layernorm.{weight,bias}             replicated
  N.self_attention.query_key_value.*          column-parallel (dim 0)
  N.self_attention.dense.weight / .bias       row-parallel (dim 1; all-reduce in forward) / replicated
  N.post_attention_layernorm.*                replicated
  N.mlp.dense_h_to_4h.{weight,bias}           swiglu: 2 sub-params cat on dim 0 (each rank [gate_t; up_t])
  N.mlp.dense_4h_to_h.weight / .bias          row-parallel / replicated
  N.{weight,bias}                             the final layernorm, replicated

Writes into --out:
  <out>/latest, <out>/<tag>/...  DeepSpeed's files, untouched:
        layer_XX-model_TT-model_states.pt     layer XX's tp-rank-TT shards (model dtype), by dp rank 0
        mp_rank_SS_model_states.pt            SS = stage * tp + tp rank; universal_checkpoint_info inside
        [bf16_]zero_pp_rank_D_mp_rank_SS_optim_states.pt   per (dp rank D, SS)
  <out>/reference_fp32.pt   the FULL fp32 masters {PipelineModule name: tensor}: each tp rank's master
                            shard (safe_get_full_fp32_param) joined on its split dim (vocab padding
                            trimmed, 2-sub-param halves joined half by half, replicas checked equal)
  <out>/manifest.json       per param: full shape, shard shape, split kind/dim, stages, layer files; checks
  <out>/reference_moments.pt  with --universal: the Adam moments ds_to_universal.py joined (when its
                            fp32 masters equal the reference)

Verification (unless --no-verify): every layer file tensor equals the reference shard cast to the model
dtype; a fresh engine reloads the checkpoint and gives back the reference shards; DeepSpeed's own
ds_to_universal.py is run and its fp32.pt files compared with the reference (recorded, not required).
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_ds_pipeline import _quiet_exit, free_port, gather_to_rank0, setup_rank  # noqa: E402

#: tensor-parallel context of this process, set before the PipelineModule builds its layers
MP = {"rank": 0, "size": 1, "group": None}

REPLICATED, COLUMN, ROW, VOCAB, TWO = "replicated", "column", "row", "vocab", "two_sub_params"


def universal_checkpoint_info(vocab):
    """What Megatron-DeepSpeed's GPTModelPipe.universal_checkpoint_info() says for these layers."""
    return {
        "universal_checkpoint_version": 0.4,
        "vocabulary_parameter_patterns": [r"tied_modules.embed.word_embeddings.weight"],
        "tp_replicated_parameter_patterns": [
            r"\d+.input_layernorm.weight", r"\d+.input_layernorm.bias",
            r"\d+.post_attention_layernorm.weight", r"\d+.post_attention_layernorm.bias",
            r"\d+.self_attention.dense.bias", r"\d+.mlp.dense_4h_to_h.bias",
            r"\d+.weight", r"\d+.bias"],
        "parameter_with_row_parallelism_patterns": [r"\d+.mlp.dense_4h_to_h.weight",
                                                    r"\d+.self_attention.dense.weight"],
        "parameter_with_2_sub_params_cat_dim_0": [r"\d+.mlp.dense_h_to_4h.weight", r"\d+.mlp.dense_h_to_4h.bias"],
        "original_vocab_size": vocab,
    }


def padded_vocab(vocab, tp, multiple=4):
    step = multiple * tp
    return -(-vocab // step) * step


# ----------------------------------------------------------------------------- model

def build_specs(args):
    import torch
    import torch.nn as nn
    import torch.distributed as dist
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    h, ffn, tp, heads = args.hidden, args.ffn, args.tp, args.heads
    vpad = padded_vocab(args.vocab, tp)

    class CopyToTP(torch.autograd.Function):  # identity forward, all-reduce of the grad (Megatron's f)
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            g = g.contiguous()
            dist.all_reduce(g, group=MP["group"])
            return g

    class ReduceFromTP(torch.autograd.Function):  # all-reduce forward, identity backward (Megatron's g)
        @staticmethod
        def forward(ctx, x):
            x = x.contiguous().clone()
            dist.all_reduce(x, group=MP["group"])
            return x

        @staticmethod
        def backward(ctx, g):
            return g

    class GatherFromTP(torch.autograd.Function):  # all-gather on the last dim, backward: own slice
        @staticmethod
        def forward(ctx, x):
            parts = [torch.empty_like(x) for _ in range(MP["size"])]
            dist.all_gather(parts, x.contiguous(), group=MP["group"])
            ctx.n = x.shape[-1]
            return torch.cat(parts, dim=-1)

        @staticmethod
        def backward(ctx, g):
            return g[..., MP["rank"] * ctx.n:(MP["rank"] + 1) * ctx.n].contiguous()

    def seeded(tag):
        return torch.Generator().manual_seed(args.seed * 7919 + sum(map(ord, tag)))

    def shard(full, dim):  # this tp rank's slice of a full tensor
        n = full.shape[dim] // tp
        return full.narrow(dim, MP["rank"] * n, n).clone()

    def two_halves(full):  # swiglu: [gate; up] -> this rank's [gate_t; up_t]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([shard(gate, 0), shard(up, 0)], dim=0)

    def param(t, split):
        p = nn.Parameter(t)
        if split != REPLICATED:  # DeepSpeed's grad norm counts these on every tp rank
            p.tensor_model_parallel = True
        return p

    def ln(norm, x):  # normalise in fp32 (CPU layer_norm rejects bf16 params with fp32 input)
        return torch.nn.functional.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(),
                                              norm.bias.float(), norm.eps).to(x.dtype)

    class LayerNorm(nn.LayerNorm):
        def __init__(self, tag):
            super().__init__(h)
            g = seeded(tag)
            with torch.no_grad():
                self.weight.copy_(1 + 0.1 * torch.randn(h, generator=g))
                self.bias.copy_(0.1 * torch.randn(h, generator=g))

    class VocabParallelEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            full = torch.randn(vpad, h, generator=seeded("embed")) * 0.02
            self.weight = param(shard(full, 0), VOCAB)

        def forward(self, ids):
            rows = self.weight.shape[0]
            lo = MP["rank"] * rows
            mask = (ids < lo) | (ids >= lo + rows)
            out = torch.nn.functional.embedding((ids - lo).masked_fill(mask, 0), self.weight)
            out = out.masked_fill(mask.unsqueeze(-1), 0)
            return ReduceFromTP.apply(out)

    class EmbeddingPipe(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = VocabParallelEmbedding()

        def forward(self, ids):
            return self.word_embeddings(ids.long())

    class Attention(nn.Module):
        def __init__(self, tag):
            super().__init__()
            g = seeded(tag + "attn")
            self.query_key_value = nn.Module()
            qkv_w = torch.randn(3 * h, h, generator=g) * 0.05
            qkv_b = torch.randn(3 * h, generator=g) * 0.02
            # Megatron orders qkv by head: each rank's rows are its heads' [q; k; v]
            self.query_key_value.weight = param(shard(qkv_w, 0), COLUMN)
            self.query_key_value.bias = param(shard(qkv_b, 0), COLUMN)
            self.dense = nn.Module()
            self.dense.weight = param(shard(torch.randn(h, h, generator=g) * 0.05, 1), ROW)
            self.dense.bias = param(torch.randn(h, generator=g) * 0.02, REPLICATED)

        def forward(self, x):
            b, s, _ = x.shape
            x = CopyToTP.apply(x)
            qkv = x @ self.query_key_value.weight.t() + self.query_key_value.bias
            local = heads // tp
            q, k, v = qkv.view(b, s, local, 3, -1).unbind(3)
            att = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) / q.shape[-1] ** 0.5
            att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            ctx = torch.einsum("bhst,bthd->bshd", att, v.float()).to(x.dtype).reshape(b, s, -1)
            return ReduceFromTP.apply(ctx @ self.dense.weight.t()) + self.dense.bias

    class MLP(nn.Module):
        def __init__(self, tag):
            super().__init__()
            g = seeded(tag + "mlp")
            self.dense_h_to_4h = nn.Module()
            self.dense_h_to_4h.weight = param(two_halves(torch.randn(2 * ffn, h, generator=g) * 0.05), TWO)
            self.dense_h_to_4h.bias = param(two_halves(torch.randn(2 * ffn, generator=g) * 0.02), TWO)
            self.dense_4h_to_h = nn.Module()
            self.dense_4h_to_h.weight = param(shard(torch.randn(h, ffn, generator=g) * 0.05, 1), ROW)
            self.dense_4h_to_h.bias = param(torch.randn(h, generator=g) * 0.02, REPLICATED)

        def forward(self, x):
            x = CopyToTP.apply(x)
            a, b = (x @ self.dense_h_to_4h.weight.t() + self.dense_h_to_4h.bias).chunk(2, dim=-1)
            y = torch.nn.functional.silu(a) * b
            return ReduceFromTP.apply(y @ self.dense_4h_to_h.weight.t()) + self.dense_4h_to_h.bias

    class ParallelTransformerLayerPipe(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.input_layernorm = LayerNorm(f"ln1.{i}")
            self.self_attention = Attention(f"{i}")
            self.post_attention_layernorm = LayerNorm(f"ln2.{i}")
            self.mlp = MLP(f"{i}")

        def forward(self, x):
            x = x + self.self_attention(ln(self.input_layernorm, x))
            return x + self.mlp(ln(self.post_attention_layernorm, x))

    class FinalNorm(LayerNorm):
        def forward(self, x):
            return ln(self, x)

    def head_fn(embed, x):  # the tied embedding as the output layer: vocab-parallel logits, gathered
        logits = CopyToTP.apply(x) @ embed.word_embeddings.weight.t()
        return GatherFromTP.apply(logits)[..., :args.vocab]

    def transpose(x):  # parameterless layers, like Megatron's lambdas: gaps in the layer numbering
        return x * 1.0

    def to_ids(ids):  # Megatron's first layer is a lambda too: the embedding is layer_01 (ds_to_universal needs that)
        return ids.long()

    specs = [to_ids, TiedLayerSpec("embed", EmbeddingPipe, tied_weight_attr="word_embeddings.weight"), transpose]
    specs += [LayerSpec(ParallelTransformerLayerPipe, i) for i in range(args.layers)]
    specs += [transpose, LayerSpec(FinalNorm, "final"),
              TiedLayerSpec("embed", EmbeddingPipe, forward_fn=head_fn, tied_weight_attr="word_embeddings.weight")]
    return specs


def build_pipeline_module(args, rank):
    import torch
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    topo = PipeModelDataParallelTopology(num_pp=args.pp, num_mp=args.tp, num_dp=args.dp)
    MP.update(rank=topo.get_coord(rank).model, size=args.tp)
    torch.manual_seed(args.seed)

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), labels.reshape(-1))

    module = PipelineModule(layers=build_specs(args), topology=topo, loss_fn=loss_fn,
                            partition_method="type:ParallelTransformerLayerPipe")
    MP["group"] = module._grid.get_slice_parallel_group()
    return module


def ds_config(args):
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": args.micro_batches,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": args.stage},
        "bf16": {"enabled": args.dtype == "bf16"},
    }
    if args.grad_accum_dtype:  # bf16 + fp32 accumulation => BF16_Optimizer (BLOOM's setup)
        cfg["data_types"] = {"grad_accum_dtype": args.grad_accum_dtype}
    return cfg


def make_engine(args, rank, seed):
    import torch
    import deepspeed
    keep = args.seed
    args.seed = seed
    module = build_pipeline_module(args, rank)
    args.seed = keep
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config(args))
    return engine


def split_of(name):
    """This model's split of a param (the manifest's truth, independent of the patterns)."""
    if name == "tied_modules.embed.word_embeddings.weight":
        return VOCAB, 0
    if name.endswith(("query_key_value.weight", "query_key_value.bias")):
        return COLUMN, 0
    if name.endswith(("dense.weight", "dense_4h_to_h.weight")):
        return ROW, 1
    if ".dense_h_to_4h." in name:
        return TWO, 0
    return REPLICATED, None


def rank_state(engine):
    """This rank's fp32 master shards and its layer-file map."""
    from deepspeed.utils import safe_get_full_fp32_param
    module, grid = engine.module, engine.grid
    masters = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:  # ZeRO-0 fp32: the param is the master
            full = p
        masters[name] = full.detach().float().cpu().clone()
    id2name = {id(t): n for n, t in module.named_parameters()}
    layers = {}
    for local, func in enumerate(module.forward_funcs):
        idx = local + module._local_start
        entry = {"stage": grid.get_stage_id(), "file": None, "keys": {}}
        if hasattr(func, "state_dict"):
            entry["file"] = os.path.basename(module.ckpt_layer_path("", local))
            named = dict(func.named_parameters())
            entry["keys"] = {k: id2name.get(id(named.get(k))) for k in func.state_dict()}
        layers[idx] = entry
    return {"stage": grid.get_stage_id(), "tp": grid.get_slice_parallel_rank(), "dp": grid.get_data_parallel_id(),
            "masters": masters, "layers": layers}


def join(name, shards, vocab):
    """The full tensor of a param from its tp shards {tp: tensor}."""
    import torch
    kind, dim = split_of(name)
    parts = [shards[t] for t in sorted(shards)]
    if kind == REPLICATED:
        if any(not torch.equal(parts[0], p) for p in parts[1:]):
            raise RuntimeError(f"replicated {name} differs across tp ranks")
        return parts[0]
    if kind == TWO:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    full = torch.cat(parts, dim=dim)
    return full[:vocab].clone() if kind == VOCAB else full


def train_rank(rank, args, port):
    world = args.pp * args.tp * args.dp
    deepspeed = setup_rank(rank, world, port)
    import torch
    engine = make_engine(args, rank, args.seed)
    dp_id = engine.grid.get_data_parallel_id()
    gen = torch.Generator().manual_seed(args.seed * 1000 + dp_id)  # same data on every stage/tp rank of a replica

    def data():
        while True:
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
            yield ids, torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    it = data()
    loss = None
    for _ in range(args.steps):
        loss = engine.train_batch(data_iter=it)
    tag = f"global_step{engine.global_steps}"
    t0 = time.time()
    engine.save_checkpoint(args.out, tag=tag,
                           client_state={"universal_checkpoint_info": universal_checkpoint_info(args.vocab)})
    save_s = time.time() - t0
    allv = gather_to_rank0(rank_state(engine))
    if rank == 0:
        shards, layers, stages, problems = {}, {}, {}, []
        for st in allv:
            for name, t in st["masters"].items():
                have = shards.setdefault(name, {}).setdefault(st["tp"], t)
                if not torch.equal(have, t):  # dp replicas and tied stage copies agree
                    problems.append(f"{name} tp {st['tp']} stage {st['stage']} dp {st['dp']}")
                stages.setdefault(name, set()).add(st["stage"])
            if st["dp"] == 0:
                for idx, e in st["layers"].items():
                    layers.setdefault(idx, {"stage": e["stage"], "files": {}, "keys": e["keys"]})
                    if e["file"]:
                        layers[idx]["files"][st["tp"]] = e["file"]
        ref = {n: join(n, s, args.vocab) for n, s in shards.items()}
        torch.save(ref, os.path.join(args.out, "reference_fp32.pt"))
        info = {"tag": tag, "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
                "final_loss_last_stage": None if loss is None else float(loss),
                "save_seconds_rank0": round(save_s, 3), "optimizer_class": type(engine.optimizer).__name__,
                "model_param_dtype": str(next(engine.module.parameters()).dtype),
                "parts": [int(x) for x in engine.module.parts],
                "shard_shapes": {n: {str(t): list(v.shape) for t, v in s.items()} for n, s in shards.items()},
                "layers": {str(k): layers[k] for k in sorted(layers)},
                "param_stages": {k: sorted(v) for k, v in stages.items()}, "copies_disagree": problems,
                "ds_config": ds_config(args)}
        with open(os.path.join(args.out, ".rank0_info.json"), "w") as f:
            json.dump(info, f)
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def shard_of(name, full, tp, t, vocab):
    """Tp rank t's shard of a full reference tensor (the inverse of join)."""
    import torch
    kind, dim = split_of(name)
    if kind == REPLICATED:
        return full
    if kind == TWO:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]], dim=0)
    if kind == VOCAB:
        pad = padded_vocab(vocab, tp) - full.shape[0]
        full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
    return full.chunk(tp, dim=dim)[t]


def load_rank(rank, args, port, result_path):
    world = args.pp * args.tp * args.dp
    deepspeed = setup_rank(rank, world, port)
    import torch
    engine = make_engine(args, rank, args.seed + 777)  # another init: every value must come from the files
    path, _ = engine.load_checkpoint(args.out, load_optimizer_states=True, load_lr_scheduler_states=False)
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    st = rank_state(engine)
    bad = []
    for name, t in st["masters"].items():
        want = shard_of(name, ref[name], args.tp, st["tp"], args.vocab)
        if split_of(name)[0] == VOCAB:  # padding rows are not in the reference
            t, want = t[:want.shape[0]], want
            n = max(0, min(want.shape[0], args.vocab - st["tp"] * want.shape[0]))
            t, want = t[:n], want[:n]
        if not torch.equal(t, want):
            bad.append(f"{name}@tp{st['tp']}")
    res = gather_to_rank0({"bad": bad, "checked": len(st["masters"])})
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"loaded": path and os.path.relpath(path, args.out), "checked": sum(r["checked"] for r in res),
                       "mismatched": sorted({b for r in res for b in r["bad"]})}, f)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    engine.train_batch(data_iter=iter([(ids, ids)] * args.micro_batches))  # and training goes on
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def _train_entry(rank, args, port):
    train_rank(rank, args, port)
    _quiet_exit()


def _load_entry(rank, args, port, result_path):
    load_rank(rank, args, port, result_path)
    _quiet_exit()


# ----------------------------------------------------------------------------- checks + manifest

def check_layer_files(args, tag, info):
    """Every layer file tensor equals the reference shard cast to the model dtype."""
    import torch
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    bad, n = [], 0
    for idx, e in info["layers"].items():
        for t, fn in e["files"].items():
            sd = torch.load(os.path.join(args.out, tag, fn), weights_only=True)
            for key, t16 in sd.items():
                name, n = e["keys"].get(key), n + 1
                want = shard_of(name, ref[name], args.tp, int(t), args.vocab).to(dtype)
                rows = min(want.shape[0], t16.shape[0])
                if split_of(name)[0] == VOCAB:
                    rows = max(0, min(rows, args.vocab - int(t) * t16.shape[0]))
                if t16.dtype != dtype or t16.shape != want.shape or not torch.equal(t16[:rows], want[:rows]):
                    bad.append(f"{fn}:{key}")
    return {"tensors_checked": n, "mismatched": bad, "ok": not bad and n > 0}


def run_loader(args):
    import torch.multiprocessing as mp
    result = os.path.join(args.out, ".load.json")
    try:
        mp.start_processes(_load_entry, args=(args, free_port(), result), nprocs=args.pp * args.tp * args.dp,
                           start_method="spawn")
    except Exception as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return {"ok": False, "error": lines[-1] if lines else repr(e)}
    with open(result) as f:
        res = json.load(f)
    os.remove(result)
    res["ok"] = not res["mismatched"] and res["checked"] > 0
    return res


def run_universal(args, tag):
    """DeepSpeed's own ds_to_universal.py on the checkpoint; its fp32.pt files against the reference.
    Written to a temporary dir (or --universal-out), so --out holds only the checkpoint."""
    import tempfile
    import torch
    src = os.path.join(args.out, tag)
    dst = args.universal_out or os.path.join(tempfile.mkdtemp(prefix="pptp_universal_"), "universal")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
           "--output_folder", dst, "--num_extract_workers", "1", "--num_merge_workers", "1"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    res = {"returncode": p.returncode, "seconds": round(time.time() - t0, 2)}
    if p.returncode != 0:
        res["error"] = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-3:]
        res["ok"] = False
        return res
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    zero = os.path.join(dst, "zero")
    bad, n = [], 0
    for name in sorted(os.listdir(zero)):
        f = os.path.join(zero, name, "fp32.pt")
        if os.path.isfile(f):
            t = torch.load(f, weights_only=False)["param"]
            n += 1
            if name not in ref or t.shape != ref[name].shape or not torch.equal(t, ref[name]):
                bad.append(name)
    res.update(fp32_files_checked=n, mismatched=bad, missing=sorted(set(ref) - set(os.listdir(zero))))
    res["ok"] = not bad and not res["missing"]
    if res["ok"]:  # DeepSpeed's own joined Adam moments, for checking a converter's --state all
        moments = {state: {name: torch.load(os.path.join(zero, name, f"{state}.pt"), weights_only=False)["param"]
                           for name in ref} for state in ("exp_avg", "exp_avg_sq")}
        torch.save(moments, os.path.join(args.out, "reference_moments.pt"))
        res["reference_moments"] = "reference_moments.pt: {exp_avg, exp_avg_sq: {name: tensor}} from its zero/*/"
    if not args.universal_out:
        shutil.rmtree(os.path.dirname(dst))
    return res


def write_manifest(args, info, checks):
    import torch
    import deepspeed
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    where = {}
    for idx, e in info["layers"].items():
        for key, name in e["keys"].items():
            for t, fn in sorted(e["files"].items()):
                where.setdefault(name, []).append({"layer": int(idx), "tp": int(t), "file": fn, "key": key})
    params = {}
    for name, t in ref.items():
        kind, dim = split_of(name)
        params[name] = {"shape": list(t.shape), "numel": t.numel(), "frozen": False, "kind": kind, "dim": dim,
                        "shard_shape": info["shard_shapes"][name]["0"], "shard_shapes": info["shard_shapes"][name],
                        "stages": info["param_stages"][name], "layer_files": where.get(name, [])}
    files = {}
    for root, _, fs in os.walk(args.out):
        for fn in fs:
            path = os.path.join(root, fn)
            files[os.path.relpath(path, args.out)] = os.path.getsize(path)
    manifest = {
        "generator": "make_ds_pptp.py", "layout": "pipeline_tp", "pp": args.pp, "tp": args.tp, "dp": args.dp,
        "world_size": args.pp * args.tp * args.dp, "stage": args.stage, "dtype": args.dtype,
        "grad_accum_dtype": args.grad_accum_dtype, "topology": "pipe-model-data",
        "deepspeed_version": deepspeed.__version__, "torch_version": torch.__version__,
        "python_version": sys.version.split()[0], "seed": args.seed, "steps": args.steps,
        "micro_batches": args.micro_batches, "batch": args.batch, "seq": args.seq,
        "model": {"hidden": args.hidden, "ffn": args.ffn, "heads": args.heads, "layers": args.layers,
                  "vocab": args.vocab, "padded_vocab": padded_vocab(args.vocab, args.tp), "tied": True,
                  "num_params_unique": sum(p["numel"] for p in params.values())},
        "mp_rank_meaning": "mp_rank_SS = stage * tp + tp rank (grid.ds_model_rank); layer_XX-model_TT: tp rank TT",
        "universal_checkpoint_info": universal_checkpoint_info(args.vocab),
        "params": params, "tied": {"tied_modules.embed.word_embeddings.weight":
                                   {"stages": info["param_stages"]["tied_modules.embed.word_embeddings.weight"]}},
        "buffers": {},
        **{k: v for k, v in info.items() if k not in ("shard_shapes",)},
        "files": dict(sorted(files.items())), "total_bytes": sum(files.values()), "checks": checks,
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--stage", type=int, choices=[0, 1], default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--grad-accum-dtype", choices=["fp32"], help="bf16 + fp32 => BF16_Optimizer (BLOOM)")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=24, help="swiglu width (dense_h_to_4h is 2*ffn rows)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=61, help="original vocab; padded to a multiple of 4*tp")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--universal", action="store_true", help="also run ds_to_universal.py and compare")
    ap.add_argument("--universal-out", help="keep ds_to_universal's output here (default: deleted)")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    args = ap.parse_args(argv)
    if args.layers < args.pp or args.heads % args.tp or args.hidden % args.heads or args.ffn % args.tp:
        ap.error("need layers >= pp, heads % tp == 0, hidden % heads == 0, ffn % tp == 0")
    if os.path.isdir(args.out) and os.listdir(args.out):
        sys.exit(f"{args.out} exists and is not empty")
    os.makedirs(args.out, exist_ok=True)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.multiprocessing as mp
    t0 = time.time()
    mp.start_processes(_train_entry, args=(args, free_port()), nprocs=args.pp * args.tp * args.dp,
                       start_method="spawn")
    with open(os.path.join(args.out, ".rank0_info.json")) as f:
        info = json.load(f)
    os.remove(os.path.join(args.out, ".rank0_info.json"))
    info["train_and_save_seconds"] = round(time.time() - t0, 2)
    tag = info["tag"]
    checks = {"replicas_and_tied_copies_equal": not info["copies_disagree"]}
    if args.verify:
        checks["layer_files_equal_reference"] = check_layer_files(args, tag, info)
        reload = run_loader(args)
        if not reload["ok"] and args.stage == 0 and info["optimizer_class"] == "BF16_Optimizer":
            # DeepSpeed 0.19.8's own gap (as make_ds_pipeline.py records it): ZeRO-0 bf16 pipelines
            # save BF16_Optimizer files AND dp rank 0's optimizer state in mp_rank_SS; on load that
            # one dict is indexed by dp rank (KeyError). The files themselves are complete.
            reload["known_gap"] = "DeepSpeed cannot reload ZeRO-0 bf16 (BF16_Optimizer) pipeline checkpoints"
        checks["deepspeed_reload_same_topology"] = reload
    if args.universal:
        uni = run_universal(args, tag)
        if not uni["ok"]:
            uni["known_gap"] = "ds_to_universal.py does not reproduce the reference (see error/mismatched)"
        checks["ds_to_universal"] = uni
    m = write_manifest(args, info, checks)
    ok = all(v is True or (isinstance(v, dict) and (v.get("ok") or v.get("known_gap"))) for v in checks.values())
    print(f"[make_ds_pptp] pp={args.pp} tp={args.tp} dp={args.dp} zero={args.stage} dtype={args.dtype} "
          f"optimizer={info['optimizer_class']} params={m['model']['num_params_unique']} bytes={m['total_bytes']} "
          f"total={time.time() - t0:.1f}s checks: {'OK' if ok else 'FAILED'}")
    print(json.dumps(checks, indent=1))
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
