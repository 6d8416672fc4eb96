"""Load a universal checkpoint of a native-MoE fixture into real DeepSpeed engines (same ep size,
--world-size ranks: another expert-data-parallel and data-parallel size) with "checkpoint":
{"load_universal": true}, save what each rank then holds (per trainable param, under its GLOBAL
expert id as the expert files name it: the full fp32 master and Adam moments over its
(expert-)data-parallel group), and take one training step. Run with a python that has
deepspeed==0.19.8 (tests/test_universal_moe.py). The model is built as tests/tools/make_ds_moe.py
built it for the fixture (its manifest), from another seed.

    python moe_universal_worker.py --ckpt DIR --manifest FIXTURE/manifest.json --world-size N \
        --result PREFIX          # writes PREFIX.<rank>.pt
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_ds_moe as gen  # noqa: E402


def run_rank(rank, args, port):
    deepspeed = gen.setup_rank(rank, args.world_size, port)
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    torch.manual_seed(args.seed + 777)  # not the checkpoint's values
    model = gen.build_model(args)
    opt = torch.optim.AdamW(gen.param_groups(model), lr=1e-2, betas=(0.9, 0.95))
    config = {**gen.ds_config(args), "checkpoint": {"load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    path, _ = engine.load_checkpoint(args.ckpt, load_optimizer_states=True, load_lr_scheduler_states=False)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    layers = gen.expert_info(engine)
    held = {}
    for name, p in engine.module.named_parameters():
        got = {"fp32": safe_get_full_fp32_param(p),
               "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        held[gen.global_name(name, layers)[0]] = {
            k: None if t is None else t.detach().float().cpu().clone() for k, t in got.items()}
    loaded_steps = engine.global_steps
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    logits, aux = engine(ids)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), ids.reshape(-1)) + aux
    engine.backward(loss)
    engine.step()
    torch.save({"loaded": path is not None, "global_steps": loaded_steps, "held": held,
                "ep_ranks": [li["ep_rank"] for li in layers], "loss_finite": math.isfinite(float(loss)),
                "steps_after": engine.global_steps}, f"{args.result}.{rank}.pt")
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()
    gen._quiet_exit()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    m = json.loads(Path(a.manifest).read_text())
    args = argparse.Namespace(**m["model"], ep_size=m["ep_size"], num_experts=m["num_experts"],
                              moe_layers=m["moe_layers"], top_k=m["top_k"], use_residual=m["use_residual"],
                              stage=m["stage"], dtype=m["dtype"], batch=2, seq=8, seed=m["seed"],
                              ckpt=a.ckpt, world_size=a.world_size, result=a.result)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.multiprocessing as mp

    mp.start_processes(run_rank, args=(args, gen.free_port()), nprocs=a.world_size, start_method="spawn")


if __name__ == "__main__":
    main()
