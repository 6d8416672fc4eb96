"""The `zinspect` command line: open the app, or `info`, `validate` and `merge` headless.

Every failure the core can name (`ZinspectError`) is caught here and printed as a message plus a
hint, with the error's exit code; argparse usage errors exit 2. Imports stay lazy: `info --json`
and `validate --json` import neither torch, textual nor rich, and the human output imports rich
only when it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from zinspect import __version__
from zinspect.errors import UsageError, ZinspectError

COMMANDS = ("info", "validate", "merge")

EXIT_CODES = """\
exit codes:
  0    success (validate: no errors; warnings and info are allowed)
  1    the checkpoint has errors (validate), cannot be merged correctly (merge),
       or `merge --salvage` had to drop params
  2    PATH cannot be read as a checkpoint, the output is unusable, or bad usage
  3    internal error in zinspect (a bug: please report it with the message)
  130  cancelled with Ctrl-C (merge leaves nothing behind)
"""

MAIN_EPILOG = f"""\
PATH is the directory DeepSpeed's save_checkpoint wrote (the one holding `latest`) or one of
its tag dirs (global_stepN/). Only the pickles and zip directories of the files are read, never
tensor bytes, so `info` and `validate` take well under a second whatever the checkpoint size.

examples:
  zinspect ./checkpoints                      browse the checkpoint in the terminal app
  zinspect ./checkpoints/global_step1000      the same, naming the tag dir
  zinspect info ./checkpoints --tag global_step500
  zinspect validate ./checkpoints --json
  zinspect merge ./checkpoints ./merged --exclude-frozen

`zinspect COMMAND --help` explains each command. A checkpoint dir literally named like a
command (info, validate, merge) is opened with `zinspect ./info`.

{EXIT_CODES}"""

INFO_EPILOG = """\
Shows where the checkpoint is (tag, other tags), how it was trained (ZeRO stage, world size,
dtypes, DeepSpeed version, layout), its params (trainable, frozen, tied) and sizes, the files
of each rank, the optimizer param groups, and how many findings validation has.

examples:
  zinspect info ./checkpoints
  zinspect info ./checkpoints/global_step1000 --json | jq '.params[] | .name'

--json prints one object: stage, world_size, dtype ("bf16", "fp16", "fp32"), master_dtype,
ds_version, tag, tags, layout, path, files, buffers, params (name, shape, numel, dtype, frozen,
tied_to, group), groups, findings, counts, totals. Tied params appear under both names.

exit codes:
  0    the checkpoint was found and read (even if it has errors: info shows what it could read)
  2    PATH is not a checkpoint, or no file in it can be read, or bad usage
"""

VALIDATE_EPILOG = """\
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

MERGE_EPILOG = """\
Rebuilds the full fp32 weights (params, tied aliases, buffers) from the ZeRO partitions and
writes them to OUT_DIR, as safetensors shards with an index (or torch .pt files). Only the
bytes the output needs are read (the fp32 partitions, not the optimizer moments). Shards are
written under temporary names and renamed into place at the end, so a failed or cancelled
merge leaves nothing behind.

examples:
  zinspect merge ./checkpoints ./merged
  zinspect merge ./checkpoints ./merged --format pt --max-shard-size 2GB
  zinspect merge ./checkpoints ./merged --exclude 'lora_*' --exclude-frozen
  zinspect merge ./checkpoints ./merged --selection picked.json    (saved from the app)
  zinspect merge ./broken ./rescued --salvage                      (drop what cannot be rebuilt)

exit codes:
  0    merged
  1    the checkpoint cannot be merged correctly (run `zinspect validate`), or --salvage dropped
       params (they are listed)
  2    PATH is not a checkpoint, OUT_DIR is unusable (exists: use --force), or bad usage
  130  cancelled with Ctrl-C; nothing was written
"""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def _add_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH",
                   help="the checkpoint dir (holding `latest`) or one of its tag dirs")
    p.add_argument("--tag", metavar="TAG",
                   help="tag dir to read instead of the one `latest` names (e.g. global_step500)")


