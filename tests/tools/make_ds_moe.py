#!/usr/bin/env python3
# ruff: noqa  -- a copy of the team's generator, kept verbatim apart from this line
"""Generate REAL DeepSpeed MoE (deepspeed.moe.layer.MoE, expert parallel) checkpoints on CPU.

Trains a toy LM whose blocks hold a native DeepSpeed MoE layer with --num-experts experts split over
--ep-size expert-parallel ranks, on --world-size CPU processes (gloo on 127.0.0.1), ZeRO stage 0, 1
or 2 (DeepSpeed refuses native MoE with ZeRO-3), then engine.save_checkpoint(). Writes into --out:

  <out>/latest, <out>/<tag>/...   DeepSpeed's files, untouched:
      mp_rank_00_model_states.pt                     non-expert weights ("module"), num_experts, ...
      layer_L_expert_E_mp_rank_00_model_states.pt    one per (MoE layer L, GLOBAL expert id E),
                                                     keys use the global expert id
      [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   ZeRO 1/2: one per rank R; the expert param
                                                     groups hold rank R's LOCAL experts (local names)
      expp_rank_P_mp_rank_00_optim_states.pt         ZeRO 0: one per expert-parallel rank P
  <out>/reference_fp32.pt   {name with GLOBAL expert ids: fp32 master}, like the expert files' keys
  <out>/manifest.json       experts (layer, global id, ep rank, local id, file), rank -> ep rank /
                            expert-dp group, param names/shapes, checks

Verification (unless --no-verify): expert files and the non-expert "module" must equal the
reference cast to the model dtype, and a fresh engine must reload the checkpoint with
engine.load_checkpoint() and give back the reference fp32 masters. DeepSpeed's zero_to_fp32 and
ds_to_universal are also run and their (known) failures recorded in the manifest.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

EXPERT_TAG = ".deepspeed_moe.experts.deepspeed_experts."


# ----------------------------------------------------------------------------- model

def build_model(args):
    import torch
    import torch.nn as nn
    from deepspeed.moe.layer import MoE
    d = args.width

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(d, 2 * d + 1)  # odd sizes
            self.fc2 = nn.Linear(2 * d + 1, d)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.proj = nn.Linear(d, d)
            self.moe = MoE(hidden_size=d, expert=Expert(), num_experts=args.num_experts, ep_size=args.ep_size,
                           k=args.top_k, min_capacity=4, use_residual=args.use_residual)

        def forward(self, x):
            h = _fp32_ln(self.norm, x)
            y, aux, _ = self.moe(self.proj(h))
            return x + y, aux

    def _fp32_ln(n, x):
        return torch.nn.functional.layer_norm(x.float(), n.normalized_shape, n.weight.float(), n.bias.float(),
                                              n.eps).to(x.dtype)

    class MoELM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(args.vocab, d)
            self.layers = nn.ModuleList([Block() for _ in range(args.moe_layers)])
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, args.vocab)

        def forward(self, ids):
            x = self.embed(ids)
            aux_total = 0.0
            for blk in self.layers:
                x, aux = blk(x)
                aux_total = aux_total + aux
            return self.head(_fp32_ln(self.norm, x)), aux_total

    return MoELM()


def param_groups(model):
    """decay / no_decay, then split into non-expert and per-ep-size expert groups (DeepSpeed helper)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def ds_config(args):
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": args.stage},
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {"enabled": args.dtype == "fp16", "initial_scale_power": 8, "loss_scale_window": 100},
    }


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


def make_engine(args, seed):
    import torch
    import deepspeed
    torch.manual_seed(seed)  # same init on every rank (experts differ by their local index only)
    model = build_model(args)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(args))
    return engine


