"""The command line's grammar: every command, its options and its help.

Options shared by every command may come before or after the command's name,
and each command's ``--help`` ends with examples.  Nothing here does any work;
each command names its handler in ``commands``.
"""

from __future__ import annotations

import argparse
import os

from .. import __version__
from .commands import (
    run_append,
    run_cat,
    run_compact,
    run_completion,
    run_config,
    run_diff,
    run_log,
    run_ls,
    run_materialize,
    run_show,
    run_stats,
    run_verify,
)

STORE_VARIABLE = "DELTATAR_STORE"


LOG_LEVELS = ("debug", "info", "warning", "error")


VISIT_HELP = "number, -N from the latest (-1), a unique message, or msg:TEXT"


# What shtab needs to complete a directory name; set without importing shtab.
DIRECTORY_COMPLETION = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"}


OVERVIEW = """\
a short tour (S is the store's directory: --store S, or set DELTATAR_STORE):
  deltatar append ./node --store S -m 'after verify'   record the next visit
  deltatar log --store S                                visits and store growth
  deltatar diff --store S 3 -1                          changes since visit 3
  deltatar materialize --store S --visit 3 /tmp/v3      rebuild visit 3

'deltatar COMMAND --help' shows a command's options and examples.
exit status: 0 ok, 1 error (verify: damage found), 2 bad usage, 130 interrupted"""


