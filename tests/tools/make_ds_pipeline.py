#!/usr/bin/env python3
# ruff: noqa  -- a copy of the team's generator, kept verbatim apart from this line
"""Generate REAL DeepSpeed pipeline-parallel checkpoints (PipelineModule/PipelineEngine) on CPU.

Trains a toy LM split into `--pp` pipeline stages x `--dp` data-parallel replicas
(world size pp*dp, CPU processes, gloo on 127.0.0.1), ZeRO stage 0 or 1 (DeepSpeed refuses
ZeRO-2/3 with pipeline parallelism), then engine.save_checkpoint(). Writes into --out:

  <out>/latest, <out>/<tag>/...  DeepSpeed's files, untouched:
        layer_XX[-model_00]-model_states.pt   weights of layer XX (global layer index), one file per
                                              layer that has a state_dict, written by dp rank 0
        mp_rank_SS_model_states.pt            one per pipeline stage SS ("module" is None)
        [bf16_]zero_pp_rank_D_mp_rank_SS_optim_states.pt   one per (dp rank D, stage SS)
  <out>/reference_fp32.pt        {pipeline param name: fp32 master} + persistent buffers; names are
                                 PipelineModule names ("3.up.weight", "tied_modules.embed.weight")
  <out>/manifest.json            stage of every layer, which layer file holds each param and under
                                 which key, tied params, parameterless layers (index gaps), checks

The layer list imitates Megatron-DeepSpeed's GPTModelPipe: parameterless functions at index 0 and 2
(no layer file, so the numbering has gaps), a TiedLayerSpec embedding that the last stage reuses as
the output head through forward_fn (so the head gets no layer file either), odd widths, a frozen
param and a persistent buffer.

Verification (unless --no-verify): every tensor in the layer files must equal the reference cast to
the model dtype, and a fresh PipelineEngine must load the checkpoint with engine.load_checkpoint()
and give back the reference fp32 masters (safe_get_full_fp32_param). --universal also runs
DeepSpeed's ds_to_universal (with --inject_missing_state) and loads the result with
checkpoint.load_universal at a different data-parallel size (--load-dp).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time


# ----------------------------------------------------------------------------- model

def prep_ids(ids):
    """Parameterless first layer (like Megatron's _to_float16 lambda): no layer file is written."""
    return ids.long()


def build_specs(width, blocks, vocab, tied=True, frozen=True):
    """Return the PipelineModule layer specs. Imports torch/deepspeed lazily."""
    import torch
    import torch.nn as nn
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(vocab, width) * 0.02)

        def forward(self, ids):
            return torch.nn.functional.embedding(ids, self.weight)

    class Block(nn.Module):
        def __init__(self, first):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.up = nn.Linear(width, 4 * width)
            self.down = nn.Linear(4 * width, width)
            # persistent buffer in the first block. (Not in the tied embedding: the last stage reuses
            # that module through forward_fn, writes no layer file for it and so never reloads its
            # buffers - a DeepSpeed gap seen in testing.)
            self.register_buffer("pos_scale", torch.linspace(0.5, 1.5, width) if first else torch.ones(width))
            freeze_bias = first and frozen
            if freeze_bias:  # frozen param inside a pipeline layer; non-zero so that loads are tested
                with torch.no_grad():
                    self.norm.bias.copy_(torch.linspace(-0.3, 0.3, width))
                self.norm.bias.requires_grad_(False)

        def forward(self, x):
            x = x * self.pos_scale.to(x.dtype)
            n = self.norm  # normalise in fp32: CPU layer_norm rejects bf16/fp16 params with fp32 input
            h = torch.nn.functional.layer_norm(x.float(), n.normalized_shape, n.weight.float(), n.bias.float(),
                                               n.eps).to(x.dtype)
            return x + self.down(torch.nn.functional.gelu(self.up(h)))

    class FinalNorm(nn.LayerNorm):
        def forward(self, x):
            return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                                  self.bias.float(), self.eps).to(x.dtype)

    class Head(nn.Module):  # only used with --no-tied
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(vocab, width) * 0.02)

        def forward(self, x):
            return x @ self.weight.t()

    def head_fn(embed, x):  # the tied embedding used as output projection on the last stage
        return x @ embed.weight.t()

    def scale(x):  # parameterless middle layer (like Megatron's transpose lambdas)
        return x * 1.0

    specs = [prep_ids]
    specs.append(TiedLayerSpec("embed", Embed, tied_weight_attr="weight") if tied else LayerSpec(Embed))
    specs.append(scale)
    specs += [LayerSpec(Block, i == 0) for i in range(blocks)]
    specs.append(LayerSpec(FinalNorm, width))
    specs.append(TiedLayerSpec("embed", Embed, forward_fn=head_fn, tied_weight_attr="weight") if tied
                 else LayerSpec(Head))
    return specs


