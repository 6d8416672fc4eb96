"""`zinspect merge`: write the consolidated weights, streamed and atomic."""

from __future__ import annotations

import sys

from zinspect.cli.common import (
    Bar,
    Stop,
    cancelled,
    open_checkpoint,
    print_json,
    readable_at_all,
    unreadable,
)
from zinspect.report import ellipsis

NAME = "merge"
SUMMARY = "write the consolidated fp32 weights (safetensors or .pt)"
DESCRIPTION = "Merge the ZeRO partitions into full fp32 weights."
_EPILOG = """\
Rebuilds the full fp32 weights (params, tied aliases, buffers) from the ZeRO partitions and
writes them to OUT_DIR, as safetensors shards with an index (or torch .pt files). Only the
bytes the output needs are read (the fp32 partitions; the Adam moments only with --state all,
which writes them beside the weights as exp_avg/exp_avg_sq.safetensors). Tensor-parallel shards
are joined by their split (row-parallel rows interleaved in bounded blocks); replicated params
are written from tp rank 0 and the other ranks' copies compared (a difference is a warning,
an error with --strict). Files are written under temporary names and renamed into place at
the end, so a failed or cancelled merge leaves nothing behind.

examples:
  zinspect merge ./checkpoints ./merged
  zinspect merge ./checkpoints ./merged --format pt --max-shard-size 2GB
  zinspect merge ./checkpoints ./merged --exclude 'lora_*' --exclude-frozen
  zinspect merge ./checkpoints ./merged --selection picked.json    (saved from the app)
  zinspect merge ./broken ./rescued --salvage                      (drop what cannot be rebuilt)
  zinspect merge ./checkpoints ./merged --state all                (+ Adam exp_avg, exp_avg_sq)

formats (--format):
{formats}

exit codes:
  0    merged
  1    the checkpoint cannot be merged correctly (run `zinspect validate`), or --salvage dropped
       params (they are listed)
  2    PATH is not a checkpoint, OUT_DIR is unusable (exists: use --force), or bad usage
  130  cancelled with Ctrl-C; nothing was written
"""


def __getattr__(name: str) -> str:
    """EPILOG lists the registered writers (zinspect.core.writers.WRITERS)."""
    if name == "EPILOG":
        from zinspect.core.writers import formats_help

        return _EPILOG.format(formats=formats_help())
    raise AttributeError(name)


def add_arguments(p) -> None:
    from zinspect.core.states import CHOICES  # the app's merge form reads them too
    from zinspect.core.writers import WRITERS

    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create with the output")
    p.add_argument("--format", dest="fmt", choices=list(WRITERS), default=next(iter(WRITERS)),
                   help=f"output format (default: {next(iter(WRITERS))}; listed below)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output file, e.g. 5GB, 500MB, 2GiB; 0 for a single file "
                        "(default: 5GB)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out params/buffers whose name matches GLOB (repeatable)")
    p.add_argument("--exclude-frozen", action="store_true", help="leave out all frozen params")
    p.add_argument("--selection", metavar="FILE",
                   help="a selection JSON file saved from the app (its exclusions are added)")
    p.add_argument("--force", action="store_true",
                   help="write into OUT_DIR even if it is not empty (same-named files are "
                        "replaced, others are left as they are)")
    p.add_argument("--salvage", action="store_true",
                   help="merge what can be rebuilt and drop (and list) the params that cannot")
    p.add_argument("--strict", action="store_true",
                   help="treat every warning (validation warnings, NaN/Inf in what is written) "
                        "as an error: exit 1, nothing written")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="float output dtype, rounded to nearest even from the fp32 masters as "
                        "torch's .to() does; int buffers keep theirs (default: fp32)")
    p.add_argument("--peft", action="store_true",
                   help="a PEFT (LoRA) run: write only the adapter (adapter_model.safetensors + "
                        "adapter_config.json) for PeftModel.from_pretrained")
    p.add_argument("--no-hf-files", dest="hf_files", action="store_false",
                   help="do not copy config.json, generation_config.json and tokenizer files "
                        "from the checkpoint root into OUT_DIR")
    p.add_argument("--state", choices=CHOICES, default=CHOICES[0],
                   help="all: also write the optimizer's Adam moments beside the weights "
                        "(exp_avg.safetensors, exp_avg_sq.safetensors: the weights' names, fp32; "
                        "optimizer_state.json: step and hyper-parameters) (default: weights)")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the result")


