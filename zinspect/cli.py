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
import time

from zinspect import __version__
from zinspect.errors import ZinspectError
from zinspect.report import console, ellipsis, human_info, human_validate, info_json, validate_json

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
            # The app has ended and its workers have finished (a merge cleans up before the
            # app returns): skip freeing the checkpoint's objects, seconds at 300k params.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 0)
    ckpt = _open(args)
    human_info(ckpt)
    return 0 if _readable_at_all(ckpt) else 2


# ---------------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    ckpt = _open(args)
    if args.json:
        _print_json(info_json(ckpt))
    else:
        human_info(ckpt)
    return 0 if _readable_at_all(ckpt) else 2


def _print_json(obj) -> None:
    """Indented for a terminal; compact when piped (json's C encoder: 4x faster at 300k params)."""
    indent = 1 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(obj, indent=indent, default=str))
    sys.stdout.write("\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------- validate
def cmd_validate(args) -> int:
    ckpt = _open(args)
    if not _readable_at_all(ckpt):
        if args.json:
            _print_json(validate_json(ckpt))
        return _unreadable(ckpt)
    if args.deep:
        ckpt.findings.extend(_deep(ckpt))
    if args.json:
        _print_json(validate_json(ckpt))
    else:
        human_validate(ckpt, verbose=args.verbose)
    return 1 if ckpt.errors else 0


def _deep(ckpt) -> list:
    from zinspect.core.deep import deep_check

    total = sum(f.size for f in ckpt.files if f.readable)
    with _Stop() as stop, _Bar("reading", total) as bar:
        found = deep_check(ckpt, progress=bar.update, should_stop=stop)
    if stop.requested:
        raise _cancelled("the deep check")
    return list(found or [])


# ---------------------------------------------------------------------------------- merge
def cmd_merge(args) -> int:
    import warnings

    from zinspect.core.merge import merge, parse_size, plan_merge
    from zinspect.core.selection import Selection

    # torch (pt output, fp16 upcasts) warns at import when numpy is absent; it needs none here
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

    shard = _shard_size(args.max_shard_size, parse_size)
    if args.fmt == "pt":
        from zinspect.core.writers import require_torch

        require_torch()  # say so before announcing a merge that cannot start
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
    """--max-shard-size: None for one file ('0', 'none', ...); parse_size raises UsageError."""
    if text.strip().lower() in ("0", "none", "no", "off", ""):
        return None
    return parse_size(text)


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
              f"({ellipsis(sorted(plan.excluded), 5)})", file=err)
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
              f"(listed above): {ellipsis(list(dropped), 5)}", file=err)


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
    is the progress callback of merge and deep_check. It appears only once the work has taken
    SHOW_AFTER seconds: a bar that would flash for a moment is noise (and rich costs an import)."""

    SHOW_AFTER = 0.3

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.progress = None
        self.task = None
        self.created = time.monotonic()

    def __enter__(self) -> _Bar:
        return self

    def _start(self) -> None:
        """Created at the first update after SHOW_AFTER, so a merge refused up front prints no bar."""
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
            console=console(stderr=True), transient=False)
        self.progress.__enter__()
        self.task = self.progress.add_task(self.label, total=self.total or None, name="")

    def update(self, done: int, total: int, name: str = "") -> None:
        if self.progress is None:
            if time.monotonic() - self.created < self.SHOW_AFTER:
                return
            self._start()
        name = name if len(name) <= 48 else "..." + name[-45:]
        self.progress.update(self.task, completed=done, total=total or None, name=name)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


if __name__ == "__main__":
    sys.exit(main())