def expert_info(engine):
    """Per MoE layer: module name, group name, local expert count, this rank's ep rank / expert-dp rank."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups
    out = []
    for name, m in engine.module.named_modules():
        if isinstance(m, MoE):
            out.append({"module": name, "group": m.expert_group_name, "num_local": m.num_local_experts,
                        "ep_rank": groups._get_expert_parallel_rank(m.expert_group_name),
                        "exp_dp_rank": groups._get_expert_data_parallel_rank(m.expert_group_name)})
    return out


def global_name(name, layers):
    """Rename a local expert param name to the global expert id, as the expert files do."""
    for li in layers:
        prefix = li["module"] + EXPERT_TAG
        if name.startswith(prefix):
            local, rest = name[len(prefix):].split(".", 1)
            return f"{prefix}{li['ep_rank'] * li['num_local'] + int(local)}.{rest}", li
    return name, None


def full_fp32(engine, p):
    import torch
    from deepspeed.utils import safe_get_full_fp32_param
    full = safe_get_full_fp32_param(p)  # collective over the param's (expert-)data-parallel group
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


def rank_state(engine):
    layers = expert_info(engine)
    masters, meta = {}, {}
    for name, p in engine.module.named_parameters():
        t = full_fp32(engine, p)
        gname, li = global_name(name, layers)
        masters[gname] = t
        if li is not None:
            meta[gname] = {"local_name": name, "moe_module": li["module"], "ep_rank": li["ep_rank"],
                           "exp_dp_rank": li["exp_dp_rank"]}
    return {"masters": masters, "meta": meta, "layers": layers}


def gather(obj):
    import deepspeed.comm as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_rank(rank, args, port):
    deepspeed = setup_rank(rank, args.world_size, port)
    import torch
    engine = make_engine(args, args.seed)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    loss = None
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        tgt = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        logits, aux = engine(ids)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), tgt.reshape(-1)) \
            + 0.01 * aux
        engine.backward(loss)
        engine.step()
    tag = args.tag or f"global_step{engine.global_steps}"
    t0 = time.time()
    engine.save_checkpoint(args.out, tag=tag)
    save_s = time.time() - t0
    allv = gather(rank_state(engine))
    if rank == 0:
        ref, meta, dup_mismatch, holders = {}, {}, [], {}
        for r, st in enumerate(allv):
            for n, t in st["masters"].items():
                if n in ref and not torch.equal(ref[n], t):
                    dup_mismatch.append(n)
                ref.setdefault(n, t)
                if n in st["meta"]:
                    meta.setdefault(n, dict(st["meta"][n], held_by_ranks=[]))
                    meta[n]["held_by_ranks"].append(r)
        torch.save(ref, os.path.join(args.out, "reference_fp32.pt"))
        rank_layout = [{"rank": r, "moe_layers": st["layers"]} for r, st in enumerate(allv)]
        info = {"tag": tag, "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
                "final_loss_rank0": float(loss.detach()), "save_seconds_rank0": round(save_s, 3),
                "optimizer_class": type(engine.optimizer).__name__,
                "model_param_dtype": str(next(engine.module.parameters()).dtype),
                "expert_meta": meta, "rank_layout": rank_layout,
                "expert_copies_equal": not dup_mismatch, "expert_copy_mismatch": dup_mismatch,
                "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"}
                                           for g in engine.optimizer.optimizer.param_groups]
                if hasattr(engine.optimizer, "optimizer") else None,
                "ds_config": ds_config(args)}
        with open(os.path.join(args.out, ".rank0_info.json"), "w") as f:
            json.dump(info, f, default=str)
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def load_rank(rank, args, port, result_path):
    deepspeed = setup_rank(rank, args.world_size, port)
    import torch
    engine = make_engine(args, args.seed + 777)  # other init: all values must come from the files
    path, _ = engine.load_checkpoint(args.out, load_optimizer_states=True, load_lr_scheduler_states=False)
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    st = rank_state(engine)
    bad = [n for n, t in st["masters"].items() if n not in ref or not torch.equal(t, ref[n])]
    res = gather({"bad": bad, "n": len(st["masters"])})
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"loaded": os.path.relpath(path, args.out), "checked": sum(r["n"] for r in res),
                       "mismatched": sorted({b for r in res for b in r["bad"]}),
                       "global_steps": engine.global_steps}, f)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    logits, aux = engine(ids)
    engine.backward(logits.float().mean() + aux)
    engine.step()  # training continues after the load
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


def _load_entry(rank, args, port, result_path):
    load_rank(rank, args, port, result_path)
    _quiet_exit()


# ----------------------------------------------------------------------------- checks + manifest

def check_files(args, tag, info):
    import torch
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tagdir = os.path.join(args.out, tag)
    bad, n, seen = [], 0, set()
    for fn in sorted(os.listdir(tagdir)):
        if not (re.fullmatch(r"layer_\d+_expert_\d+_mp_rank_\d+_model_states\.pt", fn)
                or fn == "mp_rank_00_model_states.pt"):
            continue
        sd = torch.load(os.path.join(tagdir, fn), weights_only=False)
        module = sd["module"] if "module" in sd else sd
        for k, t in module.items():
            n += 1
            seen.add(k)
            if k not in ref or t.dtype != dt or not torch.equal(ref[k].to(dt), t):
                bad.append(f"{fn}:{k}")
    missing = sorted(set(ref) - seen)
    return {"tensors_checked": n, "mismatched": bad, "reference_names_not_in_files": missing,
            "ok": not bad and not missing}


def try_zero_to_fp32(out):
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        get_fp32_state_dict_from_zero_checkpoint(os.path.abspath(out))
        return {"ok": True}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}".replace(os.path.abspath(out), "<out>"),
                "known_gap": "zero_to_fp32 globs *_model_states.pt and also picks up the expert files"}


def try_universal(out, tag):
    dst = os.path.join(out, f"{tag}_universal_attempt")
    p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        os.path.join(out, tag), "--output_folder", dst, "--inject_missing_state",
                        "--num_extract_workers", "2", "--num_merge_workers", "1"], capture_output=True, text=True)
    res = {"returncode": p.returncode}
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        res["error"] = lines[-1] if lines else "?"
        res["known_gap"] = ("ds_to_universal merges expert fragments by their LOCAL names, so experts of "
                            "different ep ranks collide")
        import shutil
        shutil.rmtree(dst, ignore_errors=True)
        latest = os.path.join(out, "latest_universal")
        if os.path.exists(latest):
            os.remove(latest)
    return res


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--ep-size", type=int, default=2, help="expert-parallel size (divides world size)")
    ap.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (multiple of ep size)")
    ap.add_argument("--moe-layers", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=1, choices=[1, 2])
    ap.add_argument("--use-residual", action="store_true", help="Residual-MoE (adds mlp + coefficient)")
    ap.add_argument("--stage", type=int, choices=[0, 1, 2], default=2, help="ZeRO stage (3 is refused)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--width", type=int, default=15)
    ap.add_argument("--vocab", type=int, default=61)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tag")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    args = ap.parse_args(argv)
    if args.world_size % args.ep_size or args.num_experts % args.ep_size:
        ap.error("--ep-size must divide --world-size and --num-experts")
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

    checks = {}
    if args.verify:
        checks["files_equal_reference"] = check_files(args, tag, info)
        checks["expert_copies_equal"] = info["expert_copies_equal"]
        result = os.path.join(args.out, ".load.json")
        mp.start_processes(_load_entry, args=(args, free_port(), result), nprocs=args.world_size,
                           start_method="spawn")
        with open(result) as f:
            checks["deepspeed_reload"] = json.load(f)
        os.remove(result)
        checks["deepspeed_reload"]["ok"] = not checks["deepspeed_reload"]["mismatched"]
        if args.stage > 0:
            checks["zero_to_fp32"] = try_zero_to_fp32(args.out)
            checks["ds_to_universal"] = try_universal(args.out, tag)

    import torch
    import deepspeed
    ref = torch.load(os.path.join(args.out, "reference_fp32.pt"), weights_only=True)
    meta = info.pop("expert_meta")
    experts = {}
    for n, m in meta.items():
        mod = m["moe_module"]
        gid = int(n[len(mod + EXPERT_TAG):].split(".", 1)[0])
        layer_id = [li["module"] for li in info["rank_layout"][0]["moe_layers"]].index(mod)
        e = experts.setdefault(f"{layer_id}:{gid}", {
            "moe_layer_id": layer_id, "moe_module": mod, "global_expert_id": gid, "ep_rank": m["ep_rank"],
            "local_expert_id": gid % (args.num_experts // args.ep_size), "held_by_ranks": m["held_by_ranks"],
            "file": f"{tag}/layer_{layer_id}_expert_{gid}_mp_rank_00_model_states.pt", "params": []})
        e["params"].append({"name": n, "local_name": m["local_name"]})
    files = {}
    for root, _, fs in os.walk(args.out):
        for fn in fs:
            p = os.path.join(root, fn)
            files[os.path.relpath(p, args.out)] = os.path.getsize(p)
    manifest = {
        "generator": "make_ds_moe.py", "layout": "moe",
        "world_size": args.world_size, "ep_size": args.ep_size, "num_experts": args.num_experts,
        "num_local_experts": args.num_experts // args.ep_size, "expert_dp_size": args.world_size // args.ep_size,
        "moe_layers": args.moe_layers, "top_k": args.top_k, "use_residual": args.use_residual,
        "stage": args.stage, "dtype": args.dtype,
        "deepspeed_version": deepspeed.__version__, "torch_version": torch.__version__,
        "python_version": sys.version.split()[0], "seed": args.seed, "steps": args.steps,
        "model": {"width": args.width, "vocab": args.vocab,
                  "num_params_unique": sum(t.numel() for t in ref.values())},
        "rank_to_ep_rank_rule": "ep_rank = rank % ep_size; expert-dp group = ranks with the same ep_rank "
                                "(DeepSpeed default, use_data_before_expert_parallel_=False)",
        "global_expert_id_rule": "global = ep_rank * num_local_experts + local",
        "params": {n: {"shape": list(t.shape), "numel": t.numel(), "expert": n in meta} for n, t in ref.items()},
        "experts": dict(sorted(experts.items(), key=lambda kv: (kv[1]["moe_layer_id"], kv[1]["global_expert_id"]))),
        **info,
        "train_and_save_seconds": round(train_s, 2),
        "files": dict(sorted(files.items())), "total_bytes": sum(files.values()),
        "checks": checks,
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, default=str)
    hard = {k: v for k, v in checks.items() if k in ("files_equal_reference", "expert_copies_equal", "deepspeed_reload")}
    ok = all(v if isinstance(v, bool) else v["ok"] for v in hard.values())
    print(f"[make_ds_moe] ws={args.world_size} ep={args.ep_size} experts={args.num_experts} zero={args.stage} "
          f"dtype={args.dtype} optimizer={info['optimizer_class']} params={manifest['model']['num_params_unique']} "
          f"bytes={manifest['total_bytes']} train+save={train_s:.1f}s total={time.time() - t0:.1f}s checks: "
          f"{'OK' if ok else 'FAILED'} " + json.dumps({k: (v if isinstance(v, bool) else v.get('ok', v.get('returncode')))
                                                     for k, v in checks.items()}))
    if not ok:
        print(json.dumps(hard, indent=1))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
