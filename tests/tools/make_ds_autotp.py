#!/usr/bin/env python3
# ruff: noqa  -- a copy of the team's generator, kept verbatim apart from this line
"""Generate REAL DeepSpeed AutoTP (tensor-parallel training) checkpoints on CPU.

Trains a small model with DeepSpeed's AutoTP training ("tensor_parallel": {"autotp_size": TP}) on
--world-size CPU processes (gloo on 127.0.0.1; data-parallel size = world/TP), ZeRO stage 0-3, then
engine.save_checkpoint(). Two models:

  --model toy    Llama-named toy model (q/k/v/o_proj, fused gate_up_proj, down_proj, LayerNorms),
                 sharded through "partition_config" layer specs; needs only torch + deepspeed
  --model llama  a tiny transformers LlamaForCausalLM built from a config (needs transformers);
                 sharded through the model's HF tp_plan, like a real HF run

Writes into --out:
  <out>/latest, <out>/<tag>/...   DeepSpeed's files, untouched: one set per TP rank (mp_rank_TT):
        ZeRO 0-2: mp_rank_TT_model_states.pt (TP shard of every weight, plus universal_checkpoint_info)
        ZeRO 1-2: [bf16_]zero_pp_rank_D_mp_rank_TT_optim_states.pt
        ZeRO 3:   zero_pp_rank_D_mp_rank_TT_model_states.pt + [bf16_]zero_pp_rank_D_mp_rank_TT_optim_states.pt
  <out>/reference_fp32.pt   the FULL (un-split) fp32 masters {HF name: tensor}; tied names share one
                            tensor; persistent buffers
  <out>/manifest.json       per param: logical shape, TP shard shape, split kind (column/row/vocab/
                            replicated/sub-params) and split dim, and the checks below

The reference is assembled from every TP rank's fp32 master shard (safe_get_full_fp32_param) with the
affine map DeepSpeed itself records, and cross-checked against a rule based on the module classes
(LinearLayer: dim 0, LinearAllreduce: dim 1, ...). Verification (unless --no-verify): the shards in
the model-state files equal the reference shards cast to the model dtype; a fresh engine reloads the
checkpoint (engine.load_checkpoint) and gives back the same shards; DeepSpeed's ds_to_universal
merges the TP shards and its fp32.pt files must equal the reference; --universal-load also loads that
universal checkpoint at another data-parallel size.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time


# ----------------------------------------------------------------------------- models

def build_toy(args):
    import torch
    import torch.nn as nn
    d, inter, hd = args.hidden, args.intermediate, args.head_dim

    def ln32(n, x):  # normalise in fp32 (CPU layer_norm rejects mixed dtypes)
        return torch.nn.functional.layer_norm(x.float(), n.normalized_shape, n.weight.float(), n.bias.float(),
                                              n.eps).to(x.dtype)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(d, d, bias=True)  # column bias is split too
            self.k_proj = nn.Linear(d, d, bias=False)
            self.v_proj = nn.Linear(d, d, bias=False)
            self.o_proj = nn.Linear(d, d, bias=True)  # row-parallel: bias stays whole

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            nh = q.shape[-1] // hd  # heads held by this TP rank
            q, k, v = (z.view(b, t, nh, hd).transpose(1, 2) for z in (q, k, v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(a.transpose(1, 2).reshape(b, t, nh * hd))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Linear(d, 2 * inter, bias=False)  # fused [gate; up], sub-param split
            self.down_proj = nn.Linear(inter, d, bias=False)

        def forward(self, x):
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(torch.nn.functional.silu(g) * u)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = nn.LayerNorm(d)
            self.self_attn = Attn()
            self.post_attention_layernorm = nn.LayerNorm(d)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.self_attn(ln32(self.input_layernorm, x))
            return x + self.mlp(ln32(self.post_attention_layernorm, x))

    class ToyLlama(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(args.vocab, d)
            self.model.layers = nn.ModuleList([Layer() for _ in range(args.layers)])
            self.model.norm = nn.LayerNorm(d)
            self.register_buffer("logit_scale", torch.tensor(1.0))  # persistent buffer
            self.lm_head = nn.Linear(d, args.vocab, bias=False)

        def forward(self, ids):
            x = self.model.embed_tokens(ids)
            for layer in self.model.layers:
                x = layer(x)
            return self.lm_head(ln32(self.model.norm, x)) * self.logit_scale.to(x.dtype)

    return ToyLlama()


def toy_partition_config(args):
    specs = [
        {"patterns": [r".*\.o_proj\.weight$", r".*\.down_proj\.weight$"], "partition_type": "row"},
        {"patterns": [r".*\.[qkv]_proj\.weight$"], "partition_type": "column"},
        # fused [gate; up]: each TP rank gets its slice of gate AND its slice of up
        {"patterns": [r".*\.gate_up_proj\.weight$"], "partition_type": "column", "shape": [2, -1],
         "partition_dim": 0},
    ]
    if args.vocab_parallel_head:
        specs.append({"patterns": [r"^lm_head\.weight$"], "partition_type": "column"})
    return {"use_default_specs": False, "layer_specs": specs}


def build_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    conf = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // args.head_dim,
                       num_key_value_heads=max(args.tp, (args.hidden // args.head_dim) // 2),
                       max_position_embeddings=64, tie_word_embeddings=args.tied)
    return LlamaForCausalLM(conf)


def ds_config(args, load_universal=False):
    tp = {"autotp_size": args.tp}
    if args.model == "toy":
        tp["partition_config"] = toy_partition_config(args)
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": args.stage},
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {"enabled": args.dtype == "fp16", "initial_scale_power": 8, "loss_scale_window": 100},
        "tensor_parallel": tp,
    }
    if args.stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


# ----------------------------------------------------------------------------- per rank

def setup_rank(rank, world, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    import importlib
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import deepspeed
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # unused shm op
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    return deepspeed


def make_engine(args, seed, world, load_universal=False):
    import torch
    import deepspeed
    torch.manual_seed(seed)  # same full model on every rank; AutoTP then keeps each rank's shard
    model = build_toy(args) if args.model == "toy" else build_llama(args)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(args, load_universal))
    return engine


def full_fp32_shard(engine, p):
    """fp32 master of this rank's TP shard (gathered over the data-parallel group)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param
    full = safe_get_full_fp32_param(p)
    if full is not None:
        return full.detach().float().cpu().clone()
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups):
            for a, b in zip(g16, g32):
                if a is p:
                    return b.detach().float().cpu().clone()
    if p.dtype == torch.float32:
        return p.detach().cpu().clone()
    raise RuntimeError("no fp32 master found")


