"""Files of one checkpoint come from one save: what each file says about its save (a step, a
world size) is compared with what most files say, and an outlier is located."""

from __future__ import annotations

from collections import Counter

from zinspect.core.layouts.base import LoadContext
from zinspect.core.model import RankFile

OTHER_SAVE = "it comes from another save; restore the file saved with the others"


def outliers(ctx: LoadContext, facts: list[tuple[RankFile, object]], what: str) -> None:
    """`step-mismatch` for each file whose `what` (a step) is not the one most files have."""
    values = Counter(v for _, v in facts if isinstance(v, (int, float)))
    if len(values) < 2:
        return
    usual = values.most_common(1)[0][0]
    for rf, v in facts:
        if isinstance(v, (int, float)) and v != usual:
            ctx.find("step-mismatch", f"{rf.name} was saved at {what} {v:g}, the other files at "
                     f"{usual:g}", OTHER_SAVE, file=rf.name, rank=rf.rank)