def make_loss_fn(vocab):
    import torch

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))
    return loss_fn


def build_pipeline_module(args, pp, dp):
    import torch
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology
    if args.topology == "pipe-model-data":  # Megatron-DeepSpeed / BLOOM style: files get "-model_00"
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=1, num_dp=dp)
    else:
        topo = PipeDataParallelTopology(num_pp=pp, num_dp=dp)
    torch.manual_seed(args.seed)  # same init on every rank
    specs = build_specs(args.width, args.blocks, args.vocab, tied=args.tied, frozen=args.frozen)
    return PipelineModule(layers=specs, topology=topo, loss_fn=make_loss_fn(args.vocab),
                          partition_method=args.partition_method)


def ds_config(args, load_universal=False):
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": args.micro_batches,  # = micro-batches per pipeline step
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
        "zero_allow_untested_optimizer": True,  # torch AdamW as client optimizer (no compiled ops)
        "zero_optimization": {"stage": args.stage},
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {"enabled": args.dtype == "fp16", "initial_scale_power": 8, "loss_scale_window": 100},
    }
    if args.grad_accum_dtype:
        # bf16 + ZeRO-1 + fp32 accumulation => BF16_Optimizer (BLOOM's setup); files still bf16_zero_pp_rank_*
        cfg["data_types"] = {"grad_accum_dtype": args.grad_accum_dtype}
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


# ----------------------------------------------------------------------------- per-rank helpers

def setup_rank(rank, world, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    import importlib
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import deepspeed
    # Skip the JIT-built shm all-reduce op of DeepSpeed's CPU backend (only inference uses it).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    return deepspeed


def make_engine(args, pp, dp, load_universal=False):
    import torch
    import deepspeed
    module = build_pipeline_module(args, pp, dp)
    decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim < 2]
    # ZeRO all-reduces the grad norm over the pipeline stages once per param group and DeepSpeed drops
    # empty groups, so every stage must have params in both groups (else a silent deadlock).
    if not decay or not no_decay:
        raise RuntimeError("a pipeline stage has an empty param group (would deadlock); use "
                           "--partition-method type:Block with --blocks >= --pp")
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt,
                                           config=ds_config(args, load_universal=load_universal))
    return engine