def _command(sub, name: str, summary: str, description: str, epilog: str):
    p = sub.add_parser(name, prog=f"zinspect {name}", help=summary, description=description,
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_path(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zinspect",
        usage="zinspect PATH [--tag TAG]\n       zinspect {info,validate,merge} ... "
              "(see zinspect COMMAND --help)",
        description="Look inside DeepSpeed ZeRO checkpoints: browse, validate and merge them\n"
                    "to fp32, without DeepSpeed and without loading the tensors.",
        epilog=MAIN_EPILOG)
    parser.add_argument("--version", action="version", version=f"zinspect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    parser.commands = sub.choices  # name -> its parser, for errors in the command's own words

    p = _command(sub, "info", "summary of a checkpoint (--json for scripts)",
                 "Summarise a checkpoint from its metadata.", INFO_EPILOG)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")

    p = _command(sub, "validate", "check a checkpoint for missing, stale or broken files",
                 "Validate a checkpoint: list its findings by severity.", VALIDATE_EPILOG)
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--deep", action="store_true",
                   help="also read the tensor bytes (CRC, NaN/Inf); slower")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list every finding (by default repeats of one code are folded)")

    p = _command(sub, "merge", "write the consolidated fp32 weights (safetensors or .pt)",
                 "Merge the ZeRO partitions into full fp32 weights.", MERGE_EPILOG)
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create with the output")
    p.add_argument("--format", dest="fmt", choices=("safetensors", "pt"), default="safetensors",
                   help="output format (default: safetensors)")
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
    p.add_argument("--json", action="store_true", help="print a JSON summary of the result")
    return parser


def _open_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zinspect", usage="zinspect PATH [--tag TAG]",
                description="Open a checkpoint in the terminal app.", epilog=MAIN_EPILOG)
    _add_path(p)
    p.add_argument("--version", action="version", version=f"zinspect {__version__}")
    return p


