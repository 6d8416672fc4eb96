#!/usr/bin/env python3
# ruff: noqa  -- a copy of the team's generator, kept verbatim apart from this line
"""Generate REAL DeepSpeed checkpoints for ZeRO variants on CPU: ZeRO-0 (no partitioning; fp32,
bf16 or fp16), CPU optimizer/param offload (ZeRO-1/2/3) and ZeRO++ hpZ (ZeRO-3).

Same recipe as make_ds_checkpoints.py: a toy model trained a few steps on --world-size CPU
processes (gloo on 127.0.0.1), torch.optim.AdamW as client optimizer, engine.save_checkpoint().
Offload uses that torch optimizer too ("zero_force_ds_cpu_optimizer": false), so no compiled
DeepSpeedCPUAdam is needed. Writes into --out:

  <out>/latest, <out>/<tag>/...   DeepSpeed's files, untouched
      ZeRO-0:    only mp_rank_00_model_states.pt; its "optimizer" holds the optimizer state (with
                 bf16/fp16: FP16_UnfusedOptimizer state incl. the fp32 master copies "fp32_groups")
      offload / hpZ: the same files as the plain ZeRO stage (see manifest "layout_vs_plain")
  <out>/reference_fp32.pt   fp32 masters of trainable params, frozen params and persistent buffers
                            (floats as fp32); tied names share one tensor
  <out>/manifest.json       config, params, files, checks

Checks (unless --no-verify): a fresh engine reloads the checkpoint with engine.load_checkpoint() and
gives back the reference masters; for ZeRO 1-3 also DeepSpeed's zero_to_fp32. --compare-plain also
trains the same run without offload/hpZ and compares file names, pickle key trees, tensor shapes and
values with it.
"""
import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time


def build_model(width, blocks, vocab):
    import torch
    import torch.nn as nn

    def ln32(n, x):
        return torch.nn.functional.layer_norm(x.float(), n.normalized_shape, n.weight.float(), n.bias.float(),
                                              n.eps).to(x.dtype)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.up = nn.Linear(width, 4 * width)
            self.down = nn.Linear(4 * width, width)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(ln32(self.norm, x))))

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.blocks = nn.ModuleList([Block() for _ in range(blocks)])
            self.odd = nn.Linear(width, 7)  # 7 x width weight, 7 bias: not divisible by 2 or 4
            self.odd_back = nn.Linear(7, width, bias=False)
            self.frozen_proj = nn.Linear(width, width, bias=False)
            self.frozen_proj.weight.requires_grad_(False)
            self.register_buffer("pos_scale", torch.linspace(0.5, 1.5, width))
            self.head = nn.Linear(width, vocab)
            self.head.weight = self.embed.weight  # tied

        def forward(self, ids):
            x = self.embed(ids) * self.pos_scale.to(self.embed.weight.dtype)
            for b in self.blocks:
                x = b(x)
            x = x + self.odd_back(torch.tanh(self.odd(x))) + self.frozen_proj(x)
            return self.head(x)

    return Toy()


def param_groups(model):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def ds_config(args, offload=None, hpz=None):
    offload = args.offload if offload is None else offload
    hpz = args.hpz if hpz is None else hpz
    z = {"stage": args.stage}
    if args.stage == 3:
        z["stage3_param_persistence_threshold"] = 0
    if offload in ("optimizer", "both"):
        z["offload_optimizer"] = {"device": "cpu"}
    if offload in ("param", "both"):
        z["offload_param"] = {"device": "cpu"}
    if hpz:
        z["zero_hpz_partition_size"] = hpz  # ZeRO++ hierarchical partitioning (secondary param copy)
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": z,
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {"enabled": args.dtype == "fp16", "initial_scale_power": 8, "loss_scale_window": 100},
    }
    if offload:
        cfg["zero_force_ds_cpu_optimizer"] = False  # keep torch AdamW (DeepSpeedCPUAdam needs compiled ops)
    return cfg


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


