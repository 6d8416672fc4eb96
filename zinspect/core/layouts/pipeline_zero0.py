"""Which layers a ZeRO-0 fp32 pipeline's stages hold, which params were frozen and which layers
were tied — for a checkpoint that names none of its params.

Such a pipeline saves no `param_shapes`: each stage's `mp_rank_SS` holds the torch optimizer's
state by position only. PipelineModule orders a stage's params as its tied modules first, then
its layers by index, and every optimizer group keeps that order (group_order.py). So stage s's
groups are matched against the next run of layer files — with, for a later stage, one earlier
layer's params put first (a TiedLayerSpec reused there through forward_fn, which writes no file
on that stage). Of the fits, the one with the fewest frozen params is taken (frozen params are
the exception; the values written are the same either way), and only when it is the only such
fit; the frozen params are known only when the shapes fit one way (a frozen norm weight beside
its trainable bias of equal shape does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zinspect.core.layouts.group_order import match_group_order
from zinspect.core.layouts.pickled import get
from zinspect.core.torchzip import TensorRef

Params = list[tuple[str, tuple[int, ...]]]


@dataclass
class StageMatch:
    stage_of: dict[int, int] = field(default_factory=dict)  # layer -> its stage
    frozen: list[str] | None = field(default_factory=list)  # None: not decidable by shapes
    tied: dict[int, list[int]] = field(default_factory=dict)  # layer -> later stages reusing it


def optimizer_group_shapes(optimizer) -> list[list[tuple]] | None:
    """A torch optimizer state dict's groups as their params' shapes (from each param's
    `exp_avg`, or its first non-scalar tensor); None when a param's shape is not there."""
    state = get(optimizer, "state")
    groups = get(optimizer, "param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list):
        return None
    out = []
    for g in groups:
        shapes = []
        for idx in get(g, "params", default=[]) or []:
            per = state.get(idx)
            t = next((v for k, v in per.items() if isinstance(v, TensorRef) and
                      (k == "exp_avg" or v.shape)), None) if isinstance(per, dict) else None
            if t is None:
                return None
            shapes.append(t.shape)
        out.append(shapes)
    return out


def match_stages(layers: dict[int, Params], stage_groups: list[list[list[tuple]] | None],
                 anchors: dict[int, int]) -> StageMatch | None:
    """`layers`: layer index -> its params (name, shape) in file order; `stage_groups[s]`:
    stage s's optimizer group shapes; `anchors`: layer -> stage known from the stage's
    buffer names. The one assignment that fits, or None."""
    order = sorted(layers)
    out = StageMatch()
    pos = 0
    for s, groups in enumerate(stage_groups):
        if groups is None:
            return None
        best = _stage_fit(layers, order, pos, groups, anchors, s, s == len(stage_groups) - 1)
        if best is None:
            return None
        end, tied, skipped = best
        out.stage_of.update({layer: s for layer in order[pos:end]})
        if skipped is None or out.frozen is None:
            out.frozen = None  # equal shapes: which of them was frozen cannot be told
        else:
            out.frozen.extend(n for n in skipped if tied is None or n not in dict(layers[tied]))
        if tied is not None:
            out.tied.setdefault(tied, []).append(s)
        pos = end
    return out if pos == len(order) else None


def _stage_fit(layers: dict[int, Params], order: list[int], pos: int, groups: list, anchors: dict,
               s: int, last: bool) -> tuple[int, int | None, list[str] | None] | None:
    """Stage s's (end, tied layer, frozen names or None when undecidable): of the runs of
    layers from `pos` (with or without an earlier layer tied in front) whose params fit the
    groups, the one with the fewest frozen params — tried fewest first, so a deep pipeline
    costs a few matches per stage, not one per run."""
    want = sum(map(len, groups))
    candidates = []
    count = 0
    for end in range(pos, len(order) + 1):
        if end > pos:
            count += len(layers[order[end - 1]])
        own = order[pos:end]
        if (last and end < len(order)) or any(anchors.get(layer, s) != s for layer in own) \
                or any(anchors.get(layer) == s for layer in order[end:]):
            continue
        for tied in [None, *order[:pos]]:
            n = count + (len(layers[tied]) if tied is not None else 0)
            if n >= want:
                candidates.append((n - want, end, tied))
    fits: list = []
    for frozen, end, tied in sorted(candidates, key=lambda c: c[0]):
        if fits and frozen > fits[0][0]:
            break
        params = (layers[tied] if tied is not None else []) + \
            [p for layer in order[pos:end] for p in layers[layer]]
        # a tied layer reused here shows as at least its first param in the groups
        fit = match_group_order(params, groups, required=1 if tied is not None else 0)
        if fit.problem in ("", "ambiguous"):
            fits.append((frozen, end, tied, None if fit.problem else fit.skipped))
    return fits[0][1:] if len(fits) == 1 else None
