"""Which param is which entry of an optimizer's param groups, when the files record no names.

ZeRO-0 (FP16_UnfusedOptimizer's `fp32_groups`, a plain torch optimizer's `state`) and ZeRO-0
pipelines save their optimizer state by position only: group g's i-th tensor is the i-th param
the client put in group g. Clients build their groups by walking the model in order and sending
each param to one group (decay / no decay ...) or to none (frozen), so every group is a
subsequence of the model's params in module order. Given the params (name, shape) in module
order and each group's shapes in order, this finds the assignment — and says when the shapes
allow more than one, because then which master belongs to which name cannot be known from the
files, and guessing would write wrong weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zinspect.core.layouts.pickled import get
from zinspect.core.torchzip import TensorRef

#: frontier states kept per param, and explored in all, before giving up (an adversarial file
#: must not hang us; real models keep a handful per param)
MAX_STATES = 20_000
MAX_WORK = 2_000_000


@dataclass
class GroupOrder:
    """groups[g][i]: the name of group g's i-th entry; `skipped`: params in no group (frozen)."""

    groups: list[list[str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: why no assignment is given: "none" (the shapes fit no assignment), "ambiguous" (more than
    #: one fits), "too-complex"; "" when `groups` holds the one assignment
    problem: str = ""


def match_group_order(params: list[tuple[str, tuple]], groups: list[list[tuple]],
                      required: int = 0) -> GroupOrder:
    """Assign each group entry (by shape; an entry of shape None fits any param) to a distinct
    param so that each group keeps module order; the params left over are the frozen ones (never
    one of the first `required`). Exactly one assignment or a problem."""
    n, k = len(params), len(groups)
    lengths = tuple(len(g) for g in groups)
    skips = n - sum(lengths)
    if skips < 0:
        return GroupOrder(problem="none")
    # frontier: pointers per group -> (ways capped at 2, back link); step i consumes params[i]
    frontier: dict[tuple, tuple[int, object]] = {(0,) * k: (1, None)}
    work = 0
    for i, (_, shape) in enumerate(params):
        nxt: dict[tuple, tuple[int, object]] = {}
        for ptrs, (ways, link) in frontier.items():
            if i >= required and i - sum(ptrs) < skips:  # params[i] is frozen
                _add(nxt, ptrs, ways, (link, i, None))
            for g in range(k):
                want = groups[g][ptrs[g]] if ptrs[g] < lengths[g] else ()
                if ptrs[g] < lengths[g] and (want is None or tuple(want) == tuple(shape)):
                    moved = ptrs[:g] + (ptrs[g] + 1,) + ptrs[g + 1:]
                    _add(nxt, moved, ways, (link, i, g))
        work += len(nxt)
        if len(nxt) > MAX_STATES or work > MAX_WORK:
            return GroupOrder(problem="too-complex")
        frontier = nxt
    done = frontier.get(lengths)
    if done is None:
        return GroupOrder(problem="none")
    ways, link = done
    if ways > 1:
        return GroupOrder(problem="ambiguous")
    out = GroupOrder(groups=[[] for _ in groups])
    steps = []
    while link is not None:
        link, i, g = link
        steps.append((i, g))
    for i, g in reversed(steps):
        (out.skipped if g is None else out.groups[g]).append(params[i][0])
    return out


def _add(frontier: dict, ptrs: tuple, ways: int, link) -> None:
    had = frontier.get(ptrs)
    if had is None:
        frontier[ptrs] = (ways, link)
    else:  # two paths reach the same state: two different assignments
        frontier[ptrs] = (min(2, had[0] + ways), had[1])


def saved_group_shapes(optimizer) -> list[list[tuple]] | None:
    """The shapes of a ZeRO-0 optimizer's groups, in order: FP16_UnfusedOptimizer's
    `fp32_groups` (16-bit training), else the torch optimizer's own state dict (each param's
    `exp_avg`, or its first non-scalar tensor; a param the optimizer never stepped, e.g. a
    frozen one the client put in a group, has no state: its shape is None, any). None when a
    shape is not in the file, or no entry has one."""
    masters = get(optimizer, "fp32_groups")
    if isinstance(masters, list):
        if not all(isinstance(g, list) and all(isinstance(t, TensorRef) for t in g)
                   for g in masters):
            return None
        return [[t.shape for t in g] for g in masters]
    state, groups = get(optimizer, "state"), get(optimizer, "param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list):
        return None
    out = []
    for g in groups:
        shapes = []
        for idx in get(g, "params", default=[]) or []:
            per = state.get(idx) if isinstance(idx, int) else {}
            t = next((v for k, v in per.items() if isinstance(v, TensorRef) and
                      (k == "exp_avg" or v.shape)), None) if isinstance(per, dict) else None
            if t is None and per is not None:
                return None
            shapes.append(None if t is None else t.shape)
        out.append(shapes)
    return out if any(s is not None for g in out for s in g) else None