def run(args) -> int:
    import warnings

    from zinspect.core import hf
    from zinspect.core.dtypes import output_dtype
    from zinspect.core.merge import merge, parse_size, plan_merge
    from zinspect.core.selection import Selection
    from zinspect.core.states import plan_states
    from zinspect.errors import UsageError

    # torch (pt output, fp16 upcasts) warns at import when numpy is absent; it needs none here
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

    from zinspect.core.writers import writer

    shard = shard_size(args.max_shard_size, parse_size)
    # a dtype it cannot write or a missing dependency, said before opening the checkpoint
    writer(args.fmt).check(output_dtype(args.dtype))
    tree = writer(args.fmt).tree is not None  # universal: writes the moments and every param
    sel = Selection.load(args.selection) if args.selection else Selection()
    sel.exclude_globs = list(sel.exclude_globs) + list(args.exclude)
    sel.exclude_frozen = sel.exclude_frozen or args.exclude_frozen
    ckpt = open_checkpoint(args)
    if not readable_at_all(ckpt):
        return unreadable(ckpt)
    sel.check_matches(ckpt)
    plan = plan_merge(ckpt, sel, salvage=args.salvage, dtype=output_dtype(args.dtype))
    output = hf.prepare(ckpt, plan, peft=args.peft, copy_files=args.hf_files)
    if args.state == "all" and not tree:
        if args.peft:
            raise UsageError("--state all writes the whole model's optimizer state, not an "
                             "adapter's", "leave out --peft or --state all")
        output.states = plan_states(ckpt, output.plan, salvage=args.salvage)
    plan = output.plan
    with Stop() as stop, Bar("merging", plan.total_bytes) as bar:
        try:
            result = merge(ckpt, args.out_dir, selection=sel, fmt=args.fmt, max_shard_size=shard,
                           force=args.force, salvage=args.salvage, strict=args.strict,
                           progress=bar.update,
                           should_stop=stop, plan=plan, output=output, dtype=args.dtype,
                           ready=lambda: _announce(ckpt, plan, args, shard, output),
                           notice=lambda text: print(f"zinspect: {text}", file=sys.stderr))
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the merge's checks
            raise cancelled("the merge") from None
    dropped = dict(getattr(result, "dropped", None) or {})
    if args.json:
        print_json(result.to_json())
    _report_merge(result, dropped)
    if tree:  # what the output format does not carry (the announce said the merge's notes)
        for note in result.notes:
            print(f"zinspect: note: {note}", file=sys.stderr)
    _report_verification(result, {**plan.dropped, **(output.states.dropped if output.states else {})})
    return 1 if dropped else 0


def shard_size(text: str, parse_size) -> int | None:
    """--max-shard-size: None for one file ('0', 'none', ...); parse_size raises UsageError."""
    if text.strip().lower() in ("0", "none", "no", "off", ""):
        return None
    return parse_size(text)


def _announce(ckpt, plan, args, shard, output) -> None:
    from zinspect.core import fmt
    from zinspect.core.writers import writer

    names = [t.name for t in plan.tensors]
    buffers = sum(1 for n in names if n in ckpt.buffers)
    params = len(names) - buffers  # a PEFT adapter's names are PEFT's, not the checkpoint's
    err = sys.stderr
    print(f"zinspect: writing {fmt.count(params)} params and {buffers} buffers "
          f"({fmt.size(plan.total_bytes)}) to {fmt.shown(args.out_dir)} as {args.fmt} "
          f"{args.dtype}"
          + (" with the optimizer state" if writer(args.fmt).tree else
             f", shards of at most {args.max_shard_size}" if shard else ", one file"), file=err)
    if output.states is not None:
        print(f"  and the optimizer's {' and '.join(output.states.tensors)} of "
              f"{fmt.count(len(next(iter(output.states.tensors.values()), [])))} params "
              f"({fmt.size(output.states.total_bytes)}, fp32)", file=err)
        for name, why in list(output.states.dropped.items())[:20]:
            print(f"    --salvage drops {fmt.shown(name)}: {fmt.shown(why, 300)}", file=err)
    for note in () if writer(args.fmt).tree else output.notes:  # a tree's come with its result
        print(f"  {fmt.shown(note, 400)}", file=err)
    if plan.excluded:
        print(f"  excluded by the selection: {len(plan.excluded)} "
              f"({ellipsis([fmt.shown(n, 80) for n in sorted(plan.excluded)], 5)})", file=err)
    if plan.dropped:
        print(f"  --salvage drops {len(plan.dropped)} that cannot be rebuilt:", file=err)
        for name, why in list(plan.dropped.items())[:20]:
            print(f"    {fmt.shown(name)}: {fmt.shown(why, 300)}", file=err)
        if len(plan.dropped) > 20:
            print(f"    ... and {len(plan.dropped) - 20} more", file=err)
    err.flush()


def _report_merge(result, dropped: dict) -> None:
    from zinspect.core import fmt

    err = sys.stderr
    print(f"zinspect: wrote {fmt.count(result.tensors)} tensors, {fmt.size(result.bytes)} in "
          f"{len(result.files)} file(s) to {fmt.shown(result.out_dir)} in "
          f"{fmt.duration(result.seconds)}",
          file=err)
    if dropped:
        print(f"zinspect: the output lacks the {len(dropped)} tensor(s) --salvage dropped "
              f"(listed above): {ellipsis([fmt.shown(n, 80) for n in dropped], 5)}", file=err)


def _report_verification(result, announced: dict) -> None:
    """What the stream found: params --salvage dropped for a failed CRC (after the announce),
    NaN/Inf written (a warning naming the params), records not read whole (not CRC-checked)."""
    from zinspect.core import fmt

    err = sys.stderr
    late = {n: why for n, why in result.dropped.items() if n not in announced}
    for name, why in list(late.items())[:20]:
        print(f"zinspect: dropped {fmt.shown(name)}: {fmt.shown(why, 300)}", file=err)
    for line in result.warnings[:20]:
        print(f"zinspect: warning: {fmt.shown(line, 300)}", file=err)
    if len(result.warnings) > 20:
        print(f"zinspect: warning: ... and {len(result.warnings) - 20} more with NaN/Inf/overflow",
              file=err)
    if result.unverified:
        print(f"zinspect: {len(result.unverified)} record(s) were read only in part, so not "
              f"CRC-checked: {ellipsis([fmt.shown(r, 120) for r in result.unverified], 3)}",
              file=err)