# ---------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv:
            build_parser().print_help(sys.stderr)
            return 2
        opens_app = argv[0] not in COMMANDS and (
            not argv[0].startswith("-") or argv[0] == "--tag" or argv[0].startswith("--tag="))
        if not opens_app:
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            if extra:
                parser.commands.get(args.command, parser).error(
                    f"unrecognized arguments: {' '.join(extra)}")
        else:  # `zinspect PATH [--tag T]`
            args = _open_parser().parse_args(argv)
            args.command = None
        return _dispatch(args)
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    except ZinspectError as e:
        _print_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("zinspect: cancelled", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zinspect info --json | head`
        _silence_stdout()
        return 0
    except Exception as e:  # never a traceback; ZINSPECT_DEBUG=1 shows it
        if os.environ.get("ZINSPECT_DEBUG"):
            raise
        print(f"zinspect: internal error: {type(e).__name__}: {e}\n"
              "  hint: this is a bug in zinspect; rerun with ZINSPECT_DEBUG=1 for the "
              "traceback and report it", file=sys.stderr)
        return 3


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "info":
        return cmd_info(args)
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "merge":
        return cmd_merge(args)
    return cmd_open(args)


def _print_error(e: ZinspectError) -> None:
    print(f"zinspect: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"  hint: {e.hint}", file=sys.stderr)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _open(args):
    from zinspect.core import open_checkpoint

    return open_checkpoint(args.path, args.tag)


def _readable_at_all(ckpt) -> bool:
    """False when not one file of the tag dir could be parsed: nothing to show."""
    return any(f.readable for f in ckpt.files)


def _unreadable(ckpt) -> int:
    print(f"zinspect: {ckpt.path}: no file in it can be read as a checkpoint file", file=sys.stderr)
    print("  hint: every file is damaged or not a torch.save file; `zinspect info` lists them",
          file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------- open (app)
def cmd_open(args) -> int:
    from zinspect.core.discover import locate

    locate(args.path, args.tag)  # fail fast with exit 2 before starting the app
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            from zinspect.tui.app import run_app
        except ImportError as e:
            print(f"zinspect: the terminal app is not available ({e}); printing the summary",
                  file=sys.stderr)
        else:
            code = run_app(args.path, args.tag)
            return code if isinstance(code, int) else 0
    ckpt = _open(args)
    _human_info(ckpt)
    return 0 if _readable_at_all(ckpt) else 2


# ---------------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    ckpt = _open(args)
    if args.json:
        _print_json(info_json(ckpt))
    else:
        _human_info(ckpt)
    return 0 if _readable_at_all(ckpt) else 2


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str))
    sys.stdout.write("\n")
    sys.stdout.flush()


def _group_of(ckpt, p) -> int | None:
    """Optimizer param group of a param; a tied alias has its owner's, a frozen one none."""
    if p.tied_to is not None:
        owner = ckpt.params.get(p.tied_to)
        p = owner if owner is not None else p
    return None if p.frozen else p.group


def _totals(ckpt) -> dict:
    from zinspect.core.torchzip import DTYPE_SIZES

    params = list(ckpt.params.values())
    owners = ckpt.owners()
    trainable = [p for p in owners if not p.frozen]
    frozen = [p for p in owners if p.frozen]
    numel = sum(p.numel for p in owners)
    buf_bytes = sum(b.numel * DTYPE_SIZES.get(b.dtype, 0) for b in ckpt.buffers.values())
    return {
        "params": len(params),
        "trainable": len(trainable),
        "frozen": len(frozen),
        "tied": len(params) - len(owners),
        "buffers": len(ckpt.buffers),
        "numel": numel,
        "trainable_numel": sum(p.numel for p in trainable),
        "frozen_numel": sum(p.numel for p in frozen),
        "fp32_bytes": numel * 4,  # what a merge writes for the params
        "buffer_bytes": buf_bytes,
        "files": len(ckpt.files),
        "file_bytes": sum(f.size for f in ckpt.files),
    }


def info_json(ckpt) -> dict:
    from zinspect.core.model import short_dtype

    return {
        "path": str(ckpt.path),
        "root": str(ckpt.root) if ckpt.root else None,
        "tag": ckpt.tag,
        "tags": list(ckpt.tags),
        "stage": ckpt.stage,
        "world_size": ckpt.world_size,
        "layout": ckpt.layout,
        "dtype": short_dtype(ckpt.dtype) if ckpt.dtype else None,
        "master_dtype": short_dtype(ckpt.master_dtype) if ckpt.master_dtype else None,
        "ds_version": ckpt.ds_version,
        "files": [{"name": f.name, "kind": f.kind, "rank": f.rank, "mp_rank": f.mp_rank,
                   "prefix": f.prefix, "size": f.size, "format": f.format or None,
                   "error": f.error, "stage": f.stage, "ds_version": f.ds_version}
                  for f in _sorted_files(ckpt)],
        "buffers": [{"name": b.name, "shape": list(b.shape), "dtype": short_dtype(b.dtype)
                     if b.dtype else None} for b in ckpt.buffers.values()],
        "params": [{"name": p.name, "shape": list(p.shape), "numel": p.numel,
                    "dtype": short_dtype(p.dtype) if p.dtype else None, "frozen": p.frozen,
                    "tied_to": p.tied_to, "group": _group_of(ckpt, p),
                    "sub_group": p.sub_group if p.tied_to is None else None}
                   for p in ckpt.params.values()],
        "groups": [{"index": g.index, "param_group": g.param_group, "params": list(g.params),
                    "numel": g.numel, "dtype": short_dtype(g.dtype) if g.dtype else None,
                    "partition_numel": {str(r): n for r, n in sorted(g.partition_numel.items())},
                    "padding": {str(r): n for r, n in sorted(g.padding.items())}}
                   for g in ckpt.groups],
        "findings": [f.to_json() for f in ckpt.findings],
        "counts": ckpt.counts(),
        "totals": _totals(ckpt),
    }


_KIND_ORDER = {"model": 0, "optim": 1}


def _sorted_files(ckpt):
    """Model states first, then optimizer files, each by rank (a number, not its spelling)."""
    return sorted(ckpt.files, key=lambda f: (_KIND_ORDER.get(f.kind, 2), f.mp_rank or 0,
                                             -1 if f.rank is None else f.rank, f.name))


def _console(stderr: bool = False):
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con.width = 120  # piped or redirected: room for full file names
    return con


_SEV_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _counts_text(counts: dict) -> str:
    parts = []
    for sev in ("error", "warning", "info"):
        n = counts.get(sev, 0)
        word = sev if n == 1 else ("info" if sev == "info" else sev + "s")
        style = _SEV_STYLE[sev] if n else "dim"
        parts.append(f"[{style}]{n} {word}[/]")
    return ", ".join(parts)


def _human_info(ckpt) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from zinspect.core import fmt
    from zinspect.core.model import short_dtype

    con = _console()
    t = _totals(ckpt)
    other = [x for x in ckpt.tags if x != ckpt.tag]

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("path", escape(str(ckpt.path)))
    others = f"   [dim](other tags: {escape(_ellipsis(other, 6))})[/]" if other else ""
    summary.add_row("tag", escape(ckpt.tag) + others)
    summary.add_row("ZeRO stage", str(ckpt.stage) if ckpt.stage is not None else "?")
    summary.add_row("world size", str(ckpt.world_size) if ckpt.world_size else "?")
    summary.add_row("layout", escape(ckpt.layout))
    summary.add_row("dtype", f"{short_dtype(ckpt.dtype)} training, "
                             f"{short_dtype(ckpt.master_dtype)} masters")
    summary.add_row("DeepSpeed", escape(ckpt.ds_version or "?"))
    summary.add_row("params", f"{fmt.count(t['params'])} names: {fmt.count(t['trainable'])} "
                              f"trainable, {fmt.count(t['frozen'])} frozen, "
                              f"{fmt.count(t['tied'])} tied")
    summary.add_row("elements", f"{fmt.count(t['numel'])} ({fmt.short_count(t['numel'])}; "
                                f"{fmt.short_count(t['trainable_numel'])} trainable, "
                                f"{fmt.short_count(t['frozen_numel'])} frozen)")
    summary.add_row("fp32 size", f"{fmt.size(t['fp32_bytes'])} merged "
                                 f"(+ {t['buffers']} buffers, {fmt.size(t['buffer_bytes'])})")
    summary.add_row("on disk", f"{fmt.size(t['file_bytes'])} in {t['files']} files")
    summary.add_row("findings", _counts_text(ckpt.counts()))
    con.print(summary)

    files = Table(title="files", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, just in (("rank", "right"), ("kind", "left"), ("file", "left"),
                      ("size", "right"), ("status", "left")):
        files.add_column(col, justify=just)
    rows = _sorted_files(ckpt)
    for f in _fold(rows, 24, 8, 4):
        if f is None:
            files.add_row("", "", f"[dim]... {len(rows) - 12} more[/]", "", "")
            continue
        status = f"[red]{escape(f.error)}[/]" if f.error else (
            f"[dim]{f.format}[/]" if f.format else "[dim]-[/]")
        files.add_row("" if f.rank is None else str(f.rank), f.kind, escape(f.name),
                      fmt.size(f.size), status)
    con.print(files)

    if ckpt.groups:
        groups = Table(title="param groups", title_justify="left", box=box.SIMPLE_HEAD,
                       pad_edge=False)
        for col, just in (("group", "right"), ("opt group", "right"), ("params", "right"),
                          ("elements", "right"), ("master", "left"), ("per rank", "right"),
                          ("padding", "right")):
            groups.add_column(col, justify=just)
        for g in _fold(ckpt.groups, 16, 8, 4):
            if g is None:
                groups.add_row("", "", f"[dim]... {len(ckpt.groups) - 12} more[/]", "", "", "",
                               "")
                continue
            parts = list(g.partition_numel.values())
            per_rank = (fmt.count(parts[0]) if len(set(parts)) == 1 else
                        f"{fmt.count(min(parts))}..{fmt.count(max(parts))}") if parts else "-"
            groups.add_row(str(g.index), str(g.param_group), str(len(g.params)),
                           fmt.count(g.numel), short_dtype(g.dtype), per_rank,
                           fmt.count(sum(g.padding.values())))
        con.print(groups)
    if ckpt.errors:
        con.print(f"[bold red]{len(ckpt.errors)} error(s)[/]: run [bold]zinspect validate "
                  f"{escape(_quote(str(ckpt.path)))}[/] for what is wrong and what to do")


def _fold(items: list, limit: int, head: int, tail: int) -> list:
    """All of `items` when short, else the first and last few around a None marker."""
    items = list(items)
    if len(items) <= limit:
        return items
    return items[:head] + [None] + items[-tail:]


def _ellipsis(names: list[str], n: int) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(path)


# ---------------------------------------------------------------------------------- validate
def cmd_validate(args) -> int:
    ckpt = _open(args)
    if not _readable_at_all(ckpt):
        if args.json:
            _print_json(_validate_json(ckpt))
        return _unreadable(ckpt)
    if args.deep:
        ckpt.findings.extend(_deep(ckpt, quiet=False))
    if args.json:
        _print_json(_validate_json(ckpt))
    else:
        _human_validate(ckpt, verbose=args.verbose)
    return 1 if ckpt.errors else 0


def _validate_json(ckpt) -> dict:
    return {"ok": not ckpt.errors, "path": str(ckpt.path), "tag": ckpt.tag,
            "counts": ckpt.counts(), "findings": [f.to_json() for f in ckpt.findings]}


def _deep(ckpt, quiet: bool) -> list:
    try:
        from zinspect.core.deep import deep_check
    except ImportError:
        raise UsageError("--deep is not available yet",
                         "run without --deep; the metadata checks still apply") from None
    total = sum(f.size for f in ckpt.files if f.readable)
    with _Stop() as stop, _Bar("reading", total) as bar:
        found = deep_check(ckpt, progress=bar.update, should_stop=stop)
    if stop.requested:
        raise _cancelled("the deep check")
    return list(found or [])


def _human_validate(ckpt, verbose: bool = False) -> None:
    from rich.markup import escape

    con = _console()
    con.print(f"[bold]{escape(str(ckpt.path))}[/]  (tag {escape(ckpt.tag)}, ZeRO-{ckpt.stage}, "
              f"world size {ckpt.world_size})")
    for sev in ("error", "warning", "info"):
        items = [f for f in ckpt.findings if f.severity == sev]
        if not items:
            continue
        con.print()
        word = sev if len(items) == 1 or sev == "info" else sev + "s"
        con.print(f"[{_SEV_STYLE[sev]}]{len(items)} {word}[/]")
        by_code: dict[str, list] = {}
        for f in items:
            by_code.setdefault(f.code, []).append(f)
        for code, group in by_code.items():
            shown = group if verbose or len(group) <= 5 else group[:3]
            for f in shown:
                con.print(f"  [{_SEV_STYLE[sev]}]{escape(f.code)}[/]  {escape(f.message)}")
                where = f.where()
                if where:
                    con.print(f"      [dim]where:[/] {escape(where)}")
                if f.hint:
                    con.print(f"      [dim]hint:[/]  {escape(f.hint)}")
            if len(shown) < len(group):
                con.print(f"  [dim]... and {len(group) - len(shown)} more {escape(code)} "
                          f"(--verbose or --json lists them all)[/]")
    con.print()
    if ckpt.errors:
        con.print(f"[bold red]not mergeable as is[/]: {_counts_text(ckpt.counts())}")
    else:
        con.print(f"[bold green]ok[/]: {_counts_text(ckpt.counts())}")


# ---------------------------------------------------------------------------------- merge
def cmd_merge(args) -> int:
    import warnings

    from zinspect.core.merge import merge, parse_size, plan_merge
    from zinspect.core.selection import Selection

    # torch (pt output, fp16 upcasts) warns at import when numpy is absent; it needs none here
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

    shard = _shard_size(args.max_shard_size, parse_size)
    sel = Selection.load(args.selection) if args.selection else Selection()
    sel.exclude_globs = list(sel.exclude_globs) + list(args.exclude)
    sel.exclude_frozen = sel.exclude_frozen or args.exclude_frozen
    ckpt = _open(args)
    if not _readable_at_all(ckpt):
        return _unreadable(ckpt)
    plan = plan_merge(ckpt, sel, salvage=args.salvage)
    _announce(ckpt, plan, args, shard)
    with _Stop() as stop, _Bar("merging", plan.total_bytes) as bar:
        try:
            result = merge(ckpt, args.out_dir, selection=sel, fmt=args.fmt, max_shard_size=shard,
                           force=args.force, salvage=args.salvage, progress=bar.update,
                           should_stop=stop, plan=plan)
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the merge's checks
            raise _cancelled("the merge") from None
    dropped = dict(getattr(result, "dropped", None) or {})
    if args.json:
        _print_json(result.to_json())
    _report_merge(result, dropped)
    return 1 if dropped else 0


def _shard_size(text: str, parse_size) -> int | None:
    if text.strip().lower() in ("0", "none", "no", "off", ""):
        return None
    try:
        n = parse_size(text)
    except ZinspectError:
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(f"--max-shard-size {text!r}: not a size ({e})",
                         "write it like 5GB, 500MB or 2GiB") from e
    return n or None


def _announce(ckpt, plan, args, shard) -> None:
    from zinspect.core import fmt

    names = [t.name for t in plan.tensors]
    params = sum(1 for n in names if n in ckpt.params)
    buffers = sum(1 for n in names if n in ckpt.buffers)
    err = sys.stderr
    print(f"zinspect: writing {fmt.count(params)} params and {buffers} buffers "
          f"({fmt.size(plan.total_bytes)}) to {args.out_dir} as {args.fmt}"
          + (f", shards of at most {args.max_shard_size}" if shard else ", one file"), file=err)
    if plan.excluded:
        print(f"  excluded by the selection: {len(plan.excluded)} "
              f"({_ellipsis(sorted(plan.excluded), 5)})", file=err)
    if plan.dropped:
        print(f"  --salvage drops {len(plan.dropped)} that cannot be rebuilt:", file=err)
        for name, why in list(plan.dropped.items())[:20]:
            print(f"    {name}: {why}", file=err)
        if len(plan.dropped) > 20:
            print(f"    ... and {len(plan.dropped) - 20} more", file=err)
    err.flush()


def _report_merge(result, dropped: dict) -> None:
    from zinspect.core import fmt

    err = sys.stderr
    print(f"zinspect: wrote {fmt.count(result.tensors)} tensors, {fmt.size(result.bytes)} in "
          f"{len(result.files)} file(s) to {result.out_dir} in {fmt.duration(result.seconds)}",
          file=err)
    if dropped:
        print(f"zinspect: the output lacks the {len(dropped)} tensor(s) --salvage dropped "
              f"(listed above): {_ellipsis(list(dropped), 5)}", file=err)


def _cancelled(what: str) -> ZinspectError:
    from zinspect.errors import MergeCancelled

    return MergeCancelled(f"{what} was cancelled", "nothing was written")


# ---------------------------------------------------------------------------------- helpers
class _Stop:
    """A should_stop() callable that turns the first Ctrl-C into a polite stop request;
    a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nzinspect: stopping... (Ctrl-C again to abort at once)", file=sys.stderr)

    def __enter__(self) -> _Stop:
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _Bar:
    """A rich progress bar on stderr (bytes, rate, ETA, current name); update(done, total, name)
    is the progress callback of merge and deep_check."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.progress = None
        self.task = None

    def __enter__(self) -> _Bar:
        return self

    def _start(self) -> None:
        """Shown from the first update on, so a merge refused up front prints no bar."""
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn(f"[bold]{self.label}[/]"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(),
            TextColumn("[dim]{task.fields[name]}[/]"),
            console=_console(stderr=True), transient=False)
        self.progress.__enter__()
        self.task = self.progress.add_task(self.label, total=self.total or None, name="")

    def update(self, done: int, total: int, name: str = "") -> None:
        if self.progress is None:
            self._start()
        name = name if len(name) <= 48 else "..." + name[-45:]
        self.progress.update(self.task, completed=done, total=total or None, name=name)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


if __name__ == "__main__":
    sys.exit(main())
