"""Each trainable param's full fp32 master and Adam moments, rebuilt from a ZeRO checkpoint's
files with torch.load alone (independent of zinspect): what a resumed engine must hold."""
import glob
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


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=STUB_PICKLE)


def expected_states(tag_dir: str) -> dict:
    """{name: {"fp32": t, "exp_avg": t, "exp_avg_sq": t}} (flat tensors) of a plain ZeRO-1/2/3
    or BF16_Optimizer checkpoint (no round-robin order)."""
    optim = sorted(glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_optim_states.pt")),
                   key=lambda p: int(os.path.basename(p).split("zero_pp_rank_")[1].split("_")[0]))
    model = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))[0]
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
        off = 0
        for name, shape in group.items():
            n = shape.numel()
            out[name] = {s: flats[s][off:off + n].clone() for s in STATES}
            off += n
    return out
