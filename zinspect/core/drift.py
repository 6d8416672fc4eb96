"""Copies of one param that should hold the same values: a replicated tensor-parallel param on
every tp rank, a tied param on each pipeline stage using it. The merge plan lists them
(`OutputTensor.mirrors`: the copies it does not write, in the written copy's element order);
the merge compares them as it streams and `validate --deep` compares them as it reads. Both say
a difference here, in one wording and with one code per axis.
"""

from __future__ import annotations

from zinspect.core import codes
from zinspect.core.model import Finding
from zinspect.core.plan import MergePlan
from zinspect.core.weave import max_abs_diff

DRIFT_HINT = ("the tp ranks' copies of a replicated param should be identical: the run's tp "
              "ranks diverged (non-deterministic kernels?) or a rank file is from another save; "
              "the lowest tp rank's copy was written")


TIED_DRIFT_HINT = ("a tied param's copies on the pipeline stages should be identical: the stages "
                   "diverged or a stage's files are from another save; the lowest stage's copy "
                   "was written")

#: a mirror's axis -> (finding code, how the param is held, what `replica` numbers, hint)
DRIFT = {"tp": ("tp-replica-drift", "replicated on every tp rank", "tp rank(s)", DRIFT_HINT),
         "stage": ("tied-copy-drift", "tied, with a copy on each pipeline stage using it",
                   "pipeline stage(s)", TIED_DRIFT_HINT)}


def difference(copy, written, dtype: str) -> float | None:
    """How far the bytes of a copy are from the written copy's at the same places: None when
    they are the same bytes, else the largest |a - b| (inf where only one is NaN)."""
    return None if copy == written else max_abs_diff(copy, written, dtype)


def drift_warning(name: str, ranks: dict[int, float], axis: str = "tp") -> str:
    _, held, unit, _ = DRIFT[axis]
    return (f"{name}: {held}, but {unit} {', '.join(map(str, sorted(ranks)))}"
            f" differ from the copy written by up to {max(ranks.values()):.6g}")


def drift_finding(name: str, ranks: dict[int, float], axis: str = "tp") -> Finding:
    return codes.finding(DRIFT[axis][0], drift_warning(name, ranks, axis), DRIFT[axis][3],
                         param=name)


def drift_axes(plan: MergePlan) -> dict[str, str]:
    """What each compared tensor's copies are on: name -> "tp" or "stage"."""
    return {t.name: t.mirrors[0].axis for t in plan.tensors if t.mirrors}
