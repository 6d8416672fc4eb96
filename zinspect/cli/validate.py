"""`zinspect validate`: the findings of a checkpoint, from its metadata or (--deep) its bytes."""

from __future__ import annotations

from zinspect.cli.common import (
    Bar,
    Stop,
    cancelled,
    open_checkpoint,
    print_json,
    readable_at_all,
    unreadable,
)
from zinspect.report import human_validate, validate_json

NAME = "validate"
SUMMARY = "check a checkpoint for missing, stale or broken files"
DESCRIPTION = "Validate a checkpoint: list its findings by severity."
EPILOG = """\
Checks the checkpoint from its metadata: every rank file present and readable, no stale files
from another run, stage / world size / DeepSpeed version consistent, every element of every
param held by exactly one rank, tied and frozen params recoverable. Each finding says what is
wrong, where (file, rank, group, param) and what to do.

--deep also reads the bytes: every zip record's CRC, and NaN/Inf counts in the weights a merge
would write; it takes about as long as reading the files once.

examples:
  zinspect validate ./checkpoints
  zinspect validate ./checkpoints --json | jq '.findings[] | select(.severity=="error")'
  zinspect validate ./checkpoints && zinspect merge ./checkpoints ./merged

--json prints {"ok": bool, "counts": {"error": n, "warning": n, "info": n}, "findings": [...]}.

exit codes:
  0    no errors (warnings and info are allowed)
  1    errors: a merge would be wrong or incomplete
  2    PATH cannot be read as a checkpoint, or bad usage
  130  --deep cancelled with Ctrl-C
"""


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--deep", action="store_true",
                   help="also read the tensor bytes (CRC, NaN/Inf); slower")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list every finding (by default repeats of one code are folded)")


def run(args) -> int:
    ckpt = open_checkpoint(args)
    if not readable_at_all(ckpt):
        if args.json:
            print_json(validate_json(ckpt))
        return unreadable(ckpt)
    if args.deep:
        ckpt.findings.extend(_deep(ckpt))
    if args.json:
        print_json(validate_json(ckpt))
    else:
        human_validate(ckpt, verbose=args.verbose)
    return 1 if ckpt.errors else 0


def _deep(ckpt) -> list:
    from zinspect.core.deep import deep_check

    total = sum(f.size for f in ckpt.files if f.readable)
    with Stop() as stop, Bar("reading", total) as bar:
        found = deep_check(ckpt, progress=bar.update, should_stop=stop)
        if stop.requested:  # raised inside: Stop gives it 128 + the signal's number
            raise cancelled("the deep check")
    return list(found or [])