def full_fp32(engine, p):
    """fp32 master of a (local-stage) param; collective inside the stage's data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param
    full = safe_get_full_fp32_param(p)  # ZeRO-1 and BF16_Optimizer keep hp links
    if full is not None:
        return full.detach().float().cpu().clone()
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # FP16_(Unfused)Optimizer, stage 0
        for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups):
            for a, b in zip(g16, g32):
                if a is p:
                    return b.detach().float().cpu().clone()
    if p.dtype == __import__("torch").float32:  # plain fp32 without a wrapper: the param is the master
        return p.detach().cpu().clone()
    raise RuntimeError("cannot find the fp32 master of a param")


def stage_state(engine):
    """This rank's view: fp32 masters, frozen params, buffers, and the layer-file map of its stage."""
    import torch
    module = engine.module
    grid = engine.grid
    masters, frozen, buffers = {}, {}, {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            masters[name] = full_fp32(engine, p)
        else:
            frozen[name] = p.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        mod_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(mod_name) if mod_name else module
        if leaf not in owner._non_persistent_buffers_set:
            b = b.detach().cpu().clone()
            buffers[name] = b.float() if b.is_floating_point() else b
    id2name = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        id2name[id(t)] = name
    layers = {}
    for local, func in enumerate(module.forward_funcs):
        idx = local + module._local_start
        entry = {"stage": grid.get_stage_id(), "kind": type(func).__name__}
        if hasattr(func, "state_dict"):
            path = module.ckpt_layer_path("", local)  # same naming code the engine uses
            entry["file"] = os.path.basename(path)
            entry["keys"] = {}
            named = dict(func.named_parameters())
            named.update(dict(func.named_buffers()))
            for key in func.state_dict():
                entry["keys"][key] = id2name.get(id(named.get(key)))
        else:
            entry["file"] = None  # function or forward_fn partial: nothing saved for this index
            entry["kind"] = getattr(func, "__name__", None) or getattr(getattr(func, "func", None), "__name__", "?")
        layers[idx] = entry
    return {"stage": grid.get_stage_id(), "dp": grid.get_data_parallel_id(), "masters": masters,
            "frozen": frozen, "buffers": buffers, "layers": layers}


def gather_to_rank0(obj):
    import deepspeed.comm as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_rank(rank, args, port):
    world = args.pp * args.dp
    deepspeed = setup_rank(rank, world, port)
    import torch
    engine = make_engine(args, args.pp, args.dp)
    dp_id = engine.grid.get_data_parallel_id()
    gen = torch.Generator().manual_seed(args.seed * 1000 + dp_id)  # same data on all stages of a replica

    def data():
        while True:
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
            yield ids, torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    it = data()
    loss = None
    for _ in range(args.steps):
        loss = engine.train_batch(data_iter=it)
    tag = args.tag or f"global_step{engine.global_steps}"
    t0 = time.time()
    engine.save_checkpoint(args.out, tag=tag)
    save_s = time.time() - t0

    mine = stage_state(engine)
    allv = gather_to_rank0(mine)
    if rank == 0:
        ref, layers, stage_of_param, tied_mismatch = {}, {}, {}, []
        for st in allv:
            for name, t in list(st["masters"].items()) + list(st["frozen"].items()) + list(st["buffers"].items()):
                if name in ref and not torch.equal(ref[name], t):
                    tied_mismatch.append(name)  # tied copies on several stages must agree
                ref.setdefault(name, t)
                stage_of_param.setdefault(name, set()).add(st["stage"])
            if st["dp"] == 0:
                layers.update(st["layers"])
        torch.save(ref, os.path.join(args.out, "reference_fp32.pt"))
        info = {
            "tag": tag, "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
            "final_loss_last_stage": None if loss is None else float(loss),
            "save_seconds_rank0": round(save_s, 3),
            "optimizer_class": type(engine.optimizer).__name__,
            "model_param_dtype": str(next(engine.module.parameters()).dtype),
            "parts": [int(x) for x in engine.module.parts],
            "layers": {str(k): layers[k] for k in sorted(layers)},
            "param_stages": {k: sorted(v) for k, v in stage_of_param.items()},
            "frozen": sorted({n for st in allv for n in st["frozen"]}),
            "buffers": sorted({n for st in allv for n in st["buffers"]}),
            "tied_stage_copies_equal": not tied_mismatch, "tied_stage_mismatch": tied_mismatch,
            "ds_config": ds_config(args),
        }
        with open(os.path.join(args.out, ".rank0_info.json"), "w") as f:
            json.dump(info, f)
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def load_rank(rank, args, port, dp, universal, result_path):
    """Fresh engine (random init with another seed), load the checkpoint, compare with the reference."""
    world = args.pp * dp
    deepspeed = setup_rank(rank, world, port)
    import torch
    seed = args.seed
    args.seed = seed + 777  # different init, so every value must come from the checkpoint
    engine = make_engine(args, args.pp, dp, load_universal=universal)
    args.seed = seed
    with torch.no_grad():  # frozen params and buffers do not depend on the seed: spoil them
        for p in engine.module.parameters():
            if not p.requires_grad:
                p.add_(1.0)
        for b in engine.module.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    path, _ = engine.load_checkpoint(args.out, load_optimizer_states=True, load_lr_scheduler_states=False)
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    bad, bad_other, checked = [], [], 0
    for name, p in engine.module.named_parameters():
        got = full_fp32(engine, p) if p.requires_grad else p.detach().float().cpu()
        checked += 1
        if name not in ref or not torch.equal(got, ref[name]):
            (bad if p.requires_grad else bad_other).append(name)
    for name, b in engine.module.named_buffers():
        if name in ref:
            checked += 1
            if not torch.equal(b.detach().float().cpu() if b.is_floating_point() else b, ref[name]):
                bad_other.append(name)
    res = gather_to_rank0({"bad": bad, "bad_other": bad_other, "checked": checked})
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"loaded": path and os.path.relpath(path, args.out), "dp": dp, "universal": universal,
                       "checked": sum(r["checked"] for r in res),
                       "mismatched": sorted({b for r in res for b in r["bad"]}),
                       "mismatched_frozen_or_buffers": sorted({b for r in res for b in r["bad_other"]}),
                       "global_steps": engine.global_steps}, f)
    # and one more training step must run after loading
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    engine.train_batch(data_iter=iter([(ids, ids)] * args.micro_batches))
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


