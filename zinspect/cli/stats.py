"""`zinspect stats`: per-tensor statistics of the values, streamed (numpy, lazily)."""

from __future__ import annotations

import math

from zinspect.cli.common import Bar, Stop, print_json

NAME = "stats"
SUMMARY = "per-param statistics of the values (min/max/mean/std/L2, NaN/Inf)"
DESCRIPTION = "Compute per-param statistics of a checkpoint's values, reading every byte once."
EPILOG = """\
For each param and buffer a merge would write (the fp32 masters of a ZeRO checkpoint): numel,
min, max, mean, std (population), L2 norm, max |x|, fraction of zeros, NaN and Inf counts.
min/max/mean/std are over the finite values. --moments adds Adam's exp_avg and exp_avg_sq of
each trainable param (as NAME:exp_avg, NAME:exp_avg_sq), read from the optimizer files.
Accumulation is float64; memory stays bounded.
PATH may also be a safetensors file or folder, or a torch .pt/.bin state dict.

examples:
  zinspect stats ./checkpoints
  zinspect stats ./merged/model.safetensors --json | jq '.params[] | select(.nan > 0)'

--json prints {"params": [{name, dtype, shape, numel, finite, min, max, mean, std, l2, max_abs,
zeros, zero_fraction, nan, inf}], "findings": [...]} (findings: nan-values / inf-values).

exit codes:
  0    computed (NaN/Inf are reported as warnings, not failures)
  2    PATH cannot be read, or bad usage
  130  cancelled with Ctrl-C
"""


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--moments", action="store_true",
                   help="also Adam's exp_avg / exp_avg_sq per param (NAME:exp_avg; any layout)")


def run(args) -> int:
    from zinspect.core.stats import compute_stats, nonfinite_findings

    src = opened(args.path, args.tag, moments=args.moments)
    total = sum(t.nbytes for t in src.tensors if t.tied_to is None)
    with Stop() as stop, Bar("stats", total) as bar:
        stats = compute_stats(src.tensors, progress=bar.update, should_stop=stop)
    findings = nonfinite_findings(stats)
    if args.json:
        print_json({"path": src.path, "kind": src.kind, "params": [s.to_json() for s in stats],
                    "findings": [f.to_json() for f in findings]})
        return 0
    _human(stats, findings)
    return 0


def opened(path, tag, moments: bool = False):
    """open_source, where a checkpoint whose values cannot be rebuilt (NotMergeable, exit 1
    for merge) is bad input: exit 2 (for diff, 1 means "different")."""
    from zinspect.core.sources import open_source
    from zinspect.errors import NotMergeable

    try:
        return open_source(path, tag, moments=moments)
    except NotMergeable as e:
        e.exit_code = 2
        raise


def _num(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.4g}"


def _human(stats, findings) -> None:
    from zinspect.core.fmt import shown

    width = min(48, max([len(shown(s.name, 48)) for s in stats] + [4]))
    cols = ("numel", "min", "max", "mean", "std", "l2", "max|x|", "zeros", "nan", "inf")
    print(f"{'name':<{width}} " + " ".join(f"{c:>10}" for c in cols))
    for s in stats:
        vals = (f"{s.numel:,}", _num(s.min), _num(s.max), _num(s.mean), _num(s.std), _num(s.l2),
                _num(s.max_abs), f"{s.zero_fraction:.1%}", f"{s.nan:,}", f"{s.inf:,}")
        print(f"{shown(s.name, 48):<{width}} " + " ".join(f"{v:>10}" for v in vals))
    for f in findings:
        print(f"warning {f.code}: {shown(f.message, 300)}\n  hint: {f.hint}")
