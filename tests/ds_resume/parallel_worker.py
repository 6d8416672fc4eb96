"""Load a tensor-parallel (AutoTP), pipeline (x tp) or native MoE checkpoint into REAL DeepSpeed engines
(CPU, gloo, one process per rank) with plain `engine.load_checkpoint(DIR)`, record what they
hold, and take one training step. Run with the DeepSpeed venv's python (ZINSPECT_DS_PYTHON) by
tests/test_reshard_parallel.py:

    python parallel_worker.py --ckpt DIR --manifest FIXTURE/manifest.json --world-size N --result OUT.pt

The model is the fixture's generator's (tests/tools/make_ds_autotp.py, make_ds_pipeline.py,
make_ds_moe.py, make_ds_pptp.py, with the manifest's arguments), built with another seed so that every value
must come from the checkpoint. Recorded per param, keyed by what the rank holds of it (its tp
rank's shard, its stage's copy, the global expert id): the fp32 master and Adam's exp_avg /
exp_avg_sq, each gathered whole over its (expert-)data-parallel group by DeepSpeed's own
safe_get_full_* helpers; frozen params and buffers as fp32. Rank 0 saves to OUT.pt
{"held": {key: {state: tensor}}, "steps_every_rank" (global_steps after the load),
"steps_after", "loss", "disagree" (keys two ranks hold differently)}.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def _persistent_buffers(module):
    for name, b in module.named_buffers():
        mod_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(mod_name) if mod_name else module
        if leaf not in owner._non_persistent_buffers_set:
            yield name, b


def held(engine, key_of):
    """{(where, name): {state: fp32 tensor}} of this rank (collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2, BF16_Optimizer: moments are linked to params lazily
        link()
    out = {}
    for name, p in engine.module.named_parameters():
        key = key_of(name)
        if not p.requires_grad:
            out[key] = {"frozen": p.detach().float().cpu().clone()}
            continue
        got = {"fp32": safe_get_full_fp32_param(p),
               "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        out[key] = {s: None if t is None else t.detach().float().cpu().clone() for s, t in got.items()}
    for name, b in _persistent_buffers(engine.module):
        out[key_of(name)] = {"buffer": b.detach().float().cpu().clone()}
    return out


def autotp(args, m, rank):
    import make_ds_autotp as gen

    deepspeed = gen.setup_rank(rank, args.world_size, args.port)
    a = argparse.Namespace(**m["model"], model=m["model_kind"], tp=m["tp"], stage=m["stage"],
                           dtype=m["dtype"], seed=m["seed"], batch=2, seq=8,
                           vocab_parallel_head=False, world_size=args.world_size)
    engine = gen.make_engine(a, m["seed"] + 777, args.world_size)
    engine.load_checkpoint(args.ckpt, load_lr_scheduler_states=False)
    from deepspeed.utils import groups

    tp = groups.get_tensor_model_parallel_rank()
    state = held(engine, lambda n: f"tp{tp}:{n}"), engine.global_steps
    import torch

    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(5))
    if a.model == "llama":
        loss = engine(input_ids=ids, labels=ids).loss
    else:
        loss = torch.nn.functional.cross_entropy(engine(ids).float().reshape(-1, a.vocab), ids.reshape(-1))
    engine.backward(loss)
    engine.step()
    return deepspeed, engine, state, loss.item()


def pipeline(args, m, rank):
    import make_ds_pipeline as gen

    deepspeed = gen.setup_rank(rank, args.world_size, args.port)
    pp = m["pp"]
    dp = args.world_size // pp
    a = argparse.Namespace(**{k: m["model"][k] for k in ("width", "blocks", "vocab", "tied")},
                           frozen=bool(m.get("frozen")), pp=pp, dp=dp, stage=m["stage"],
                           dtype=m["dtype"], grad_accum_dtype=m.get("grad_accum_dtype"),
                           topology=m.get("topology", "pipe-data"), partition_method="type:Block",
                           seed=m["seed"] + 777, batch=m["batch"], seq=m["seq"],
                           micro_batches=m["micro_batches"])
    engine = gen.make_engine(a, pp, dp)
    engine.load_checkpoint(args.ckpt, load_lr_scheduler_states=False)
    stage = engine.grid.get_stage_id()
    state = held(engine, lambda n: f"stage{stage}:{n}"), engine.global_steps
    import torch

    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(5))
    loss = engine.train_batch(data_iter=iter([(ids, ids)] * a.micro_batches))
    return deepspeed, engine, state, float(loss)


