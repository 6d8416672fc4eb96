"""Load a universal checkpoint of an AutoTP fixture into real DeepSpeed engines (tp as saved, at
--world-size ranks: another data-parallel size) with "checkpoint": {"load_universal": true}, and
save what each rank's engine then holds: per param its fp32 master shard and Adam moments, then
take one training step (its loss and the steps after it are saved too).
Run with a python that has deepspeed==0.19.8 (tests/test_universal_tp.py). The model is built
as tests/tools/make_ds_autotp.py built it for the fixture (its manifest)."""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_ds_autotp as gen  # noqa: E402


def run_rank(rank, args, port):
    deepspeed = gen.setup_rank(rank, args.world_size, port)
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    engine = gen.make_engine(args, args.seed + 777, args.world_size, load_universal=True)
    engine.load_checkpoint(args.ckpt, load_optimizer_states=True, load_lr_scheduler_states=False)
    st = gen.rank_state(engine)
    held = {}
    for name, p in engine.module.named_parameters():
        held[name] = {"fp32": st["shards"][name]}
        for key in ("exp_avg", "exp_avg_sq"):
            t = safe_get_full_optimizer_state(p, key)
            held[name][key] = None if t is None else t.detach().float().cpu().clone()
    loaded_steps = engine.global_steps
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    if args.model == "llama":
        loss = engine(input_ids=ids, labels=ids).loss
    else:
        loss = torch.nn.functional.cross_entropy(engine(ids).float().reshape(-1, args.vocab), ids.reshape(-1))
    engine.backward(loss)
    engine.step()
    torch.save({"tp": st["tp"], "dp": st["dp"], "global_steps": loaded_steps, "held": held,
                "loss": float(loss.detach()), "steps_after": engine.global_steps}, f"{args.result}.{rank}.pt")
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    m = json.loads(Path(a.manifest).read_text())
    args = argparse.Namespace(**m["model"], model=m["model_kind"], tp=m["tp"], stage=m["stage"],
                              dtype=m["dtype"], seed=m["seed"], batch=2, seq=8, out=a.ckpt,
                              vocab_parallel_head=False, ckpt=a.ckpt, world_size=a.world_size,
                              result=a.result)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.multiprocessing as mp

    mp.start_processes(run_rank, args=(args, gen.free_port()), nprocs=a.world_size, start_method="spawn")


if __name__ == "__main__":
    main()
