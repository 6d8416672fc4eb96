"""How native DeepSpeed MoE names its expert params and expert param groups: the one place the
MoE layouts (moe, moe_zero0), the reshard (reshard_slices) and the universal writer
(universal_moe) read them from."""

from __future__ import annotations

import re

#: the part of an expert param's name before its expert id (`layers.0.moe` + EXPERTS + `3.fc1.weight`)
EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."
#: an expert param name's expert id (group 1): local in an engine's names, global in the files'
EXPERT_ID = re.compile(re.escape(EXPERTS) + r"(\d+)\.")
_EP_GROUP = re.compile(r"^ep_size_(\d+)$")


def ep_size(group_name: object) -> int | None:
    """The ep size an expert param group's name says (`ep_size_2` -> 2); None for another name."""
    m = _EP_GROUP.match(str(group_name))
    return int(m[1]) if m else None


def with_expert(name: str, expert: int) -> str:
    """An expert param name with another expert id."""
    m = EXPERT_ID.search(name)
    return f"{name[:m.start(1)]}{expert}{name[m.end(1):]}"


def global_name(name: str, ep_rank: int, num_local: int) -> str:
    """A local expert param name of `ep_rank` under its global expert id."""
    m = EXPERT_ID.search(name)
    return name if m is None else with_expert(name, ep_rank * num_local + int(m[1]))
