"""Load a universal checkpoint of a pipeline x tensor-parallel fixture (Megatron-DeepSpeed style,
tests/tools/make_ds_pptp.py) into real DeepSpeed PipelineEngines at --pp x --tp x --dp with
"checkpoint": {"load_universal": true}, save what each rank then holds (per param of its stage:
its tp shard of the fp32 master and Adam moments, whole over its data-parallel group), and take
one training step. Run with a python that has deepspeed==0.19.8 (tests/test_universal_pptp.py).

    python pptp_universal_worker.py --ckpt DIR --manifest FIXTURE/manifest.json --pp P --tp T \
        --dp D --result PREFIX          # writes PREFIX.<rank>.pt
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_ds_pptp as gen  # noqa: E402


def run_rank(rank, args, port):
    deepspeed = gen.setup_rank(rank, args.pp * args.tp * args.dp, port)
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    saved_config = gen.ds_config
    gen.ds_config = lambda a: {**saved_config(a), "checkpoint": {"load_universal": True}}
    engine = gen.make_engine(args, rank, args.seed + 777)  # another init: values from the files
    path, _ = engine.load_checkpoint(args.ckpt, load_optimizer_states=True, load_lr_scheduler_states=False)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    held = {}
    for name, p in engine.module.named_parameters():
        got = {"fp32": safe_get_full_fp32_param(p),
               "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        held[name] = {k: None if t is None else t.detach().float().cpu().clone() for k, t in got.items()}
    grid, loaded_steps = engine.grid, engine.global_steps
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    loss = engine.train_batch(data_iter=iter([(ids, ids)] * args.micro_batches))
    torch.save({"stage": grid.get_stage_id(), "tp": grid.get_slice_parallel_rank(),
                "dp": grid.get_data_parallel_id(), "loaded": path is not None,
                "global_steps": loaded_steps, "held": held, "steps_after": engine.global_steps,
                "loss_finite": loss is None or math.isfinite(float(loss))}, f"{args.result}.{rank}.pt")
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()
    gen._quiet_exit()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--manifest", required=True)
    for dim in ("--pp", "--tp", "--dp"):
        ap.add_argument(dim, type=int, required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    m = json.loads(Path(a.manifest).read_text())
    args = argparse.Namespace(**m["model"], stage=m["stage"], dtype=m["dtype"],
                              grad_accum_dtype=m["grad_accum_dtype"], batch=m["batch"], seq=m["seq"],
                              micro_batches=m["micro_batches"], seed=m["seed"], ckpt=a.ckpt,
                              pp=a.pp, tp=a.tp, dp=a.dp, result=a.result)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.multiprocessing as mp

    mp.start_processes(run_rank, args=(args, gen.free_port()), nprocs=a.pp * a.tp * a.dp,
                       start_method="spawn")


if __name__ == "__main__":
    main()
