"""Load a universal checkpoint of a pipeline fixture into real DeepSpeed PipelineEngines (at
--pp stages x --dp replicas: another pp and/or dp size) with "checkpoint": {"load_universal":
true}, save what each rank then holds (per trainable param of its stage: the full fp32 master and
Adam moments), and take one training step. Run with a python that has deepspeed==0.19.8
(tests/test_universal_pipeline.py). The model is built as tests/tools/make_ds_pipeline.py built
it for the fixture (its manifest), from another seed: every value must come from the checkpoint.

    python pp_universal_worker.py --ckpt DIR --manifest FIXTURE/manifest.json --pp P --dp D \
        --result PREFIX          # writes PREFIX.<rank>.pt
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_ds_pipeline as gen  # noqa: E402


def run_rank(rank, args, port):
    deepspeed = gen.setup_rank(rank, args.pp * args.dp, port)
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = gen.make_engine(args, args.pp, args.dp, load_universal=True)
    path, _ = engine.load_checkpoint(args.ckpt, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1 / BF16_Optimizer link the moments to the params lazily
        link()
    held = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        held[name] = {"fp32": safe_get_full_fp32_param(p)}
        for key in ("exp_avg", "exp_avg_sq"):
            held[name][key] = safe_get_full_optimizer_state(p, key)
        held[name] = {k: None if t is None else t.detach().float().cpu().clone()
                      for k, t in held[name].items()}
    loaded_steps = engine.global_steps
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    loss = engine.train_batch(data_iter=iter([(ids, ids)] * args.micro_batches))
    torch.save({"stage": engine.grid.get_stage_id(), "dp": engine.grid.get_data_parallel_id(),
                "loaded": path is not None, "global_steps": loaded_steps, "held": held,
                "loss_finite": math.isfinite(float(loss)) if loss is not None else None,
                "steps_after": engine.global_steps}, f"{args.result}.{rank}.pt")
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()
    gen._quiet_exit()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--dp", type=int, required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    m = json.loads(Path(a.manifest).read_text())
    args = argparse.Namespace(**m["model"], stage=m["stage"], dtype=m["dtype"],
                              grad_accum_dtype=m["grad_accum_dtype"], topology=m["topology"],
                              partition_method="type:Block", frozen=bool(m.get("frozen")),
                              batch=m["batch"], seq=m["seq"], micro_batches=m["micro_batches"],
                              seed=m["seed"] + 777, ckpt=a.ckpt, pp=a.pp, dp=a.dp, result=a.result)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.multiprocessing as mp

    mp.start_processes(run_rank, args=(args, gen.free_port()), nprocs=a.pp * a.dp, start_method="spawn")


if __name__ == "__main__":
    main()
