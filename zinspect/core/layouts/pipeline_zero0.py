"""ZeRO-0 pipelines without optimizer files (fp32, or fp16 with FP16_UnfusedOptimizer): which
layers each stage holds, which params were frozen, which layer was tied and — in 16-bit
training — which of the stage's `fp32_groups` masters is which param. The checkpoint names none
of its params.

Such a pipeline saves no `param_shapes`: each stage's `mp_rank_SS` holds its optimizer's state
by position only (the torch optimizer's, plus `fp32_groups` in 16-bit training). PipelineModule
orders a stage's params as its tied modules first, then its layers by index, and every
optimizer group keeps that order (group_order.py). So stage s's groups are matched against the
next run of layer files — with, for a later stage, one earlier layer's params put first (a
TiedLayerSpec reused there through forward_fn, which writes no file on that stage). Of the fits,
the one with the fewest frozen params is taken (frozen params are the exception), and only when
it is the only such fit. Which params were frozen — and in 16-bit training which master is which
param — is known only when the shapes fit one way (a frozen norm weight beside its trainable
bias of equal shape does not): then fp32 training writes the layer weights (its masters) and
says what it cannot tell, 16-bit training is refused.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from zinspect.core.layouts import zero0
from zinspect.core.layouts.group_order import match_group_order, saved_group_shapes
from zinspect.core.layouts.pickled import get, located

Params = list[tuple[str, tuple[int, ...]]]


@dataclass
class StageMatch:
    stage_of: dict[int, int] = field(default_factory=dict)  # layer -> its stage
    frozen: list[str] | None = field(default_factory=list)  # None: not decidable by shapes
    tied: dict[int, list[int]] = field(default_factory=dict)  # layer -> later stages reusing it


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


def describe(pipe) -> None:
    """Frozen flags, tie warnings and the fp32 masters of a `pipeline._Pipeline` whose stages
    hold their optimizer state in `mp_rank_SS` (no optimizer files). fp32 training: the layer
    files' weights are the masters. 16-bit: each stage's fp32_groups, matched to its params; a
    16-bit param whose master cannot be matched gets none (the merge refuses it), never its
    16-bit weight as if it were the master."""
    c, ctx = pipe.c, pipe.ctx
    layers: dict[int, Params] = defaultdict(list)
    for name, (layer, _) in pipe.names.items():
        if name in c.params:
            layers[layer].append((name, c.params[name].shape))
    opts = {s: pipe.stage_state(s).get("optimizer") for s in pipe.stages}
    anchors = {pipe.names[b][0]: s for s in pipe.stages for b in
               _names(pipe.stage_state(s).get("buffer_names")) if b in pipe.names}
    found = None if len(pipe.stages) != pipe.pp else match_stages(
        dict(layers), [saved_group_shapes(opts[s]) for s in pipe.stages], anchors)
    sixteen = any(p.dtype != "float32" for p in c.params.values())
    if found is None and sixteen:
        ctx.find("zero0-order-unknown", "this ZeRO-0 pipeline names no params and its stages' "
                 "fp32_groups fit its layer files in no single way: no fp32 master can be "
                 "matched to its param", "load the checkpoint with DeepSpeed and the model")
    elif found is None or found.frozen is None:
        ctx.find("pipeline-stages-unknown", "this ZeRO-0 pipeline names no params and its "
                 "stages' optimizer states fit its layer files in more than one way: which "
                 "params were frozen is unknown (all are shown as trainable)",
                 "the fp32 values written are the layer files' either way")
    if found is not None:
        for name in found.frozen or ():
            c.params[name].frozen = True
        _say_ties(pipe, layers, found)
        _attach_masters(pipe, layers, found, opts, sixteen)
    for name, p in c.params.items():
        if name in pipe.names and not p.fragments and (p.frozen or p.dtype == "float32"):
            pipe.layer_fragment(name, "master" if p.dtype == "float32" and not p.frozen
                                else "module")


def _attach_masters(pipe, layers: dict[int, Params], found: StageMatch, opts: dict,
                    sixteen: bool) -> None:
    """Stage s's fp32_groups[g][i] -> its param (a tied layer's params first on a stage that
    reuses it: those are the param's copies); at fp32 no fp32_groups (the layer files' weights
    are the masters). Either way each param's per-param optimizer state at that position of the
    stage that owns its layer."""
    c = pipe.c
    reused = {s: layer for layer, stages in found.tied.items() for s in stages}
    for s in pipe.stages:
        own = [layer for layer in sorted(layers) if found.stage_of.get(layer) == s]
        tied = reused.get(s)
        params = (layers[tied] if tied is not None else []) + \
            [p for layer in own for p in layers[layer]]
        masters = get(opts[s], "fp32_groups")
        fit = match_group_order(params, saved_group_shapes(opts[s]) or [],
                                required=1 if tied is not None else 0)
        rf = pipe.stage_files[s]
        if fit.problem and sixteen:
            pipe.ctx.find("zero0-order-unknown", f"stage {s}'s fp32_groups fit its params in "
                          "more than one way (params of equal shapes): its fp32 masters cannot "
                          "be matched to their names", "load the checkpoint with DeepSpeed and "
                          "the model", file=rf.name)
        if fit.problem:
            continue
        tf = pipe.ctx.torch_file(rf)
        for g, members in enumerate(fit.groups if sixteen else ()):
            for i, name in enumerate(members):
                t, p = masters[g][i], c.params[name]
                fragment = located(tf, rf.name, 0, t).fragment(g, 0, 0, min(t.numel, p.numel))
                if p.fragments:
                    p.copies[s] = [fragment]
                else:
                    p.fragments, p.group, p.sub_group = [fragment], g, g
        owned = {n for layer in own for n, _ in layers[layer]}
        zero0.attach_param_states(pipe.ctx, tf, rf.name, get(opts[s], "optimizer_state_dict")
                                  if sixteen else opts[s],
                                  [[n if n in owned else None for n in g] for g in fit.groups],
                                  {n: c.params[n].numel for g in fit.groups for n in g})


def _say_ties(pipe, layers: dict[int, Params], found: StageMatch) -> None:
    for layer, stages in sorted(found.tied.items()):
        names = [n for n, _ in layers[layer]]
        pipe.ctx.find("pipeline-tied-unnamed", f"layer {layer} is tied (its params are also "
                      f"used by stage(s) {', '.join(map(str, stages))}): PipelineModule names "
                      "them tied_modules.<key>.*, but a ZeRO-0 checkpoint records no key, so they "
                      f"are named {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}",
                      "rename them when loading into the PipelineModule (e.g. tied_modules.embed."
                      "weight); the values are right", file=pipe.layers[layer].name,
                      param=names[0] if names else None)


def _names(value) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
