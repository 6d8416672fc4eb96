"""The native-MoE side of the universal writer (`zinspect.core.universal`): `deepspeed.moe.layer.MoE`
at ZeRO-1/2, experts split over ep ranks.

DeepSpeed 0.19.8 names a rank's experts LOCALLY in its engine (`...deepspeed_experts.<j>.fc1.weight`,
j < num_local), so ds_to_universal, which keys zero/ by those names, collides and fails. Its
loader (checkpoint/universal_checkpoint.py `load_hp_checkpoint_state`) does slice expert params
by ep rank: a file `{'param': t, 'cat_dim': 0, 'is_expert_param': True, 'ep_num_experts': E}` gives
ep rank r the rows [r*E/ep_size, (r+1)*E/ep_size) of t's dim 0 (ep rank and size of the largest
expert group: base_optimizer.py `_get_universal_checkpoint_ep_info`). So for local name j we write
t = the stack, over ep ranks r, of global expert r * num_local + j (the expert files' numbering)
with E = ep_size: every ep rank's engine takes its own expert j from the same file. The output is
therefore bound to the run's ep size (its expert-data-parallel size, and so the world size, may
change): at another ep size the local names mean other experts. Expert param groups keep their
names (`ep_size_N`) and moments in optimizer_state.pt, as the loader zips them with the engine's.
"""

from __future__ import annotations

from collections import defaultdict

from zinspect.core.fmt import shown
from zinspect.core.layouts.moe_names import EXPERT_ID, ep_size
from zinspect.core.model import Checkpoint, Param
from zinspect.core.reshard_zero import Sources
from zinspect.core.torchsave import OutFile
from zinspect.errors import NotMergeable

EP_NOTE = ("native MoE: the experts are stacked per local name for ep_size {ep}: load it with "
           "ep_size {ep} (any world size that ep_size divides); at another ep_size the local "
           "names stand for other experts")


def refuse_unloadable(ckpt: Checkpoint) -> None:
    """What no DeepSpeed engine would load right is refused, with DeepSpeed's reason."""
    where = shown(str(ckpt.path))
    frozen = [n for n, p in ckpt.params.items() if p.frozen and EXPERT_ID.search(n)]
    if frozen:
        raise NotMergeable(f"{where}: {shown(frozen[0], 80)} is a frozen expert param: zinspect does "
                           "not write frozen experts to a universal checkpoint (DeepSpeed's universal "
                           "load does not restore frozen params)", "unfreeze it, or use `zinspect "
                           "merge PATH OUT` for the weights")


def check_ep_sizes(src: Sources) -> None:
    """One ep size: DeepSpeed's loader slices every expert param by the largest one's ep rank."""
    groups = src.osd(0)["base_optimizer_state"].get("param_groups") or []
    sizes = {ep_size(g.get("name")) for g in groups if isinstance(g, dict)} - {None}
    if len(sizes) > 1:
        raise NotMergeable(f"{shown(str(src.ckpt.path))}: MoE layers with several ep sizes "
                           f"{sorted(sizes)} cannot be converted: DeepSpeed's universal loader slices "
                           "every expert param by the largest expert group's ep rank "
                           "(deepspeed/runtime/base_optimizer.py, _get_universal_checkpoint_ep_info)",
                           "give every MoE layer the same ep_size")


def expert_slots(ckpt: Checkpoint) -> dict[str, list[Param]]:
    """LOCAL expert param name -> the global expert params stacked under it, in ep rank order."""
    ep = ckpt.topology.ep
    by_slot: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)  # (prefix, leaf) -> id -> name
    for name in ckpt.params:
        m = EXPERT_ID.search(name)
        if m:
            by_slot[(name[:m.start(1)], name[m.end():])][int(m[1])] = name
    slots = {}
    for (prefix, leaf), experts in by_slot.items():
        n = len(experts)
        if sorted(experts) != list(range(n)) or n % ep:
            raise NotMergeable(f"{shown(str(ckpt.path))}: {shown(prefix + '*.' + leaf, 80)}: experts "
                               f"{sorted(experts)} are not 0..E-1 with E a multiple of ep_size {ep}",
                               "run `zinspect validate` for details")
        local = n // ep
        for j in range(local):
            slots[f"{prefix}{j}.{leaf}"] = [ckpt.params[experts[r * local + j]] for r in range(ep)]
    return slots


def stacked_file(src: Sources, rel: str, params: list[Param], state: str) -> OutFile:
    """{'param': the `state` tensors of `params` stacked on a new dim 0, 'cat_dim': 0,
    'is_expert_param': True, 'ep_num_experts': len(params)} (DeepSpeed's keys and order)."""
    out = OutFile(rel)
    ops: list = []
    dtype = None
    for p in params:
        frags = src.fragments(p.name, state)
        dtype = dtype or frags[0].dtype
        src.add_range(ops, frags, 0, p.numel, p.name)
    shape = (len(params), *params[0].shape)
    out.obj = {"param": out.tensor("float32", shape, ops, dtype), "cat_dim": 0,
               "is_expert_param": True, "ep_num_experts": len(params)}
    return out