SPLIT_RULES = {  # module class -> {param leaf: (kind, dim)}; everything else is replicated
    "LinearLayer": {"weight": ("column", 0), "bias": ("column", 0)},
    "VocabParallelLinear": {"weight": ("vocab", 0), "bias": ("vocab", 0)},
    "SubParamColumnParallel": {"weight": ("column-subparams", 0), "bias": ("column-subparams", 0)},
    "GateUpPack_LinearLayer": {"weight": ("column-subparams", 0), "bias": ("column-subparams", 0)},
    "fused_LinearLayer": {"weight": ("column-subparams", 0), "bias": ("column-subparams", 0)},
    "SubParamLinearLayer": {"weight": ("column-subparams", 0), "bias": ("column-subparams", 0)},
    "SubParamLinearAllreduce": {"weight": ("row-subparams", 1), "bias": ("replicated", None)},
    "LinearAllreduce": {"weight": ("row", 1), "bias": ("replicated", None)},
    "VocabParallelEmbedding": {"weight": ("vocab", 0)},
    "HiddenParallelEmbedding": {"weight": ("column", 1)},
}


def rank_state(engine):
    import torch
    from deepspeed.utils import groups
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    module = engine.module
    shards, kinds = {}, {}
    for name, p in module.named_parameters():
        shards[name] = full_fp32_shard(engine, p)
        mod_name, _, leaf = name.rpartition(".")
        cls = type(module.get_submodule(mod_name)).__name__ if mod_name else type(module).__name__
        kind, dim = SPLIT_RULES.get(cls, {}).get(leaf, ("replicated", None))
        kinds[name] = {"module_class": cls, "kind": kind, "dim": dim}
    buffers = {}
    for name, b in module.named_buffers():
        mod_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(mod_name) if mod_name else module
        if leaf not in owner._non_persistent_buffers_set:
            b = b.detach().cpu().clone()
            buffers[name] = b.float() if b.is_floating_point() else b
    aliases = {}
    first = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[n] = first[id(p)]
        else:
            first[id(p)] = n
    uc = getattr(module, UNIVERSAL_CHECKPOINT_INFO, None)
    return {"tp": groups.get_tensor_model_parallel_rank(), "dp": groups.get_data_parallel_rank(),
            "shards": shards, "kinds": kinds, "buffers": buffers, "aliases": aliases,
            "uc_info": uc}


