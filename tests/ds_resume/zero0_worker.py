"""Load a ZeRO-0 checkpoint (plain, pipeline, native MoE or tensor parallel) into REAL DeepSpeed
engines (CPU, gloo, one process per rank) with plain `engine.load_checkpoint(DIR)` at any
data-parallel size, record what they hold, and take one training step. Run with the DeepSpeed
venv's python (ZINSPECT_DS_PYTHON) by tests/test_reshard_zero0.py:

    python zero0_worker.py --ckpt DIR --manifest FIXTURE/manifest.json --world-size N --result OUT.pt

The models, the steps and OUT.pt are parallel_worker.py's (its builders for the generators
make_ds_pipeline.py, make_ds_moe.py, make_ds_autotp.py, plus plain ZeRO's make_ds_variants.py
here); only what an engine holds is read differently: ZeRO-0 keeps no fragment mappings
(DeepSpeed's safe_get_full_* helpers give None), so the fp32 master is the param itself
(fp32) or FP16_UnfusedOptimizer's fp32_groups copy (bf16 / fp16), and Adam's moments are the
torch optimizer's state of that master.
"""

import argparse

import parallel_worker as pw


def held(engine, key_of):
    """{key: {state: fp32 tensor}} of this rank: fp32 master, exp_avg, exp_avg_sq per trainable
    param; frozen params and persistent buffers as fp32."""
    opt, master_of = engine.optimizer, {}
    if type(opt).__name__ == "BF16_Optimizer":
        raise RuntimeError("BF16_Optimizer at ZeRO-0: not handled here (no engine loads its files)")
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer
        for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
            master_of.update((id(a), b) for a, b in zip(g16, g32, strict=True))
        opt = opt.optimizer
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            out[key_of(name)] = {"frozen": p.detach().float().cpu().clone()}
            continue
        master = master_of.get(id(p), p)
        state = opt.state.get(master, {})
        got = {"fp32": master, "exp_avg": state.get("exp_avg"), "exp_avg_sq": state.get("exp_avg_sq")}
        out[key_of(name)] = {s: None if t is None else t.detach().float().cpu().clone()
                             for s, t in got.items()}
    for name, b in pw._persistent_buffers(engine.module):
        out[key_of(name)] = {"buffer": b.detach().float().cpu().clone()}
    return out


def variants(args, m, rank):
    """Plain ZeRO-0 (tests/tools/make_ds_variants.py's model)."""
    import make_ds_variants as gen

    deepspeed = gen.setup_rank(rank, args.world_size, args.port)
    a = argparse.Namespace(**{k: m["model"][k] for k in ("width", "blocks", "vocab")}, stage=m["stage"],
                           dtype=m["dtype"], offload="", hpz=0,
                           batch=m["ds_config"]["train_micro_batch_size_per_gpu"], seq=8)
    engine = gen.make_engine(a, m["seed"] + 777, gen.ds_config(a))
    engine.load_checkpoint(args.ckpt, load_lr_scheduler_states=False)
    state = held(engine, lambda n: n), engine.global_steps
    import torch

    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(5))
    loss = torch.nn.functional.cross_entropy(engine(ids).float().reshape(-1, a.vocab), ids.reshape(-1))
    engine.backward(loss)
    engine.step()
    return deepspeed, engine, state, loss.item()


def run_rank(rank, args):
    pw.held = held  # parallel_worker's builders read what an engine holds through this name
    pw.MODELS["make_ds_variants.py"] = variants
    pw.run_rank(rank, args)


def main():
    pw.main(run_rank)


if __name__ == "__main__":
    main()