def _load_entry(rank, args, port, dp, universal, result_path):
    load_rank(rank, args, port, dp, universal, result_path)
    _quiet_exit()


# ----------------------------------------------------------------------------- checks + manifest

def check_layer_files(out, tag, info, dtype_name):
    """Each layer file tensor must equal the reference (trainable: cast to the model dtype)."""
    import torch
    ref = torch.load(os.path.join(out, "reference_fp32.pt"), weights_only=True)
    model_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    bad, n = [], 0
    for idx, entry in info["layers"].items():
        if not entry["file"]:
            continue
        sd = torch.load(os.path.join(out, tag, entry["file"]), weights_only=True)
        for key, t in sd.items():
            name = entry["keys"].get(key)
            n += 1
            if name is None or name not in ref:
                bad.append(f"{entry['file']}:{key} (no reference)")
                continue
            r = ref[name]
            if name in info["buffers"] or name in info["frozen"]:
                ok = torch.equal(t.float() if t.is_floating_point() else t, r)
            else:
                ok = t.dtype == model_dtype and torch.equal(r.to(model_dtype), t)
            if not ok:
                bad.append(f"{entry['file']}:{key}")
    return {"tensors_checked": n, "mismatched": bad, "ok": not bad}


def run_loader(args, dp, universal):
    import torch.multiprocessing as mp
    result = os.path.join(args.out, f".load_{'u' if universal else 'c'}{dp}.json")
    try:
        mp.start_processes(_load_entry, args=(args, free_port(), dp, universal, result), nprocs=args.pp * dp,
                           start_method="spawn")
    except Exception as e:  # keep the last line of the child's traceback, e.g. "KeyError: 1"
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return {"dp": dp, "universal": universal, "ok": False, "error": lines[-1] if lines else repr(e)}
    with open(result) as f:
        res = json.load(f)
    os.remove(result)
    res["ok"] = not res["mismatched"] and res["checked"] > 0
    if universal:
        # Known DeepSpeed 0.19.8 behaviour: with checkpoint.load_universal the engine skips
        # load_module_state_dict and restores only trainable params from zero/<name>/fp32.pt, and the
        # universal folder has no layer files, so frozen params and buffers keep their init values.
        res["known_gap"] = "load_universal does not restore frozen params or buffers"
    else:
        res["ok"] = res["ok"] and not res["mismatched_frozen_or_buffers"]
    return res


