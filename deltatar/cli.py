"""The ``deltatar`` command line: argument parsing and all terminal output.

The library never prints; this module turns its results into one line or a
table for people, or one JSON document on stdout for scripts (``--json``, its
fields described in docs/json.md).  Errors the user can act on become one line
on stderr and exit status 1; bad usage exits 2; anything else is a bug and
keeps its traceback.  rich is imported only where a command draws with it, so
``deltatar --version`` and scripted runs stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

from . import __version__, documents
from .errors import DeltatarError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141
STORE_VARIABLE = "DELTATAR_STORE"
# Progress bars appear only for work that lasts longer than this.
PROGRESS_DELAY = 1.0
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


class _Parser(argparse.ArgumentParser):
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


def main(argv: list[str] | None = None) -> int:
    # A name or message the terminal's encoding cannot show is escaped, never
    # fatal: reporting must not fail on what it reports.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    command_parser = args.command_parser
    if extra:
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(args)
    if args.needs_store and not args.store:
        command_parser.error(f"--store is required (or set {STORE_VARIABLE})")
    _apply_object_store_options(args)
    return _run(args)


def _run(args) -> int:
    """Run the command; turn the errors a user can act on into one line."""
    try:
        return args.handler(args)
    except DeltatarError as error:
        if args.debug:
            raise
        _report_error(args, error)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _print_err("deltatar: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``deltatar ls | head``): nothing left to say.
        # Point stdout at /dev/null so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _report_error(args, error: DeltatarError) -> None:
    from .errors import StoreNotFound

    message = str(error)
    if isinstance(error, StoreNotFound) and args.store:
        message += _store_hint(args.store)
    if args.json:
        _print_json(
            {
                "error": {
                    "type": type(error).__name__,
                    "message": message,
                    "exit_code": EXIT_ERROR,
                }
            }
        )
    _print_err(f"deltatar: error: {message}")


def _store_hint(location: str) -> str:
    """Name a store the user probably meant: inside the directory, or beside it."""
    import difflib
    from pathlib import Path

    from .store import HEADER_NAME

    path = Path(location)
    with contextlib.suppress(OSError):
        inside = [c for c in path.iterdir() if (c / HEADER_NAME).is_file()]
        if len(inside) == 1:
            return f"; did you mean --store {inside[0]}?"
    with contextlib.suppress(OSError):
        siblings = {
            child.name: child
            for _, child in zip(range(1000), path.parent.iterdir(), strict=False)
            if (child / HEADER_NAME).is_file()
        }
        close = difflib.get_close_matches(path.name, list(siblings), n=1)
        if close:
            return f"; did you mean --store {siblings[close[0]]}?"
    return ""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    common = _Parser(add_help=False)
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


def _apply_object_store_options(args) -> None:
    """Options override the AWS environment variables, as in the AWS tools.

    The object store backend reads its endpoint and region where every S3
    client looks for them, so the options are handed on the same way.
    """
    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = args.endpoint_url
    if args.region:
        os.environ["AWS_REGION"] = args.region


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
        commands, "append", common, "record SRC as the next visit", _append
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
        _materialize,
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
        _compact,
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
    _command(commands, "log", common, "list the visits and how the store grew", _log)


def _add_verify(commands, common) -> None:
    parser = _command(commands, "verify", common, "check the store for damage", _verify)
    parser.add_argument("--visit", default=None, help="check only this visit")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check structure and sizes, not content ids",
    )


def _add_stats(commands, common) -> None:
    _command(commands, "stats", common, "show what each visit stored and saved", _stats)


def _add_config(commands, common) -> None:
    parser = _command(commands, "config", common, "show or set store settings", _config)
    parser.add_argument("key", nargs="?", metavar="KEY", help="setting to show or set")
    parser.add_argument("value", nargs="?", metavar="VALUE", help="new value")


def _add_ls(commands, common) -> None:
    parser = _command(commands, "ls", common, "list the entries of a visit", _ls)
    parser.add_argument(
        "path", nargs="?", metavar="PATH", help="list only below this path"
    )
    _add_visit_option(parser)


def _add_cat(commands, common) -> None:
    parser = _command(
        commands, "cat", common, "write one file of a visit to stdout", _cat
    )
    parser.add_argument("path", metavar="PATH", help="the file's path in the visit")
    _add_visit_option(parser)


def _add_diff(commands, common) -> None:
    parser = _command(commands, "diff", common, "compare two visits", _diff)
    parser.add_argument("first", metavar="A", help=f"the older visit: {VISIT_HELP}")
    parser.add_argument("second", metavar="B", help="the newer visit")
    parser.add_argument(
        "path", nargs="?", metavar="PATH", help="compare only below this path"
    )
    parser.add_argument("--stat", action="store_true", help="print counts only")


def _add_show(commands, common) -> None:
    parser = _command(commands, "show", common, "describe one visit in detail", _show)
    parser.add_argument(
        "visit", nargs="?", default=None, metavar="VISIT", help=VISIT_HELP
    )


def _add_completion(commands, common) -> None:
    parser = _command(
        commands,
        "completion",
        common,
        "print a shell completion script",
        _completion,
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


# -- handlers ----------------------------------------------------------------


def _append(args) -> int:
    from pathlib import Path

    from .append import check_source
    from .store import Store

    if args.dry_run:
        return _append_dry_run(args)
    check_source(Path(args.src))
    store = Store.open_or_create(args.store)
    store.lock_timeout = args.lock_timeout
    started = time.perf_counter()
    with _progress_bar(args, "append") as progress:
        record = store.append(
            args.src,
            message=args.message,
            excludes=args.exclude,
            checksum=args.checksum,
            strict=args.strict,
            exclude_nested_archives=args.exclude_nested_archives,
            progress=progress,
        )
    elapsed = time.perf_counter() - started
    store_bytes = store.disk_usage()
    if args.json:
        _print_json(
            documents.visit_record(record)
            | {"store_bytes": store_bytes, "seconds": elapsed}
        )
    elif not args.quiet:
        _print_out(
            f"visit {record.visit}: {_counts_text(record)}; "
            f"{_size(record.bytes_stored)} stored, store {_size(store_bytes)}"
        )
    return EXIT_OK


def _append_dry_run(args) -> int:
    from pathlib import Path

    from .errors import StoreNotFound
    from .preview import preview_append
    from .store import Store

    try:
        store = Store.open(args.store)
    except StoreNotFound:
        store = None  # the real append would create it; a dry run creates nothing
    with _progress_bar(args, "dry run") as progress:
        preview = preview_append(
            store,
            Path(args.store),
            Path(args.src),
            excludes=args.exclude,
            checksum=args.checksum,
            exclude_nested_archives=args.exclude_nested_archives,
            progress=progress,
        )
    if args.json:
        _print_json(documents.preview(preview))
    elif not args.quiet:
        _print_preview(preview, args.verbose)
    return EXIT_OK


def _print_preview(preview, verbose: int) -> None:
    """The paths first (a few unless -v), then what the visit would cost."""
    metadata = set(preview.metadata_only)
    marked = [("+", path) for path in preview.added]
    marked += [("m" if p in metadata else "M", p) for p in preview.changed]
    marked += [("-", path) for path in preview.deleted]
    shown = marked if verbose else marked[:PREVIEW_PATHS]
    lines = [f"{mark} {_escape(path)}" for mark, path in shown]
    if len(shown) < len(marked):
        lines.append(f"... and {len(marked) - len(shown)} more (-v lists all)")
    only = f" ({len(metadata)} metadata only)" if metadata else ""
    lines += [
        f"dry run: visit {preview.visit} would record",
        f"  {len(preview.added)} added, {len(preview.changed)} changed{only}, "
        f"{len(preview.deleted)} deleted",
        f"  {_size(preview.new_bytes)} of new content, "
        f"{_size(preview.deduplicated_bytes)} already stored",
        f"  about {_size(preview.estimate_bytes)} to store",
        "nothing was written",
    ]
    lines += [f"warning: {problem}" for problem in preview.problems]
    _print_out("\n".join(lines))


def _materialize(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    started = time.perf_counter()
    with _progress_bar(args, "materialize") as progress:
        done = store.materialize(
            args.visit,
            args.dest,
            force=args.force,
            devices=args.devices,
            paths=args.path,
            progress=progress,
        )
    elapsed = time.perf_counter() - started
    if args.json:
        _print_json(
            {
                "visit": done.visit,
                "dest": args.dest,
                "paths": args.path,
                "entries": done.entries,
                "tree_bytes": done.tree_bytes,
                "seconds": elapsed,
            }
        )
    elif not args.quiet:
        part = f" ({len(args.path)} of its paths)" if args.path else ""
        _print_out(
            f"visit {done.visit}{part} materialized into {args.dest} "
            f"({done.entries} entries, {_size(done.tree_bytes)}, {elapsed:.2f}s)"
        )
    return EXIT_OK


def _compact(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    store.lock_timeout = args.lock_timeout
    report = store.compact(
        keep_last=args.keep_last, dry_run=args.dry_run, auto=args.auto
    )
    if args.json:
        _print_json(report)
    elif not args.quiet:
        _print_out(_compact_line(report))
    return EXIT_OK


def _compact_line(report: dict[str, Any]) -> str:
    """One line a log file keeps: what was done, or why nothing was."""
    did = report["did"]
    why = "; ".join(report["reasons"])
    if did not in ("compacted", "would compact"):
        return f"{did}" + (f" ({why})" if why and did != "nothing due" else "")
    dropped = ", ".join(map(str, report["dropped"])) or "none"
    parts = [f"{did}: kept visits {report['kept']}", f"dropped: {dropped}"]
    if report["merged_layers"]:
        parts.append(
            f"merged {report['merged_layers']} delta layers "
            f"({_size(report['merged_bytes'])})"
        )
    if report["rebase"]:
        parts.append("new base for the latest visit")
    sizes = _size(report["store_bytes_before"])
    if "store_bytes_after" in report:
        sizes += f" -> {_size(report['store_bytes_after'])}"
        sizes += f", wrote {_size(report['bytes_written'])}"
    elif "freed_layer_bytes" in report:
        sizes += (
            f", frees {_size(report['freed_layer_bytes'])} of layers and "
            f"carries about {_size(report['carried_bytes'])}"
        )
    else:
        sizes += f", needs up to {_size(report['bytes_needed'])} free"
    parts.append(f"store {sizes}")
    return "; ".join(parts)


def _log(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    records = store.visits()
    totals = _running_totals(records)
    if args.json:
        rows = [
            documents.visit_record(record) | {"cumulative_bytes": total}
            for record, total in zip(records, totals, strict=True)
        ]
        _print_json({"visits": rows, "store_bytes": store.disk_usage()})
        return EXIT_OK
    if not args.quiet:
        _print_log(records, totals, store.disk_usage())
    return EXIT_OK


def _running_totals(records) -> list[int]:
    totals, total = [], 0
    for record in records:
        total += record.bytes_stored
        totals.append(total)
    return totals


def _verify(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    problems = store.verify(args.visit, quick=args.quick)
    if args.json:
        _print_json({"ok": not problems, "problems": problems})
    else:
        for problem in problems:
            _print_err(f"damaged: {problem}")
        if not problems and not args.quiet:
            _print_out("store verified: no problems found")
    return EXIT_ERROR if problems else EXIT_OK


def _stats(args) -> int:
    from .browse import store_stats
    from .store import Store

    stats = store_stats(Store.open(args.store))
    if args.json:
        _print_json(stats)
        return EXIT_OK
    if not args.quiet:
        _print_stats(stats)
    return EXIT_OK


def _print_stats(stats: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(
        title="what each visit stored", title_justify="left", box=None, pad_edge=False
    )
    columns = ("visit", "tree", "stored", "new", "tails", "patched", "blocks", "dedup")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row in stats["visits"]:
        table.add_row(
            str(row["visit"]),
            _size(row["tree_bytes"]),
            _size(row["bytes_stored"]),
            _size(row["new_bytes"]),
            _size(row["tail_bytes"]),
            _size(row["patch_source_bytes"]),
            _size(row["block_bytes"]),
            _size(row["deduplicated_bytes"]),
        )
    console = _stdout_console()
    console.print(table)
    total = stats["total"]
    ratio = total["store_to_naive_compressed"]
    _print_out(
        f"store: {_size(total['store_bytes'])}\n"
        f"per-visit full archives: about {_size(total['naive_compressed_estimate'])}"
        f" compressed, {_size(total['naive_full_bytes'])} as plain tar"
        + (f"\nstore / full archives: {ratio:.3f}" if ratio else "")
    )


def _config(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    store.lock_timeout = args.lock_timeout
    if args.value is not None:
        store.configure(args.key, args.value)
    settings = store.config_items()
    if args.key is not None and args.key not in settings:
        raise DeltatarError(
            f"{args.key}: unknown setting; known: {', '.join(settings)}"
        )
    shown = {args.key: settings[args.key]} if args.key else settings
    if args.json:
        _print_json(shown)
    else:
        _print_out(
            "\n".join(
                f"{key} = {'none' if value is None else value}"
                for key, value in shown.items()
            )
        )
    return EXIT_OK


def _ls(args) -> int:
    from .browse import list_entries
    from .store import Store

    record, entries = list_entries(Store.open(args.store), args.visit, args.path)
    if args.json:
        _print_json(
            {"visit": record.visit, "entries": [documents.entry(e) for e in entries]}
        )
        return EXIT_OK
    width = max((len(str(e.size)) for e in entries), default=1)
    lines = [
        f"{_mode_text(e)} {e.size:>{width}} {_short_time(e.mtime_ns)} {_shown_path(e)}"
        for e in entries
    ]
    _write_lines(lines)
    return EXIT_OK


def _cat(args) -> int:
    from .browse import read_file
    from .store import Store

    store = Store.open(args.store)
    chunks = read_file(store, args.visit, args.path)
    if args.json:
        import base64

        data = b"".join(chunks)
        visit = store.read_head().resolve(args.visit, store.location).visit
        _print_json(
            {
                "visit": visit,
                "path": documents.path_text(args.path.strip("/")),
                "size": len(data),
                "encoding": "base64",
                "data": base64.b64encode(data).decode("ascii"),
            }
        )
        return EXIT_OK
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
    out.flush()
    return EXIT_OK


DIFF_MARKS = {
    "added": "+",
    "deleted": "-",
    "changed": "M",
    "type": "T",
    "mode": "m",
    "touched": "t",
}


def _diff(args) -> int:
    from .browse import diff_visits
    from .store import Store

    store = Store.open(args.store)
    first, second, changes = diff_visits(store, args.first, args.second, args.path)
    counts = {kind: 0 for kind in DIFF_MARKS}
    for change in changes:
        counts[change.kind] += 1
    if args.json:
        listing = [] if args.stat else [documents.change(c) for c in changes]
        _print_json({"from": first, "to": second, "counts": counts, "changes": listing})
        return EXIT_OK
    if not args.stat:
        _write_lines([_change_line(change) for change in changes])
    if not args.quiet or args.stat:
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        verdict = summary or "no changes"
        target = _print_out if args.stat else _print_err
        target(f"visit {first} -> {second}: {verdict}")
    return EXIT_OK


def _change_line(change) -> str:
    line = f"{DIFF_MARKS[change.kind]} {_escape(change.path)}"
    if change.kind == "mode":
        line += f" ({change.old.mode:o} -> {change.new.mode:o})"
    elif change.kind == "type":
        line += f" ({change.old.type} -> {change.new.type})"
    return line


def _show(args) -> int:
    from .browse import describe_visit
    from .store import Store

    detail = describe_visit(Store.open(args.store), args.visit)
    document = documents.visit_record(detail.record) | {
        "layer": detail.record.layer,
        "manifest": detail.record.manifest,
        "tree_digest": detail.record.tree_digest,
        "base": detail.base,
        "previous": detail.previous,
        "changes": _change_counts(detail.changes),
    }
    if args.json:
        _print_json(document)
        return EXIT_OK
    if not args.quiet:
        _print_visit(detail, document)
    return EXIT_OK


def _change_counts(changes) -> dict[str, int]:
    counts = {kind: 0 for kind in DIFF_MARKS}
    for change in changes:
        counts[change.kind] += 1
    return counts


def _completion(args) -> int:
    import shtab

    _print_out(shtab.complete(_parser(), shell=args.shell), end="")
    return EXIT_OK


# -- output --------------------------------------------------------------------

PREVIEW_PATHS = 20
SHOW_PATHS = 10
# Eighths of a block, for bars drawn to a fraction of a character.
BAR_PARTS = " ▏▎▍▌▋▊▉█"
SPARK_PARTS = "▁▂▃▄▅▆▇█"
# Where stdout cannot encode those (LANG=C, a legacy code page).
ASCII_BAR_PARTS = " :#"
ASCII_SPARK_PARTS = "_.-=+*#"
CHART_WIDTH = 10
LOG_COLUMNS = (
    "visit",
    "time",
    "message",
    "added",
    "chg",
    "del",
    "stored",
    "total",
    "growth",
)
LOG_NUMBERS = ("visit", "added", "chg", "del", "stored", "total")


def _print_log(records, totals: list[int], store_bytes: int) -> None:
    """The visits as a table, with a bar of the store's size after each.

    Every column but the message keeps its full width; the message takes
    what is left of the terminal and is cut with an ellipsis.
    """
    from rich.table import Table
    from rich.text import Text

    if not records:
        _print_out("no visits yet; 'deltatar append SRC --store S' records one")
        return
    biggest = max(totals) or 1
    this_year = time.localtime().tm_year
    same_year = all(
        time.localtime(record.time_ns / 1e9).tm_year == this_year for record in records
    )
    layout = "%m-%d %H:%M" if same_year else "%Y-%m-%d %H:%M"
    rows = [
        (
            str(record.visit),
            time.strftime(layout, time.localtime(record.time_ns / 1e9)),
            _printable(_escape(record.message)) or "-",
            str(record.added),
            str(record.changed),
            str(record.deleted),
            _size(record.bytes_stored),
            _size(total),
            _bar(total / biggest, CHART_WIDTH),
        )
        for record, total in zip(records, totals, strict=True)
    ]
    console = _stdout_console()
    from rich.cells import cell_len

    widths = [
        max(cell_len(header), *(cell_len(row[number]) for row in rows))
        for number, header in enumerate(LOG_COLUMNS)
    ]
    others = sum(widths) - widths[2] + len(widths) - 1
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    for header, width in zip(LOG_COLUMNS, widths, strict=True):
        if header == "message":
            width = max(7, min(width, console.width - others))
        justify = "right" if header in LOG_NUMBERS else "left"
        table.add_column(
            header, justify=justify, no_wrap=True, overflow="ellipsis", width=width
        )
    for row in rows:
        cells = [Text(cell) for cell in row]
        cells[-1].stylize("cyan")
        table.add_row(*cells)
    console.print(table)
    spark = _sparkline([record.bytes_stored for record in records], 40)
    _print_out(
        f"{len(records)} visits, store {_size(store_bytes)} on disk; "
        f"stored per visit {spark}"
    )


def _bar(fraction: float, width: int) -> str:
    """A bar of ``fraction`` of ``width`` characters, drawn to an eighth."""
    parts = BAR_PARTS if _can_encode(BAR_PARTS) else ASCII_BAR_PARTS
    steps = len(parts) - 1
    filled = round(max(0.0, min(1.0, fraction)) * width * steps)
    full, part = divmod(filled, steps)
    return (parts[-1] * full + (parts[part] if part else "")).ljust(width)


def _sparkline(values: list[int], width: int) -> str:
    """One character per value (the largest of each group when there are many)."""
    parts = SPARK_PARTS if _can_encode(SPARK_PARTS) else ASCII_SPARK_PARTS
    groups = max(1, -(-len(values) // width))
    peaks = [max(values[i : i + groups]) for i in range(0, len(values), groups)]
    top = max(peaks, default=0) or 1
    last = len(parts) - 1
    return "".join(parts[round(value / top * last)] for value in peaks)


def _printable(text: str) -> str:
    """``text`` as stdout's encoding will show it, so widths can be measured."""
    encoding = sys.stdout.encoding or "ascii"
    with contextlib.suppress(LookupError):
        return text.encode(encoding, "backslashreplace").decode(encoding)
    return text