def gather(obj):
    import deepspeed.comm as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def assemble(states, tp):
    """Full tensors from the TP shards of dp-rank-0 states, two ways: affine map and class rule."""
    import re
    import torch
    from deepspeed.checkpoint.constants import AFFINE_MAP, AFFINE_MAP_PARAMS
    by_tp = {s["tp"]: s for s in states if s["dp"] == 0}
    assert sorted(by_tp) == list(range(tp)), sorted(by_tp)
    uc = by_tp[0]["uc_info"] or {}
    amap = (uc.get(AFFINE_MAP) or {}).get(AFFINE_MAP_PARAMS, {})
    full, rule_full, problems, split = {}, {}, [], {}
    for name in by_tp[0]["shards"]:
        parts = [by_tp[r]["shards"][name] for r in range(tp)]
        kind = by_tp[0]["kinds"][name]
        # 1) class rule
        if kind["kind"] == "replicated":
            if not all(torch.equal(parts[0], x) for x in parts):
                problems.append(f"{name}: replicated copies differ across TP ranks")
            rule = parts[0]
        elif kind["kind"] == "column-subparams":
            # each shard is [sub_0 slice; sub_1 slice; ...] along dim 0 - regroup per sub-param
            nsub = 2
            rule = torch.cat([torch.cat([x.chunk(nsub, 0)[i] for x in parts], 0) for i in range(nsub)], 0)
        else:
            rule = torch.cat(parts, kind["dim"])
        # 2) DeepSpeed's affine map (logical shape + per-rank pieces: offsets/strides)
        entry = next((v for pat, v in amap.items() if re.fullmatch(pat, name)), None)
        if entry is not None:
            logical = torch.zeros(entry["logical_shape"], dtype=torch.float32)
            for r in range(tp):
                for pc in entry["ranks"][r]["pieces"] if r in entry["ranks"] else entry["ranks"][str(r)]["pieces"]:
                    (soff, sstr), (doff, dstr) = pc["source"], pc["dest"]
                    src = torch.as_strided(parts[r].contiguous(), pc["shape"], dstr, doff)
                    torch.as_strided(logical, pc["shape"], sstr, soff).copy_(src)
            a = logical
            same = a.shape == rule.shape and torch.equal(a, rule)
            # a padded vocab shard: the map's logical shape is the original (unpadded) vocab
            trimmed = (a.dim() == rule.dim() and a.shape[1:] == rule.shape[1:] and a.shape[0] < rule.shape[0]
                       and torch.equal(rule[:a.shape[0]], a))
            if not (same or trimmed):
                problems.append(f"{name}: affine map and class rule disagree")
            full[name] = a
        else:
            full[name] = rule
        rule_full[name] = rule
        split[name] = {**kind, "shard_shape": list(parts[0].shape), "logical_shape": list(full[name].shape),
                       "affine_map": entry is not None}
    return full, split, problems, uc


