"""Resume a checkpoint in REAL DeepSpeed engines (CPU, gloo on 127.0.0.1, one process per rank).

Run with the DeepSpeed venv's python (ZINSPECT_DS_PYTHON), by tests/test_reshard.py and
tests/test_universal.py:

    python resume_worker.py --ckpt DIR --source SOURCE_TAG_DIR --manifest FIXTURE/manifest.json \
        --world-size N --result result.json [--universal]

Each rank builds the fixture's model (tests/tools/make_ds_checkpoints.py), initializes an engine
with the fixture's ds_config at world size N, calls plain `engine.load_checkpoint(DIR)` (with
`"checkpoint": {"load_universal": true}` for --universal), then compares every trainable param's
full fp32 master and Adam exp_avg / exp_avg_sq (DeepSpeed's safe_get_full_* gathers) with the
source checkpoint's (rebuilt from its files by expected.py, with torch alone), bit for bit, and
takes one
training step. Rank 0 writes the result as JSON.
"""
import argparse
import importlib
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tools")]


def run_rank(rank, args, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size),
                      LOCAL_SIZE=str(args.world_size), LOCAL_WORLD_SIZE=str(args.world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    with open(args.manifest) as f:
        manifest = json.load(f)
    m = manifest["model"]
    cfg = dict(manifest["ds_config"])
    if args.universal:
        cfg["checkpoint"] = {"load_universal": True}
    torch.manual_seed(manifest.get("seed", 1234) + 99)  # NOT the checkpoint's values
    if manifest.get("generator") == "make_ds_variants.py":  # offload / hpZ fixtures
        import make_ds_variants as gen

        model = gen.build_model(m["width"], m["blocks"], m["vocab"])
        opt = torch.optim.AdamW(gen.param_groups(model), lr=1e-2, betas=(0.9, 0.95))
    else:
        import make_ds_checkpoints as gen

        model = gen.build_model(m["width"], m["layers"], m["vocab"],
                                frozen=bool(manifest.get("frozen")), tied=bool(manifest.get("tied")))
        groups = gen.param_groups(model)
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups],
                                betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    path, _ = engine.load_checkpoint(args.ckpt)
    from expected import expected_states

    expect = expected_states(args.source)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2, BF16_Optimizer: moments are linked to params lazily
        link()
    result = {"loaded": path is not None, "global_steps": engine.global_steps,
              "compared": 0, "mismatches": [], "missing": []}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        got = {"fp32": safe_get_full_fp32_param(p),
               "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        want = expect.get(name)
        if want is None:
            result["missing"].append(name)
            continue
        for state, tensor in got.items():
            result["compared"] += 1
            ok = tensor is not None and torch.equal(tensor.detach().float().cpu().reshape(-1),
                                                    want[state].float().reshape(-1))
            if not ok:
                result["mismatches"].append(f"{name}:{state}")
    # frozen params live in the model states (16-bit), not in the optimizer: the fixture's
    # reference holds them upcast to fp32
    ref = torch.load(os.path.join(os.path.dirname(args.manifest), "reference_fp32.pt"),
                     weights_only=True)
    result["frozen_restored"], result["frozen_differ"] = [], []
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            same = torch.equal(p.detach().float().cpu(), ref[name])
        result["frozen_restored" if same else "frozen_differ"].append(name)
    gen_ids = torch.Generator().manual_seed(7 + rank)
    vocab, batch = m["vocab"], manifest.get("batch", 2)
    ids = torch.randint(0, vocab, (batch, manifest.get("seq", 8)), generator=gen_ids)
    logits = engine(ids)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), ids.reshape(-1))
    engine.backward(loss)
    engine.step()
    result["loss"] = loss.item()
    result["loss_finite"] = math.isfinite(loss.item())
    result["steps_after"] = engine.global_steps
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump(result, f)
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


def _entry(rank, args, port):
    run_rank(rank, args, port)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--source", required=True, help="the source checkpoint's tag dir")
    ap.add_argument("--result", required=True)
    ap.add_argument("--universal", action="store_true")
    args = ap.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(args, port), nprocs=args.world_size, start_method="spawn")


if __name__ == "__main__":
    main()