def make_engine(args, seed, cfg):
    import torch
    import deepspeed
    torch.manual_seed(seed)
    model = build_model(args.width, args.blocks, args.vocab)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def masters(engine):
    """{name: fp32 tensor} for every param and persistent buffer (collective: call on all ranks)."""
    import torch
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    module, opt = engine.module, engine.optimizer
    out, done = {}, {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None and p.requires_grad and hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
            for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups):  # FP16_UnfusedOptimizer (ZeRO-0)
                for a, b in zip(g16, g32):
                    if a is p:
                        full = b
        if full is None:
            if hasattr(p, "ds_id"):  # frozen ZeRO-3 param: gather the partitioned model copy
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().clone()
            elif p.requires_grad and p.dtype != torch.float32:
                raise RuntimeError(f"no fp32 master for {name}")
            else:
                full = p
        done[id(p)] = full.detach().float().cpu().clone()
    for name, p in module.named_parameters(remove_duplicate=False):
        out[name] = done[id(p)]
    for name, b in module.named_buffers():
        mod_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(mod_name) if mod_name else module
        if leaf not in owner._non_persistent_buffers_set:
            b = b.detach().cpu().clone()
            out[name] = b.float() if b.is_floating_point() else b
    return out


def train_rank(rank, args, port, out, cfg):
    deepspeed = setup_rank(rank, args.world_size, port)
    import torch
    engine = make_engine(args, args.seed, cfg)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    loss = None
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        tgt = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        loss = torch.nn.functional.cross_entropy(engine(ids).float().reshape(-1, args.vocab), tgt.reshape(-1))
        engine.backward(loss)
        engine.step()
    tag = args.tag or f"global_step{engine.global_steps}"
    t0 = time.time()
    engine.save_checkpoint(out, tag=tag)
    save_s = time.time() - t0
    ref = masters(engine)
    if rank == 0:
        torch.save(ref, os.path.join(out, "reference_fp32.pt"))
        opt = engine.optimizer
        info = {"tag": tag, "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
                "final_loss_rank0": float(loss.detach()), "save_seconds_rank0": round(save_s, 3),
                "optimizer_class": type(opt).__name__,
                "inner_optimizer_class": type(getattr(opt, "optimizer", None)).__name__,
                "model_param_dtype": str(next(engine.module.parameters()).dtype)}
        with open(os.path.join(out, ".rank0_info.json"), "w") as f:
            json.dump(info, f)
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def load_rank(rank, args, port, cfg, result_path):
    deepspeed = setup_rank(rank, args.world_size, port)
    import torch
    engine = make_engine(args, args.seed + 777, cfg)
    with torch.no_grad():  # frozen params and buffers: spoil them so the load is really tested
        for p in engine.module.parameters():
            if not p.requires_grad:
                p.add_(1.0)
        for b in engine.module.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    path, _ = engine.load_checkpoint(args.out, load_optimizer_states=True, load_lr_scheduler_states=False)
    got = masters(engine)
    if rank == 0:
        ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
        bad = sorted(n for n in ref if n not in got or not torch.equal(got[n], ref[n]))
        with open(result_path, "w") as f:
            json.dump({"loaded": os.path.relpath(path, args.out), "checked": len(ref), "mismatched": bad}, f)
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def _quiet_exit():
    """End a finished child without interpreter teardown: gloo/torch threads occasionally abort there
    ("terminate called without an active exception", SIGABRT) after all work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_entry(rank, args, port, out, cfg):
    train_rank(rank, args, port, out, cfg)
    _quiet_exit()


def _load_entry(rank, args, port, cfg, result_path):
    load_rank(rank, args, port, cfg, result_path)
    _quiet_exit()


def run_train(args, out, cfg):
    import torch.multiprocessing as mp
    os.makedirs(out, exist_ok=True)
    mp.start_processes(_train_entry, args=(args, free_port(), out, cfg), nprocs=args.world_size,
                       start_method="spawn")
    with open(os.path.join(out, ".rank0_info.json")) as f:
        info = json.load(f)
    os.remove(os.path.join(out, ".rank0_info.json"))
    return info


def zero_to_fp32_check(out):
    import torch
    ref = torch.load(os.path.join(out, "reference_fp32.pt"), weights_only=True)
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        got = get_fp32_state_dict_from_zero_checkpoint(os.path.abspath(out))
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}".replace(os.path.abspath(out), "<out>")}
    bad = sorted(k for k in ref if k in got and not torch.equal(ref[k].to(got[k].dtype), got[k]))
    return {"ok": not bad, "mismatched": bad, "missing": sorted(set(ref) - set(got)),
            "extra": sorted(set(got) - set(ref))}


def key_tree(obj, prefix=""):
    import torch
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(key_tree(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        out[prefix] = f"{type(obj).__name__}[{len(obj)}]"
        for i, v in enumerate(obj):
            out.update(key_tree(v, f"{prefix}[{i}]"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = ("tensor", tuple(obj.shape), str(obj.dtype))
    else:
        out[prefix] = type(obj).__name__
    return out


def compare_with_plain(args, tag):
    """Train the same run without offload/hpZ and diff the two checkpoints."""
    import torch
    tmp = tempfile.mkdtemp(prefix="plain_", dir=os.path.dirname(os.path.abspath(args.out)))
    try:
        run_train(args, tmp, ds_config(args, offload="", hpz=0))
        a_files = sorted(os.listdir(os.path.join(args.out, tag)))
        b_files = sorted(os.listdir(os.path.join(tmp, tag)))
        tree_diff, value_diff = [], []
        for fn in sorted(set(a_files) & set(b_files)):
            a = torch.load(os.path.join(args.out, tag, fn), weights_only=False)
            b = torch.load(os.path.join(tmp, tag, fn), weights_only=False)
            ta = {k: v for k, v in key_tree(a).items() if "/ds_config" not in k}
            tb = {k: v for k, v in key_tree(b).items() if "/ds_config" not in k}
            tree_diff += [f"{fn}:{k}: {ta.get(k)} vs {tb.get(k)}" for k in sorted(set(ta) | set(tb))
                          if ta.get(k) != tb.get(k)]

            def tensors(o, p=""):
                if isinstance(o, dict):
                    for k, v in o.items():
                        yield from tensors(v, f"{p}/{k}")
                elif isinstance(o, (list, tuple)):
                    for i, v in enumerate(o):
                        yield from tensors(v, f"{p}[{i}]")
                elif isinstance(o, torch.Tensor):
                    yield p, o
            tb_t = dict(tensors(b))
            for k, t in tensors(a):
                u = tb_t.get(k)
                if u is not None and u.shape == t.shape and not torch.equal(t, u):
                    value_diff.append(f"{fn}:{k} max|d|={(t.float() - u.float()).abs().max().item():.3g}")
        return {"same_file_names": a_files == b_files, "only_here": sorted(set(a_files) - set(b_files)),
                "only_plain": sorted(set(b_files) - set(a_files)), "key_tree_differences": tree_diff,
                "tensor_value_differences": value_diff[:20], "n_tensor_value_differences": len(value_diff),
                "note": "ds_config inside the files is excluded; value differences are float rounding of a "
                        "different execution order (stage 3 padding also holds garbage)"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, choices=[0, 1, 2, 3], required=True)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--offload", choices=["", "optimizer", "param", "both"], default="",
                    help="CPU offload (param offload needs --stage 3)")
    ap.add_argument("--hpz", type=int, default=0, help="ZeRO++ zero_hpz_partition_size (stage 3)")
    ap.add_argument("--width", type=int, default=15)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=61)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tag")
    ap.add_argument("--compare-plain", action="store_true",
                    help="also train without offload/hpZ and diff the checkpoints")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    args = ap.parse_args(argv)
    if args.offload in ("param", "both") and args.stage != 3:
        ap.error("param offload needs --stage 3")
    if args.offload and args.stage == 0:
        ap.error("offload needs ZeRO stage >= 1")
    if args.hpz and args.stage != 3:
        ap.error("--hpz needs --stage 3")
    if args.hpz and args.world_size % args.hpz:
        ap.error("--hpz must divide --world-size")
    if os.path.isdir(args.out) and os.listdir(args.out):
        sys.exit(f"{args.out} exists and is not empty")
    os.environ["DS_ACCELERATOR"] = "cpu"
    t0 = time.time()
    cfg = ds_config(args)
    info = run_train(args, args.out, cfg)
    train_s = time.time() - t0
    tag = info["tag"]
    checks = {}
    if args.verify:
        import torch.multiprocessing as mp
        result = os.path.join(args.out, ".load.json")
        mp.start_processes(_load_entry, args=(args, free_port(), cfg, result), nprocs=args.world_size,
                           start_method="spawn")
        with open(result) as f:
            checks["deepspeed_reload"] = json.load(f)
        os.remove(result)
        checks["deepspeed_reload"]["ok"] = not checks["deepspeed_reload"]["mismatched"]
        z = zero_to_fp32_check(args.out)
        if args.stage == 0:
            z["expected_failure"] = "ZeRO-0 writes no *_optim_states.pt; zero_to_fp32 does not apply"
            z["ok"] = "error" in z
        checks["zero_to_fp32"] = z
    if args.compare_plain and (args.offload or args.hpz):
        checks["layout_vs_plain"] = compare_with_plain(args, tag)
        checks["layout_vs_plain"]["ok"] = (checks["layout_vs_plain"]["same_file_names"]
                                           and not checks["layout_vs_plain"]["key_tree_differences"])

    import torch
    import deepspeed
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    model = build_model(args.width, args.blocks, args.vocab)
    tied, first = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[n] = first[id(p)]
        else:
            first[id(p)] = n
    files = {}
    for root, _, fs in os.walk(args.out):
        for fn in fs:
            p = os.path.join(root, fn)
            files[os.path.relpath(p, args.out)] = os.path.getsize(p)
    manifest = {
        "generator": "make_ds_variants.py", "layout": "zero-variant",
        "stage": args.stage, "world_size": args.world_size, "dtype": args.dtype, "offload": args.offload or None,
        "hpz_partition_size": args.hpz or None,
        "deepspeed_version": deepspeed.__version__, "torch_version": torch.__version__,
        "python_version": sys.version.split()[0], "seed": args.seed, "steps": args.steps,
        "model": {"width": args.width, "blocks": args.blocks, "vocab": args.vocab,
                  "num_params_unique": sum(p.numel() for p in model.parameters())},
        "params": {n: {"shape": list(p.shape), "numel": p.numel(), "frozen": not p.requires_grad}
                   for n, p in model.named_parameters(remove_duplicate=False)},
        "tied": tied, "buffers": {n: list(b.shape) for n, b in model.named_buffers()},
        **info, "ds_config": cfg, "train_and_save_seconds": round(train_s, 2),
        "files": dict(sorted(files.items())), "total_bytes": sum(files.values()), "checks": checks,
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    ok = all(v.get("ok") for v in checks.values())
    print(f"[make_ds_variants] stage={args.stage} ws={args.world_size} dtype={args.dtype} "
          f"offload={args.offload or '-'} hpz={args.hpz or '-'} optimizer={info['optimizer_class']}"
          f"({info['inner_optimizer_class']}) bytes={manifest['total_bytes']} train+save={train_s:.1f}s "
          f"total={time.time() - t0:.1f}s checks: {'OK' if ok else 'FAILED'} "
          + json.dumps({k: v.get("ok") for k, v in checks.items()}))
    if not ok:
        print(json.dumps(checks, indent=1))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