def run_universal(args, tag):
    src = os.path.join(args.out, tag)
    dst = os.path.join(args.out, f"{tag}_universal")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
           "--output_folder", dst, "--inject_missing_state", "--num_extract_workers", "2",
           "--num_merge_workers", "1"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    res = {"command": "python -m deepspeed.checkpoint.ds_to_universal --input_folder <out>/%s "
                      "--output_folder <out>/%s_universal --inject_missing_state" % (tag, tag),
           "returncode": p.returncode, "seconds": round(time.time() - t0, 2)}
    if p.returncode != 0:
        res["error_tail"] = p.stderr.strip().splitlines()[-3:]
    return res


def write_manifest(args, info, checks, files_extra=None):
    import torch
    import deepspeed
    out = args.out
    ref = torch.load(os.path.join(out, "reference_fp32.pt"), weights_only=True)
    # param -> where it lives
    where = {}
    for idx, entry in info["layers"].items():
        for key, name in (entry.get("keys") or {}).items():
            where.setdefault(name, []).append({"layer": int(idx), "file": entry["file"], "key": key})
    params = {}
    for name, t in ref.items():
        if name in info["buffers"]:
            continue
        params[name] = {"shape": list(t.shape), "numel": t.numel(), "frozen": name in info["frozen"],
                        "stages": info["param_stages"].get(name), "layer_files": where.get(name, [])}
    tied = {n: v for n, v in params.items() if n.startswith("tied_modules.")}
    files = {}
    for root, _, fs in os.walk(out):
        for fn in fs:
            path = os.path.join(root, fn)
            files[os.path.relpath(path, out)] = os.path.getsize(path)
    manifest = {
        "generator": "make_ds_pipeline.py", "layout": "pipeline",
        "pp": args.pp, "dp": args.dp, "world_size": args.pp * args.dp, "stage": args.stage,
        "dtype": args.dtype, "grad_accum_dtype": args.grad_accum_dtype, "topology": args.topology,
        "deepspeed_version": deepspeed.__version__, "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "seed": args.seed, "steps": args.steps, "micro_batches": args.micro_batches, "batch": args.batch,
        "seq": args.seq,
        "model": {"width": args.width, "blocks": args.blocks, "vocab": args.vocab, "tied": args.tied,
                  "num_params_unique": sum(p["numel"] for p in params.values())},
        "mp_rank_meaning": "mp_rank_SS in file names is the pipeline stage SS (grid.ds_model_rank; tp=1)",
        "params": params,
        "tied": {n: {"stages": v["stages"], "layer_files": v["layer_files"]} for n, v in tied.items()},
        "buffers": {n: list(ref[n].shape) for n in info["buffers"]},
        **{k: v for k, v in info.items() if k not in ("buffers",)},
        "files": dict(sorted(files.items())), "total_bytes": sum(files.values()),
        "checks": checks,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output dir (must not exist or be empty)")
    ap.add_argument("--pp", type=int, default=2, help="pipeline stages")
    ap.add_argument("--dp", type=int, default=2, help="data-parallel replicas (world size = pp*dp)")
    ap.add_argument("--stage", type=int, choices=[0, 1], default=1, help="ZeRO stage (2/3 refused by DeepSpeed)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--grad-accum-dtype", choices=["fp32", "bf16", "fp16"],
                    help="data_types.grad_accum_dtype; bf16 + fp32 => BF16_Optimizer (BLOOM style)")
    ap.add_argument("--topology", choices=["pipe-data", "pipe-model-data"], default="pipe-data",
                    help="pipe-model-data names layer files layer_XX-model_00-model_states.pt")
    ap.add_argument("--partition-method", default="type:Block",
                    help="PipelineModule partition_method (default type:Block, like Megatron's "
                         "type:transformer). Every stage must end up with both 2-D and 1-D params: "
                         "DeepSpeed drops empty param groups and the per-group grad-norm all-reduce "
                         "over the stages then deadlocks")
    ap.add_argument("--width", type=int, default=15)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=61)
    ap.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True,
                    help="TiedLayerSpec embedding reused as the head on the last stage")
    ap.add_argument("--frozen", action=argparse.BooleanOptionalAction, default=True,
                    help="freeze the first block's norm.bias")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro-batches", type=int, default=2, help="gradient_accumulation_steps")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tag")
    ap.add_argument("--universal", action="store_true",
                    help="also run ds_to_universal and load it at data-parallel size --load-dp")
    ap.add_argument("--load-dp", type=int, help="dp size for the universal load check (default 1, or 2 if --dp 1)")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    args = ap.parse_args(argv)
    if args.grad_accum_dtype and args.dtype == "fp32":
        ap.error("--grad-accum-dtype needs --dtype bf16/fp16")
    if args.pp < 2:
        ap.error("--pp must be >= 2")
    if args.blocks < args.pp:
        ap.error("--blocks must be >= --pp (each stage needs a block)")
    if os.path.isdir(args.out) and os.listdir(args.out):
        sys.exit(f"{args.out} exists and is not empty")
    os.makedirs(args.out, exist_ok=True)
    os.environ["DS_ACCELERATOR"] = "cpu"

    import torch.multiprocessing as mp
    t0 = time.time()
    mp.start_processes(_train_entry, args=(args, free_port()), nprocs=args.pp * args.dp, start_method="spawn")
    train_s = time.time() - t0
    with open(os.path.join(args.out, ".rank0_info.json")) as f:
        info = json.load(f)
    os.remove(os.path.join(args.out, ".rank0_info.json"))
    info["train_and_save_seconds"] = round(train_s, 2)
    tag = info["tag"]

    checks = {}
    if args.verify:
        checks["layer_files_equal_reference"] = check_layer_files(args.out, tag, info, args.dtype)
        checks["tied_stage_copies_equal"] = info["tied_stage_copies_equal"]
        reload = run_loader(args, args.dp, universal=False)
        if not reload["ok"] and args.stage == 0 and info["optimizer_class"] == "BF16_Optimizer":
            # Known DeepSpeed 0.19.8 gap: ZeRO-0 + bf16 pipeline uses BF16_Optimizer, which writes
            # bf16_zero_pp_rank_* files AND puts dp-rank-0's optimizer state into mp_rank_SS, but
            # load_checkpoint hands that single dict to BF16_Optimizer.load_state_dict, which indexes
            # it by dp rank (KeyError). The files themselves are complete.
            reload["known_gap"] = "DeepSpeed cannot reload ZeRO-0 bf16 (BF16_Optimizer) pipeline checkpoints"
            reload["ok"] = "error" in reload
        checks["deepspeed_reload_same_topology"] = reload
    if args.universal:
        checks["ds_to_universal"] = run_universal(args, tag)
        if args.verify and checks["ds_to_universal"]["returncode"] == 0:
            load_dp = args.load_dp or (2 if args.dp == 1 else 1)
            checks["universal_load_other_dp"] = run_loader(args, load_dp, universal=True)
    m = write_manifest(args, info, checks)
    ok = all(v if isinstance(v, bool) else v.get("ok", v.get("returncode") == 0) for v in checks.values())
    print(f"[make_ds_pipeline] pp={args.pp} dp={args.dp} zero={args.stage} dtype={args.dtype} "
          f"optimizer={info['optimizer_class']} params={m['model']['num_params_unique']} "
          f"bytes={m['total_bytes']} train+save={train_s:.1f}s total={time.time() - t0:.1f}s "
          f"checks: {'OK' if ok else 'FAILED'} " + json.dumps(
              {k: (v if isinstance(v, bool) else ("known-gap" if v.get("known_gap") and "error" in v
                                                   else v.get("ok", v.get("returncode") == 0)))
               for k, v in checks.items()}))
    if not ok:
        print(json.dumps(checks, indent=1))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