def _can_encode(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _print_visit(detail, document: dict[str, Any]) -> None:
    record = detail.record
    stored = record.stored
    lines = [
        f"visit {record.visit}  {_long_time(record.time_ns)}  ({record.kind} layer)",
        f"message   {_escape(record.message) or '-'}",
        f"tree      {record.entries} entries, {_size(record.tree_bytes)} in files",
        f"changes   {_counts_text(record)}"
        + (f" ({record.metadata_only} metadata only)" if record.metadata_only else ""),
        f"stored    {_size(record.bytes_stored)}: layer {_size(record.layer_bytes)}"
        f", manifest {_size(record.manifest_bytes)}",
        f"new       {_size(stored.get('new_bytes', 0))} of file content "
        f"({_size(stored.get('tail_bytes', 0))} as tails, "
        f"{_size(stored.get('block_bytes', 0))} as blocks)",
        f"patched   {_size(stored.get('patch_source_bytes', 0))} of edited files",
        f"dedup     {_size(stored.get('deduplicated_bytes', 0))} already stored",
        f"chain     base visit {detail.base}"
        + (f", previous visit {detail.previous}" if detail.previous else ""),
        f"layer     {record.layer}",
        f"manifest  {record.manifest}",
    ]
    lines += _show_changes(detail)
    _print_out("\n".join(lines))


def _show_changes(detail) -> list[str]:
    if detail.previous is None:
        return []
    changes = detail.changes
    lines = [f"since visit {detail.previous}:" + ("" if changes else " no changes")]
    lines += [f"  {_change_line(change)}" for change in changes[:SHOW_PATHS]]
    if len(changes) > SHOW_PATHS:
        lines.append(
            f"  ... and {len(changes) - SHOW_PATHS} more "
            f"(deltatar diff {detail.previous} {detail.record.visit})"
        )
    return lines


def _counts_text(record) -> str:
    return f"{record.added} added, {record.changed} changed, {record.deleted} deleted"


def _escape(path: str) -> str:
    """Show a path that may hold undecodable bytes without ever failing to print."""
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n")


def _shown_path(entry) -> str:
    text = _escape(entry.path)
    if entry.type == "dir":
        return text + "/"
    if entry.type == "symlink":
        return f"{text} -> {_escape(entry.target or '')}"
    return text


def _mode_text(entry) -> str:
    import stat as stat_module

    kinds = {
        "file": stat_module.S_IFREG,
        "dir": stat_module.S_IFDIR,
        "symlink": stat_module.S_IFLNK,
        "fifo": stat_module.S_IFIFO,
        "chardev": stat_module.S_IFCHR,
        "blockdev": stat_module.S_IFBLK,
    }
    return stat_module.filemode(kinds[entry.type] | entry.mode)


def _progress_wanted(args) -> bool:
    if args.progress is not None:
        return args.progress
    return sys.stderr.isatty() and not args.quiet and not args.json


@contextlib.contextmanager
def _progress_bar(args, label: str):
    """A transient progress bar on stderr for work that lasts over a second.

    The bar counts bytes (for the rate and the time left) and shows files
    done beside them; it is drawn only once the work has run for
    ``PROGRESS_DELAY`` seconds, so quick commands print nothing extra.
    """
    # TODO: the walk before the first file is read reports nothing, so a tree
    # of millions of paths shows no bar while it is being listed.
    if not _progress_wanted(args):
        yield None
        return
    bar = _new_progress()
    task = bar.add_task(label, total=None, files="")
    started = time.monotonic()
    shown = False

    def update(files: int, total_files: int, done: int, total: int) -> None:
        nonlocal shown
        bar.update(
            task, completed=done, total=total, files=f"{files}/{total_files} files"
        )
        if not shown and time.monotonic() - started >= PROGRESS_DELAY:
            bar.start()
            shown = True

    try:
        yield update
    finally:
        if shown:
            bar.stop()


def _new_progress():
    """Columns that fit 80 terminal columns even at 100,000 files."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        """Bytes per second in the same binary units as the byte counts."""

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{_size(speed)}/s" if speed else "", style="green")

    columns = (
        TextColumn("{task.description}", style="bold"),
        BarColumn(bar_width=12),
        TextColumn("{task.fields[files]}"),
        DownloadColumn(binary_units=True),
        Rate(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=_stderr_console(), transient=True)


def _print_json(document: dict[str, Any]) -> None:
    """One JSON document on stdout; its first field is the schema version."""
    versioned = {"schema_version": documents.SCHEMA_VERSION} | document
    sys.stdout.write(json.dumps(versioned, indent=2, ensure_ascii=True) + "\n")
    sys.stdout.flush()


def _print_out(text: str, end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def _print_err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _write_lines(lines: list[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def _long_time(time_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(time_ns / 1e9))


def _short_time(time_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(time_ns / 1e9))


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _stdout_console():
    from rich.console import Console

    return Console(soft_wrap=False)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _configure_logging(args) -> None:
    """Logs go to stderr: through rich on a terminal, as plain lines otherwise."""
    level = _log_level(args)
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=_stderr_console(), show_time=False, show_path=False, markup=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _PlainFormatter(logging.Formatter):
    """``deltatar: warning: message``, like the error line, for pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"deltatar: {record.levelname.lower()}: {record.getMessage()}"


def _log_level(args) -> int:
    if args.log_level is not None:
        return getattr(logging, args.log_level.upper())
    if args.debug or args.verbose >= 2:
        return logging.DEBUG
    if args.quiet:
        return logging.ERROR
    if args.verbose == 1:
        return logging.INFO
    return logging.WARNING