def train_rank(rank, args, port):
    deepspeed = setup_rank(rank, args.world_size, port)
    import torch
    engine = make_engine(args, args.seed, args.world_size)
    from deepspeed.utils import groups
    dp_rank = groups.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(args.seed * 1000 + dp_rank)  # same batch inside a TP group
    loss = None
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        if args.model == "llama":
            loss = engine(input_ids=ids, labels=ids).loss
        else:
            tgt = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
            loss = torch.nn.functional.cross_entropy(engine(ids).float().reshape(-1, args.vocab), tgt.reshape(-1))
        engine.backward(loss)
        engine.step()
    tag = args.tag or f"global_step{engine.global_steps}"
    t0 = time.time()
    engine.save_checkpoint(args.out, tag=tag)
    save_s = time.time() - t0
    states = gather(rank_state(engine))
    if rank == 0:
        full, split, problems, uc = assemble(states, args.tp)
        ref = dict(full)
        for alias, owner in states[0]["aliases"].items():
            ref[alias] = ref[owner]  # tied names share one tensor
        ref.update(states[0]["buffers"])
        torch.save(ref, os.path.join(args.out, "reference_fp32.pt"))
        # shards per TP rank, for the file check
        torch.save({s["tp"]: s["shards"] for s in states if s["dp"] == 0}, os.path.join(args.out, ".shards.pt"))
        info = {"tag": tag, "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
                "final_loss_rank0": float(loss.detach()), "save_seconds_rank0": round(save_s, 3),
                "optimizer_class": type(engine.optimizer).__name__,
                "model_param_dtype": str(next(engine.module.parameters()).dtype),
                "split": split, "assembly_problems": problems, "tied": states[0]["aliases"],
                "buffers": sorted(states[0]["buffers"]),
                "rank_grid": [{"rank": r, "tp_rank": s["tp"], "dp_rank": s["dp"]} for r, s in enumerate(states)],
                "universal_checkpoint_info_patterns": {k: v for k, v in (uc or {}).items() if k != "affine_map"},
                "ds_config": ds_config(args)}
        with open(os.path.join(args.out, ".rank0_info.json"), "w") as f:
            json.dump(info, f, default=str)
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def load_rank(rank, args, port, world, universal, result_path):
    deepspeed = setup_rank(rank, world, port)
    import torch
    engine = make_engine(args, args.seed + 777, world, load_universal=universal)
    with torch.no_grad():  # buffers do not depend on the seed: spoil them so the load is tested
        for b in engine.module.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    path, _ = engine.load_checkpoint(args.out, load_optimizer_states=True, load_lr_scheduler_states=False)
    st = rank_state(engine)
    shards = torch.load(os.path.join(args.out, ".shards.pt"), weights_only=True)[st["tp"]]
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    bad = [n for n, t in st["shards"].items() if n not in shards or not torch.equal(t, shards[n])]
    bad_buf = [n for n, t in st["buffers"].items() if not torch.equal(t, ref[n])]
    res = gather({"bad": bad, "bad_buf": bad_buf, "n": len(st["shards"])})
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"loaded": os.path.relpath(path, args.out), "world_size": world, "universal": universal,
                       "checked_shards": sum(r["n"] for r in res),
                       "mismatched": sorted({b for r in res for b in r["bad"]}),
                       "mismatched_buffers": sorted({b for r in res for b in r["bad_buf"]}),
                       "global_steps": engine.global_steps}, f)
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def _quiet_exit():
    """End a finished child without interpreter teardown: gloo/torch threads occasionally abort there
    ("terminate called without an active exception", SIGABRT) after all work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_entry(rank, args, port):
    train_rank(rank, args, port)
    _quiet_exit()


def _load_entry(rank, args, port, world, universal, result_path):
    load_rank(rank, args, port, world, universal, result_path)
    _quiet_exit()


# ----------------------------------------------------------------------------- checks

def check_model_files(args, tag):
    """ZeRO 0-2: mp_rank_TT_model_states.pt["module"] must hold the TP shards in the model dtype."""
    import torch
    if args.stage == 3:
        return {"skipped": "ZeRO-3 model files hold empty placeholders", "ok": True}
    shards = torch.load(os.path.join(args.out, ".shards.pt"), weights_only=True)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bad, n = [], 0
    for tp_rank, sh in shards.items():
        sd = torch.load(os.path.join(args.out, tag, f"mp_rank_{tp_rank:02d}_model_states.pt"), weights_only=False)
        for name, t in sh.items():
            n += 1
            got = sd["module"].get(name)
            if got is None or got.dtype != dt or not torch.equal(t.to(dt), got):
                bad.append(f"mp_rank_{tp_rank:02d}:{name}")
    return {"tensors_checked": n, "mismatched": bad, "ok": not bad}


def run_universal(args, tag, tied=None):
    src, dst = os.path.join(args.out, tag), os.path.join(args.out, f"{tag}_universal")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src, "--output_folder",
           dst, "--num_extract_workers", "2", "--num_merge_workers", "1"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    res = {"returncode": p.returncode, "seconds": round(time.time() - t0, 2)}
    if p.returncode != 0:
        res["error"] = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1:]
        return res, None
    import torch
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    bad, n, keys = [], 0, {}
    zero = os.path.join(dst, "zero")
    for name in sorted(os.listdir(zero)):
        f = os.path.join(zero, name, "fp32.pt")
        if not os.path.isfile(f):
            continue
        d = torch.load(f, weights_only=False)
        t = d["param"] if isinstance(d, dict) else d
        keys.setdefault(str(sorted(d) if isinstance(d, dict) else "bare tensor"), []).append(name)
        n += 1
        if name not in ref or t.numel() != ref[name].numel() or not torch.equal(t.reshape(ref[name].shape), ref[name]):
            bad.append(name)
    # Tied aliases (shared_params) are not optimizer params: ds_to_universal writes them from
    # mp_rank_00's "module" tensor, i.e. TP rank 0's shard in the model dtype. Seen with the tied
    # vocab-parallel Llama: zero/lm_head.weight/fp32.pt is [vocab/tp, hidden]. Report, do not fail.
    aliases = set(tied or {})
    alias_bad = [b for b in bad if b in aliases]
    res.update({"fp32_files_checked": n, "mismatched": [b for b in bad if b not in aliases],
                "fp32_pt_key_sets": keys, "reference_names_missing": sorted(set(ref) - set(os.listdir(zero)))})
    if alias_bad:
        res["tied_alias_mismatch"] = {b: list(torch.load(os.path.join(zero, b, "fp32.pt"), weights_only=False)
                                             ["param"].shape) for b in alias_bad}
        res["known_gap"] = ("ds_to_universal writes a tied alias from mp_rank_00's module tensor (TP rank 0's "
                            "shard, model dtype), not the merged fp32 master")
    return res, dst


def run_loader(args, world, universal):
    import torch.multiprocessing as mp
    result = os.path.join(args.out, f".load_{world}_{int(universal)}.json")
    try:
        mp.start_processes(_load_entry, args=(args, free_port(), world, universal, result), nprocs=world,
                           start_method="spawn")
    except Exception as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return {"world_size": world, "universal": universal, "ok": False, "error": lines[-1] if lines else repr(e)}
    with open(result) as f:
        res = json.load(f)
    os.remove(result)
    res["ok"] = not res["mismatched"] and (universal or not res["mismatched_buffers"])
    if universal and res["mismatched_buffers"]:
        res["known_gap"] = "load_universal restores only optimizer-owned params, not buffers"
    return res


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", choices=["toy", "llama"], default="toy")
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2, help="autotp_size (divides world size)")
    ap.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=24)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--tied", action=argparse.BooleanOptionalAction, default=False,
                    help="llama: tie_word_embeddings (AutoTP then makes a vocab-parallel embedding)")
    ap.add_argument("--vocab-parallel-head", action="store_true", help="toy: also split lm_head (column)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tag")
    ap.add_argument("--universal-load", action="store_true",
                    help="also load the universal checkpoint at world size --load-world-size")
    ap.add_argument("--load-world-size", type=int, help="default: tp if world > tp else 2*tp")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    args = ap.parse_args(argv)
    if args.world_size % args.tp:
        ap.error("--tp must divide --world-size")
    if args.tied and args.model != "llama":
        ap.error("--tied is for --model llama")
    if os.path.isdir(args.out) and os.listdir(args.out):
        sys.exit(f"{args.out} exists and is not empty")
    os.makedirs(args.out, exist_ok=True)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.multiprocessing as mp
    t0 = time.time()
    mp.start_processes(_train_entry, args=(args, free_port()), nprocs=args.world_size, start_method="spawn")
    train_s = time.time() - t0
    with open(os.path.join(args.out, ".rank0_info.json")) as f:
        info = json.load(f)
    os.remove(os.path.join(args.out, ".rank0_info.json"))
    tag = info["tag"]
    checks = {"reference_assembly": {"problems": info.pop("assembly_problems")}}
    checks["reference_assembly"]["ok"] = not checks["reference_assembly"]["problems"]
    if args.verify:
        checks["model_files_equal_reference_shards"] = check_model_files(args, tag)
        checks["deepspeed_reload"] = run_loader(args, args.world_size, universal=False)
        if args.stage == 0:  # no *_optim_states.pt files: ds_to_universal has nothing to read
            uni = {"skipped": "ZeRO-0 writes no *_optim_states.pt; ds_to_universal needs them", "ok": True,
                   "returncode": None}
        else:
            uni, _ = run_universal(args, tag, info["tied"])
            uni["ok"] = uni["returncode"] == 0 and not uni["mismatched"]
        checks["ds_to_universal_equals_reference"] = uni
        if args.universal_load and uni["returncode"] == 0:
            lw = args.load_world_size or (args.tp if args.world_size > args.tp else 2 * args.tp)
            checks["universal_load_other_dp"] = run_loader(args, lw, universal=True)
    shards_file = os.path.join(args.out, ".shards.pt")
    if os.path.exists(shards_file):
        os.remove(shards_file)

    import torch
    import deepspeed
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    files = {}
    for root, _, fs in os.walk(args.out):
        for fn in fs:
            p = os.path.join(root, fn)
            files[os.path.relpath(p, args.out)] = os.path.getsize(p)
    params = {}
    for n, t in ref.items():
        if n in info["buffers"]:
            continue
        owner = info["tied"].get(n, n)
        params[n] = {"shape": list(t.shape), "numel": t.numel(), "tied_to": info["tied"].get(n),
                     **{k: v for k, v in info["split"][owner].items() if k != "logical_shape"}}
    manifest = {
        "generator": "make_ds_autotp.py", "layout": "autotp", "model_kind": args.model,
        "world_size": args.world_size, "tp": args.tp, "dp": args.world_size // args.tp, "stage": args.stage,
        "dtype": args.dtype, "deepspeed_version": deepspeed.__version__, "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__ if args.model == "llama" else None,
        "python_version": sys.version.split()[0], "seed": args.seed, "steps": args.steps,
        "model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                  "vocab": args.vocab, "head_dim": args.head_dim, "tied": args.tied,
                  "num_params_unique": sum(ref[n].numel() for n in params if not params[n]["tied_to"])},
        "split_kinds": {"column": "cat TP shards on dim 0 (weight and bias)",
                        "row": "cat TP shards on dim 1 (weight); its bias is replicated",
                        "vocab": "cat on dim 0 (vocab), trim padding to original_vocab_size",
                        "column-subparams": "each shard is [sub0 slice; sub1 slice] on dim 0; regroup per sub-param",
                        "replicated": "identical on every TP rank"},
        "mp_rank_meaning": "mp_rank_TT in file names is the tensor-parallel rank; rank = dp_rank * tp + tp_rank",
        "params": params, "buffers": {n: list(ref[n].shape) for n in info["buffers"]},
        **{k: v for k, v in info.items() if k not in ("split", "buffers")},
        "train_and_save_seconds": round(train_s, 2),
        "files": dict(sorted(files.items())), "total_bytes": sum(files.values()), "checks": checks,
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, default=str)
    ok = all(v.get("ok") for v in checks.values())
    print(f"[make_ds_autotp] model={args.model} ws={args.world_size} tp={args.tp} zero={args.stage} dtype={args.dtype} "
          f"optimizer={info['optimizer_class']} params={manifest['model']['num_params_unique']} "
          f"bytes={manifest['total_bytes']} train+save={train_s:.1f}s total={time.time() - t0:.1f}s checks: "
          f"{'OK' if ok else 'FAILED'} " + json.dumps({k: v.get("ok") for k, v in checks.items()}))
    if not ok:
        print(json.dumps(checks, indent=1, default=str))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
