"""`zinspect diff`: compare two checkpoints / safetensors / state dicts param by param."""

from __future__ import annotations

import math

from zinspect.cli.common import Bar, Stop, print_json

NAME = "diff"
SUMMARY = "compare two checkpoints or state dicts param by param"
DESCRIPTION = "Compare the tensors of PATH (A) and OTHER (B) by name, reading both once."
EPILOG = """\
A and B are each a ZeRO checkpoint (its fp32 masters), a safetensors file or folder, or a torch
.pt/.bin state dict. Reports names only in A or only in B, shape and dtype differences, and for
each param: bit-identical or not, max |a-b|, relative L2 change ||a-b||/||a||, how many elements
differ and where the first is; most changed first.

By default "equal" means bit-identical; --atol/--rtol allow |a-b| <= atol + rtol*|b|, and then
the values count, not their dtype (a bf16 output against its fp32 masters: --rtol 4e-3).
NaN/Inf on either side are warnings (nan-values / inf-values), as in stats and validate --deep.
--map-prefix OLD=NEW renames A's names first (repeatable), e.g. --map-prefix base_model.model.=
to compare a PEFT model with its base.

examples:
  zinspect diff ./checkpoints ./merged
  zinspect diff ./run1 ./run2 --rtol 1e-6 --json

exit codes:
  0    equal (within tolerance)
  1    different
  2    A or B cannot be read, or bad usage
  130  cancelled with Ctrl-C
"""


def add_arguments(p) -> None:
    p.add_argument("other", metavar="OTHER", help="B: what to compare PATH with")
    p.add_argument("--other-tag", metavar="TAG", help="tag dir of OTHER when it is a checkpoint")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0)")
    p.add_argument("--map-prefix", metavar="OLD=NEW", action="append",
                   help="rename A's names starting with OLD (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="list identical params too")


def run(args) -> int:
    from zinspect.cli.stats import opened
    from zinspect.core.diff import diff_tensors, parse_prefix_map
    from zinspect.errors import UsageError

    if not (math.isfinite(args.atol) and math.isfinite(args.rtol)) or args.atol < 0 or args.rtol < 0:
        raise UsageError("--atol and --rtol must be finite and >= 0", "e.g. --rtol 1e-6")
    prefix_map = parse_prefix_map(args.map_prefix)
    a, b = opened(args.path, args.tag), opened(args.other, args.other_tag)
    total = sum(t.nbytes for t in a.tensors + b.tensors)
    with Stop() as stop, Bar("diff", total) as bar:
        result = diff_tensors(a.tensors, b.tensors, prefix_map, args.atol, args.rtol,
                              progress=bar.update, should_stop=stop)
    if args.json:
        print_json({"a": a.path, "b": b.path, **result.to_json()})
    else:
        _human(result, args.verbose)
    return 0 if result.equal else 1


def _human(result, verbose: bool) -> None:
    from zinspect.core.diff import unravel
    from zinspect.core.fmt import shown

    for name in result.only_a:
        print(f"only in A: {shown(name, 120)}")
    for name in result.only_b:
        print(f"only in B: {shown(name, 120)}")
    same = 0
    for p in result.params:
        name = shown(p.name, 80)
        if not p.comparable:
            print(f"shape     {name}: {list(p.shape_a)} vs {list(p.shape_b)}")
            continue
        dt = f" ({p.dtype_a} vs {p.dtype_b})" if p.dtype_a != p.dtype_b else ""
        if p.identical or (p.within and not verbose and not dt):
            same += 1
            if verbose:
                print(f"identical {name}")
            continue
        where = f", first at {list(unravel(p.first_index, p.shape_b))}" \
            if p.first_index is not None else ""
        verdict = "within" if p.within else "differs"
        print(f"{verdict:<9} {name}{dt}: max|a-b| {p.max_abs:.4g}, rel L2 {p.rel_l2:.3g}, "
              f"{p.differing:,} element(s){where}")
    for f in result.findings():
        print(f"warning {f.code}: {shown(f.message, 300)}\n  hint: {f.hint}")
    print(f"{len(result.params)} matched, {same} equal, {len(result.only_a)} only in A, "
          f"{len(result.only_b)} only in B: {'EQUAL' if result.equal else 'DIFFERENT'}")