def moe(args, m, rank):
    import make_ds_moe as gen

    deepspeed = gen.setup_rank(rank, args.world_size, args.port)
    a = argparse.Namespace(width=m["model"]["width"], vocab=m["model"]["vocab"],
                           num_experts=m["num_experts"], ep_size=m["ep_size"],
                           moe_layers=m["moe_layers"], top_k=m["top_k"],
                           use_residual=m["use_residual"], stage=m["stage"], dtype=m["dtype"],
                           batch=2, seq=8)
    engine = gen.make_engine(a, m["seed"] + 777)
    engine.load_checkpoint(args.ckpt, load_lr_scheduler_states=False)
    layers = gen.expert_info(engine)
    state = held(engine, lambda n: gen.global_name(n, layers)[0]), engine.global_steps
    import torch

    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(5))
    logits, aux = engine(ids)
    loss = logits.float().mean() + aux
    engine.backward(loss)
    engine.step()
    return deepspeed, engine, state, loss.item()


def pptp(args, m, rank):
    import make_ds_pptp as gen

    deepspeed = gen.setup_rank(rank, args.world_size, args.port)
    pp, tp = m["pp"], m["tp"]
    a = argparse.Namespace(**{k: m["model"][k] for k in ("hidden", "ffn", "heads", "layers", "vocab")},
                           pp=pp, tp=tp, dp=args.world_size // (pp * tp), stage=m["stage"],
                           dtype=m["dtype"], grad_accum_dtype=m.get("grad_accum_dtype"),
                           seed=m["seed"], batch=m["batch"], seq=m["seq"],
                           micro_batches=m["micro_batches"])
    engine = gen.make_engine(a, rank, m["seed"] + 777)
    engine.load_checkpoint(args.ckpt, load_lr_scheduler_states=False)
    stage, t = engine.grid.get_stage_id(), engine.grid.get_slice_parallel_rank()
    state = held(engine, lambda n: f"stage{stage}:tp{t}:{n}"), engine.global_steps
    import torch

    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(5))
    loss = engine.train_batch(data_iter=iter([(ids, ids)] * a.micro_batches))
    return deepspeed, engine, state, float(loss)


MODELS = {"make_ds_autotp.py": autotp, "make_ds_pipeline.py": pipeline, "make_ds_moe.py": moe,
          "make_ds_pptp.py": pptp}


def run_rank(rank, args):
    m = json.loads(Path(args.manifest).read_text())
    deepspeed, engine, (state, loaded_steps), loss = MODELS[m["generator"]](args, m, rank)
    import torch

    every = [None] * args.world_size
    deepspeed.comm.all_gather_object(every, {"state": state, "steps": loaded_steps})
    if rank == 0:
        merged, disagree = {}, []
        for part in every:
            for key, states in part["state"].items():
                if key not in merged:
                    merged[key] = states
                elif any(merged[key][s] is not None and t is not None and not torch.equal(merged[key][s], t)
                         for s, t in states.items()):
                    disagree.append(key)
        torch.save({"held": merged, "disagree": disagree, "loss": loss,
                    "loss_finite": math.isfinite(loss), "steps_after": engine.global_steps,
                    "steps_every_rank": [p["steps"] for p in every]}, args.result)
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo threads may abort in interpreter teardown after all work is done


def main(rank_main=run_rank):
    """Parse the worker's arguments and run `rank_main(rank, args)` in one spawned process per
    rank (zero0_worker passes its own)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--result", required=True)
    args = ap.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args.port = s.getsockname()[1]
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.multiprocessing as mp

    mp.start_processes(rank_main, args=(args,), nprocs=args.world_size, start_method="spawn")


if __name__ == "__main__":
    main()