EXAMPLES = {
    "append": """\
examples:
  deltatar append ./node --store ./node/.deltatar -m 'visit 3: verify failed'
  deltatar append ./node --store ./node/.deltatar --dry-run    # cost it first
  deltatar append ./node --exclude '*.tmp' --exclude .cache/ --quiet

--dry-run marks: + added, M changed, m metadata only, - deleted""",
    "materialize": """\
examples:
  deltatar materialize --store ./node/.deltatar --visit 3 /tmp/v3
  deltatar materialize --store ./node/.deltatar --visit -2 /tmp/v --path src
  deltatar materialize --store ./node/.deltatar --visit 3 ./node --force""",
    "compact": """\
examples:
  deltatar compact --store ./node/.deltatar --auto           # what the policy makes due
  deltatar compact --store ./node/.deltatar --keep-last 20 --dry-run
  cron: */10 * * * * deltatar compact --auto -q --store /runs/node/.deltatar""",
    "log": """\
examples:
  deltatar log --store ./node/.deltatar
  deltatar log --store ./node/.deltatar --json | jq '.visits[-1].bytes_stored'""",
    "verify": """\
examples:
  deltatar verify --store ./node/.deltatar          # every byte of every visit
  deltatar verify --store ./node/.deltatar --quick  # structure and sizes only""",
    "stats": """\
examples:
  deltatar stats --store ./node/.deltatar
  deltatar stats --store ./node/.deltatar --json""",
    "config": """\
examples:
  deltatar config --store ./node/.deltatar            # show every setting
  deltatar config --store ./node/.deltatar level 6    # set one
  deltatar config --store ./node/.deltatar keep-daily 7""",
    "ls": """\
examples:
  deltatar ls --store ./node/.deltatar                # the latest visit
  deltatar ls --store ./node/.deltatar --visit -2 worktree""",
    "cat": """\
examples:
  deltatar cat --store ./node/.deltatar --visit 3 logs/run.log | tail
  deltatar cat --store ./node/.deltatar --visit msg:42 out.bin > /tmp/out.bin""",
    "diff": """\
examples:
  deltatar diff --store ./node/.deltatar 3 -1          # visit 3 to the latest
  deltatar diff --store ./node/.deltatar -2 -1 --stat  # counts only
  deltatar diff --store ./node/.deltatar 3 7 src       # only below src/

marks: + added, - deleted, M content changed, T type changed,
       m mode changed, t modification time changed""",
    "show": """\
examples:
  deltatar show --store ./node/.deltatar -1
  deltatar show --store ./node/.deltatar 'after verify' --json""",
    "completion": """\
examples:
  deltatar completion bash > /etc/bash_completion.d/deltatar
  deltatar completion zsh > "${fpath[1]}/_deltatar\"""",
}


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors suggest the command that was meant."""

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("argument COMMAND: invalid choice"):
            message = _unknown_command(message, self._subparsers._group_actions)
        super().error(message)


def _unknown_command(message: str, actions) -> str:
    import difflib

    choices = [name for action in actions for name in (action.choices or {})]
    given = message.split("'")[1] if message.count("'") >= 2 else ""
    close = difflib.get_close_matches(given, choices, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "'deltatar --help' lists them"
    return f"'{given}' is not a deltatar command; {hint}"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="deltatar",
        description="Store each visit of a directory as only what changed.",
        epilog=OVERVIEW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"deltatar {__version__}"
    )
    _add_common_options(parser, argparse.SUPPRESS, top=True)
    parser.set_defaults(command=None)
    common = CommandParser(add_help=False)
    # A group of their own lists them after each command's own options.
    _add_common_options(
        common.add_argument_group("common options"), argparse.SUPPRESS, top=False
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in (
        _add_append,
        _add_materialize,
        _add_log,
        _add_show,
        _add_ls,
        _add_cat,
        _add_diff,
        _add_stats,
        _add_verify,
        _add_compact,
        _add_config,
        _add_completion,
    ):
        add(commands, common)
    return parser


def _add_common_options(parser, suppress, top: bool) -> None:
    """Options every command takes, before or after the command's name.

    The copy on each command defaults to "not given" so that an option
    written before the command name is not reset by the command's parser.
    """

    def default(value):
        return value if top else suppress

    store = parser.add_argument(
        "--store",
        default=default(os.environ.get(STORE_VARIABLE)),
        metavar="STORE",
        help=f"the store's directory or s3://bucket/prefix (default: ${STORE_VARIABLE})",
    )
    store.complete = DIRECTORY_COMPLETION
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        default=default(None),
        help="S3 endpoint of an s3:// store "
        "(default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)",
    )
    parser.add_argument(
        "--region",
        default=default(None),
        help="region of an s3:// store (default: $AWS_REGION or $AWS_DEFAULT_REGION)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON document on stdout (docs/json.md)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="say more (-vv: debug)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="print errors only",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default(None),
        type=str.lower,
        metavar="LEVEL",
        help="debug, info, warning or error: what to log on stderr "
        "(overrides -v and -q)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show tracebacks and debug logs",
    )
    parser.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=default(60.0),
        metavar="SECONDS",
        help="how long to wait for another writer (default: 60)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=default(None),
        help="show progress bars (default: when stderr is a terminal)",
    )


def _command(
    commands, name: str, common, summary: str, handler, needs_store: bool = True
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        parents=[common],
        help=summary,
        description=summary,
        epilog=EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(
        command=name, handler=handler, command_parser=parser, needs_store=needs_store
    )
    return parser


def _add_visit_option(parser, what: str = "the visit") -> None:
    parser.add_argument(
        "--visit",
        default=None,
        help=f"{what}: {VISIT_HELP} (default: the latest)",
    )


def _add_append(commands, common) -> None:
    parser = _command(
        commands, "append", common, "record SRC as the next visit", run_append
    )
    source = parser.add_argument("src", metavar="SRC", help="the directory to record")
    source.complete = DIRECTORY_COMPLETION
    parser.add_argument(
        "-m", "--message", default="", help="a note kept with the visit"
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="gitignore-style pattern to leave out (repeatable)",
    )
    parser.add_argument(
        "--checksum",
        action="store_true",
        help="hash every file instead of trusting stat data",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail on unreadable paths instead of warning",
    )
    parser.add_argument(
        "--exclude-nested-archives",
        action="store_true",
        help="skip tar/zip files inside SRC that hold copies of SRC",
    )
    parser.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="say what would be recorded and its cost; write nothing",
    )


def _add_materialize(commands, common) -> None:
    parser = _command(
        commands,
        "materialize",
        common,
        "rebuild the exact tree of a visit",
        run_materialize,
    )
    dest = parser.add_argument(
        "dest", metavar="DEST", help="directory to write (new or empty)"
    )
    dest.complete = DIRECTORY_COMPLETION
    _add_visit_option(parser)
    parser.add_argument("--force", action="store_true", help="replace a non-empty DEST")
    parser.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="SUBPATH",
        help="restore only this path of the visit (repeatable)",
    )
    parser.add_argument(
        "--devices", action="store_true", help="recreate device nodes (root only)"
    )


def _add_compact(commands, common) -> None:
    parser = _command(
        commands,
        "compact",
        common,
        "drop visits the policy does not keep and merge delta layers",
        run_compact,
    )
    parser.add_argument(
        "--keep-last",
        type=_positive_int,
        default=None,
        metavar="N",
        help="drop visits older than the last N (replaces the retention policy)",
    )
    parser.add_argument(
        "--auto",
        action="store_true",
        help="do only what the store's policy makes due; exit 0 at once when "
        "nothing is due or another writer holds the store",
    )
    parser.add_argument("--dry-run", action="store_true", help="report, change nothing")


def _add_log(commands, common) -> None:
    _command(commands, "log", common, "list the visits and how the store grew", run_log)


def _add_verify(commands, common) -> None:
    parser = _command(
        commands, "verify", common, "check the store for damage", run_verify
    )
    parser.add_argument("--visit", default=None, help="check only this visit")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check structure and sizes, not content ids",
    )


def _add_stats(commands, common) -> None:
    _command(
        commands, "stats", common, "show what each visit stored and saved", run_stats
    )


def _add_config(commands, common) -> None:
    parser = _command(
        commands, "config", common, "show or set store settings", run_config
    )
    parser.add_argument("key", nargs="?", metavar="KEY", help="setting to show or set")
    parser.add_argument("value", nargs="?", metavar="VALUE", help="new value")


def _add_ls(commands, common) -> None:
    parser = _command(commands, "ls", common, "list the entries of a visit", run_ls)
    parser.add_argument(
        "path", nargs="?", metavar="PATH", help="list only below this path"
    )
    _add_visit_option(parser)


def _add_cat(commands, common) -> None:
    parser = _command(
        commands, "cat", common, "write one file of a visit to stdout", run_cat
    )
    parser.add_argument("path", metavar="PATH", help="the file's path in the visit")
    _add_visit_option(parser)


def _add_diff(commands, common) -> None:
    parser = _command(commands, "diff", common, "compare two visits", run_diff)
    parser.add_argument("first", metavar="A", help=f"the older visit: {VISIT_HELP}")
    parser.add_argument("second", metavar="B", help="the newer visit")
    parser.add_argument(
        "path", nargs="?", metavar="PATH", help="compare only below this path"
    )
    parser.add_argument("--stat", action="store_true", help="print counts only")


def _add_show(commands, common) -> None:
    parser = _command(
        commands, "show", common, "describe one visit in detail", run_show
    )
    parser.add_argument(
        "visit", nargs="?", default=None, metavar="VISIT", help=VISIT_HELP
    )


def _add_completion(commands, common) -> None:
    parser = _command(
        commands,
        "completion",
        common,
        "print a shell completion script",
        run_completion,
        needs_store=False,
    )
    parser.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds"
        ) from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value
