"""The `zinspect` command line: open the app, or run a subcommand headless.

Each subcommand is one module here with NAME, SUMMARY, DESCRIPTION, EPILOG, add_arguments(parser)
and run(args) -> exit code; COMMANDS lists them. Every failure the core can name
(`ZinspectError`) is caught in main() and printed as a message plus a hint, with the error's exit
code; argparse usage errors exit 2. Imports stay lazy: `info --json` and `validate --json` import
neither torch, textual nor rich, and the human output imports rich only when it prints.
"""

from __future__ import annotations

import argparse
import os
import sys

from zinspect import __version__
from zinspect.cli import diff, info, merge, open_app, reshard, stats, validate
from zinspect.cli.common import Parser, add_path, print_error, silence_stdout
from zinspect.errors import ZinspectError

#: subcommand modules, in the order --help lists them
COMMAND_MODULES = (info, validate, merge, stats, diff, reshard)
COMMANDS = tuple(m.NAME for m in COMMAND_MODULES)

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
command ({', '.join(COMMANDS)}) is opened with `zinspect ./info`.

{EXIT_CODES}"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="zinspect",
        usage=f"zinspect PATH [--tag TAG]\n       zinspect {{{','.join(COMMANDS)}}} ... "
              "(see zinspect COMMAND --help)",
        description="Look inside DeepSpeed ZeRO checkpoints: browse, validate and merge them\n"
                    "to fp32, without DeepSpeed and without loading the tensors.",
        epilog=MAIN_EPILOG)
    parser.add_argument("--version", action="version", version=f"zinspect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    parser.commands = sub.choices  # name -> its parser, for errors in the command's own words
    for module in COMMAND_MODULES:
        p = sub.add_parser(module.NAME, prog=f"zinspect {module.NAME}", help=module.SUMMARY,
                           description=module.DESCRIPTION, epilog=module.EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_path(p)
        module.add_arguments(p)
    return parser


def _open_parser() -> argparse.ArgumentParser:
    p = Parser(prog="zinspect", usage="zinspect PATH [--tag TAG]",
               description="Open a checkpoint in the terminal app.", epilog=MAIN_EPILOG)
    add_path(p)
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
            _check_not_a_typo(argv[0])
            args = _open_parser().parse_args(argv)
            args.command = None
        return _dispatch(args)
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    except ZinspectError as e:
        print_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("zinspect: cancelled", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zinspect info --json | head`
        silence_stdout()
        return 0
    except Exception as e:  # never a traceback; ZINSPECT_DEBUG=1 shows it
        if os.environ.get("ZINSPECT_DEBUG"):
            raise
        print(f"zinspect: internal error: {type(e).__name__}: {e}\n"
              "  hint: this is a bug in zinspect; rerun with ZINSPECT_DEBUG=1 for the "
              "traceback and report it", file=sys.stderr)
        return 3


def _check_not_a_typo(word: str) -> None:
    """`zinspect valdate PATH`: a word close to a command that is no path is a mistyped
    command (argparse would say "unrecognized arguments: PATH")."""
    import difflib

    if word.startswith("-") or os.path.lexists(word):
        return
    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.6)
    if close:
        from zinspect.core.fmt import shown

        build_parser().error(f"{shown(word, 40)!r} is not a command nor an existing path; "
                             f"did you mean `zinspect {close[0]}`?")


def _dispatch(args: argparse.Namespace) -> int:
    for module in COMMAND_MODULES:
        if args.command == module.NAME:
            return module.run(args)
    return open_app.run(args)
