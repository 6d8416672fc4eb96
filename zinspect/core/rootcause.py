"""One root cause, one finding: the params a lost rank file leaves incomplete are its knock-ons.

A param-coverage / param-truncated finding whose missing elements all belong to ranks whose file
is unreadable, missing or truncated gets `cause` (that file's finding, as "code: where"), and the
file's finding lists the params it takes with it. The human output shows the file's finding only
(--verbose lists the knock-ons); --json keeps every finding, each knock-on with its `cause`."""

from __future__ import annotations

from dataclasses import replace

from zinspect.core.model import Checkpoint, Finding

#: the findings that say a rank file is lost or damaged (a root cause)
ROOTS = ("unreadable-file", "not-optimizer-file", "not-model-states", "truncated-file",
         "missing-optimizer-file", "missing-model-states-file")
KNOCK_ONS = ("param-coverage", "param-truncated")
_LISTED = 5  # params named in the root finding's message


def fold(ckpt: Checkpoint, ranks_of: dict[int, list[int]]) -> None:
    """Mark each knock-on of `ckpt.findings` with its cause; `ranks_of`: id(knock-on finding)
    -> the ranks whose files would hold the elements it misses."""
    roots = {"optim": _roots(ckpt, "optim"), "model": _roots(ckpt, "model")}
    lost: dict[int, list[str]] = {}  # id(root) -> params
    for f in ckpt.findings:
        ranks = ranks_of.get(id(f))
        p = ckpt.params.get(f.param or "")
        if f.code not in KNOCK_ONS or not ranks or p is None:
            continue
        # ZeRO-3 frozen params live in the model-states files, the others in optimizer files
        table = roots["model" if p.frozen and ckpt.stage == 3 else "optim"]
        if all(r in table for r in ranks):
            root = table[ranks[0]]
            f.cause = f"{root.code}: {root.where()}"
            lost.setdefault(id(root), []).append(f.param)
    for i, f in enumerate(ckpt.findings):
        names = lost.get(id(f))
        if names:
            more = f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else ""
            ckpt.findings[i] = replace(f, message=f"{f.message}; {len(names)} param(s) lose "
                                       f"elements with it: {', '.join(names[:_LISTED])}{more}")


def _roots(ckpt: Checkpoint, kind: str) -> dict[int, Finding]:
    """rank -> the first finding that says that rank's `kind` file is lost or damaged."""
    files = {f.name: f.rank for f in ckpt.files_of(kind) if f.rank is not None}
    missing = "missing-optimizer-file" if kind == "optim" else "missing-model-states-file"
    out: dict[int, Finding] = {}
    for f in ckpt.findings:
        if f.code not in ROOTS:
            continue
        if f.file in files:
            out.setdefault(files[f.file], f)
        elif f.code == missing and f.rank is not None:
            out.setdefault(f.rank, f)
    return out
