"""Files of one checkpoint come from one save: what each file says about its save (a step, a
ZeRO stage) is compared with what most files say, and an outlier is located. The one rule for
validate (plain ZeRO), the tensor-parallel checks and the pipeline and MoE layouts; and each
model-states file's data-parallel size (`dp_world_sizes`, the pipelines')."""

from __future__ import annotations

from collections import Counter

from zinspect.core.layouts import pickled
from zinspect.core.model import RankFile

_NAN = float("nan")
OTHER_SAVE = ("it comes from another save, and its values are not this checkpoint's; restore the "
              "file saved with the others")


def outliers(find, facts: list[tuple[RankFile, object]], what: str, code: str = "step-mismatch",
             usual: float | None = None) -> set[str]:
    """`code` for each file whose value is not `usual` (default: the value most files have);
    `what` says a value ("at optimizer step {}", "with ZeRO-{}"); `find(code, message, hint,
    **where)` is LoadContext.find or validate's. Returns the names of the files found."""
    facts = [(rf, _NAN if v != v else v) for rf, v in facts if isinstance(v, (int, float))]
    values = Counter(v for _, v in facts)  # every NaN one value (NaN != NaN: each its own)
    if usual is None:
        if len(values) < 2:
            return set()
        usual = values.most_common(1)[0][0]
    out = set()
    for rf, v in facts:
        if v is not usual and v != usual:
            find(code, f"{rf.name} was saved {what.format(_g(v))}, the other files "
                 f"{what.format(_g(usual))}",
                 OTHER_SAVE, file=rf.name, rank=rf.rank)
            out.add(rf.name)
    return out


def dp_world_sizes(find, states: list[tuple[RankFile, dict]], dp: int, source: str) -> None:
    """Each model-states file (file, its state) records the checkpoint's `dp` data-parallel
    ranks (read `source`, "as ..."): another size is a file of another save; a value that is no
    size (0, -2, True, a str) is a forged or damaged field, named as such."""
    for rf, state in states:
        said = state.get("dp_world_size")
        if said is not None and not pickled.size(said):
            find("world-size-mismatch", f"{rf.name}: its dp_world_size is {pickled.said(said)}, not a "
                 f"data-parallel size; the checkpoint is read with {dp} data-parallel "
                 f"rank{'s' if dp != 1 else ''}, {source}", "the field was altered or damaged: "
                 "restore this file from a copy of the run (the other files are read as saved; "
                 "`zinspect merge --salvage` writes what they hold)", file=rf.name)
        elif said is not None and said != dp:
            find("world-size-mismatch", f"{rf.name} was saved with {said} data-parallel ranks, "
                 f"the other stages with {dp}", OTHER_SAVE, file=rf.name)


def _g(value: float) -> str:
    """`value` as `:g` prints it (a pickled int has at most 127 bits: the readers refuse wider
    ones, so it always converts to a float)."""
    return f"{value:g}"
