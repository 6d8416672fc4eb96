"""Each trainable param's full fp32 master and Adam moments, rebuilt from a ZeRO checkpoint's
files with torch.load alone (independent of zinspect): what a resumed engine must hold."""
import glob
import math
import os
import pickle
import types

import torch

STATES = ("fp32", "exp_avg", "exp_avg_sq")


class _Record:
    """Stands in for a DeepSpeed class (loss scaler, fragment_address): only tensors matter."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("deepspeed"):
            return int if name == "ZeroStageEnum" else _Record
        return super().find_class(module, name)


#: torch.load's pickle_module: DeepSpeed classes without DeepSpeed installed
STUB_PICKLE = types.SimpleNamespace(__name__="stub_pickle", Unpickler=_Unpickler, load=pickle.load)


def same_pickled(a, b, where: str) -> None:
    """Equal pickled objects (what torch.load gives with STUB_PICKLE): tensors bit for bit (dtype
    and shape too), dicts key by key in order, stubbed DeepSpeed objects by their state."""
    if torch.is_tensor(b):
        assert torch.is_tensor(a) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), (where, list(a), list(b))
        for k in b:
            same_pickled(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_pickled(x, y, f"{where}[{i}]")
    elif isinstance(b, _Record):
        assert type(a) is type(b) and vars(a) == vars(b), where
    else:
        assert a == b, where


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=STUB_PICKLE)


def expected_pipeline_states(tag_dir: str, stages: int, tp: int = 1, tp_rank: int = 0) -> dict:
    """expected_states of a pipeline (ZeRO-1 or BF16_Optimizer): every stage's params, each
    from its own stage's files (a tied param from the lowest stage holding it); with `tp`, tp
    rank `tp_rank`'s shards (files mp_rank = stage * tp + tp rank)."""
    out: dict = {}
    for s in range(stages):
        for name, states in expected_states(tag_dir, s * tp + tp_rank).items():
            out.setdefault(name, states)
    return out


def expected_states(tag_dir: str, mp_rank: int | None = None) -> dict:
    """{name: {"fp32": t, "exp_avg": t, "exp_avg_sq": t}} (flat tensors) of a plain ZeRO-1/2/3
    or BF16_Optimizer checkpoint (no round-robin order); with `mp_rank`, of that pipeline
    stage's files only."""
    mp = "" if mp_rank is None else f"_mp_rank_{mp_rank:02d}"
    optim = sorted(glob.glob(os.path.join(tag_dir, f"*zero_pp_rank_*{mp}_optim_states.pt")),
                   key=lambda p: int(os.path.basename(p).split("zero_pp_rank_")[1].split("_")[0]))
    model = sorted(glob.glob(os.path.join(tag_dir, f"*{mp.lstrip('_')}*model_states.pt")))[0]
    shapes = _load(model)["param_shapes"]
    osds = [_load(p)["optimizer_state_dict"] for p in optim]
    out = {}
    if "fp32_flat_groups" in osds[0]:  # ZeRO-3: ceil(n/ws) of each param per rank
        ws = len(osds)
        for g, group in enumerate(shapes):
            parts = {"fp32": [o["fp32_flat_groups"][g] for o in osds]}
            for key in STATES[1:]:
                parts[key] = [o["optimizer_state_dict"]["state"][g][key] for o in osds]
            off = 0
            for name, shape in group.items():
                n = shape.numel()
                share = -(-n // ws)
                out[name] = {s: torch.cat([p[off:off + share] for p in parts[s]])[:n].clone()
                             for s in STATES}
                off += share
        return out
    for g, group in enumerate(shapes):
        out.update(_zero12_group(osds, g, group))
    return out


def expected_moe_states(tag_dir: str, ep: int) -> dict:
    """expected_states of a native MoE run at ZeRO-1/2, experts under their GLOBAL ids (as the
    expert files name them): an expert group (`moe: True`) is cut over its expert-data-parallel
    ranks (rank % ep == ep rank), its members named by local id j: global = ep_rank * nl + j."""
    import re

    optim = sorted(glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_optim_states.pt")),
                   key=lambda p: int(os.path.basename(p).split("zero_pp_rank_")[1].split("_")[0]))
    shapes = _load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))["param_shapes"]
    osds = [_load(p)["optimizer_state_dict"] for p in optim]
    local = re.compile(r"(deepspeed_experts\.)(\d+)\.")
    out = {}
    for g, group in enumerate(shapes):
        if not osds[0]["base_optimizer_state"]["param_groups"][g].get("moe"):
            out.update(_zero12_group(osds, g, group))
            continue
        nl = 1 + max(int(local.search(n).group(2)) for n in group)
        for r in range(ep):
            for name, states in _zero12_group(osds[r::ep], g, group).items():
                gid = r * nl + int(local.search(name).group(2))
                out[local.sub(lambda m, gid=gid: f"{m.group(1)}{gid}.", name, count=1)] = states
    return out


def _zero12_group(osds: list, g: int, group: dict) -> dict:
    """{name: states} of flat group g of ZeRO-1/2 (or BF16_Optimizer) files `osds`, in rank order."""
    flats = {}
    for s in STATES:
        pieces = []
        for o in osds:
            pad = o["group_paddings"][g]
            t = o["single_partition_of_fp32_groups"][g] if s == "fp32" else \
                o["base_optimizer_state"]["state"][g][s]
            real = t.numel() - pad if (s != "fp32" or "zero_stage" not in o) else t.numel()
            pieces.append(t[:real])
        flats[s] = torch.cat(pieces)
    out, off = {}, 0
    for name, shape in group.items():
        n = math.prod(shape)
        out[name] = {s: flats[s][off:off + n].clone() for s in STATES}
        off += n
    return out
