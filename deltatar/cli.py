"""The ``deltatar`` command line: argument parsing and all terminal output.

The library never prints; this module turns its results into one line or a
table for people, or one JSON document on stdout for scripts (``--json``).
Errors the user can act on become one line on stderr and exit status 1; bad
usage exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from . import __version__
from .errors import DeltatarError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
STORE_VARIABLE = "DELTATAR_STORE"

EPILOG = {
    "append": "example: deltatar append ./node --store ./node/.deltatar -m 'after verify'",
    "materialize": "example: deltatar materialize --store ./node/.deltatar --visit 3 /tmp/v3",
    "compact": "example (cron): */30 * * * * deltatar compact --store /runs/node/.deltatar --keep-last 20",
    "log": "example: deltatar log --store ./node/.deltatar --json",
    "verify": "example: deltatar verify --store ./node/.deltatar --quick",
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _configure_logging(args)
    if not args.store:
        parser.error(f"--store is required (or set {STORE_VARIABLE})")
    try:
        return args.handler(args)
    except DeltatarError as error:
        if args.debug:
            raise
        _stderr_console().print(f"deltatar: error: {error}", markup=False, highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _stderr_console().print("deltatar: interrupted", markup=False)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatar",
        description="Store each visit of a directory as only what changed.",
    )
    parser.add_argument("--version", action="version", version=f"deltatar {__version__}")
    parser.set_defaults(command=None)
    common = _common_options()
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_append(commands, common)
    _add_materialize(commands, common)
    _add_compact(commands, common)
    _add_log(commands, common)
    _add_verify(commands, common)
    return parser


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        default=os.environ.get(STORE_VARIABLE),
        help=f"the store's directory (default: ${STORE_VARIABLE})",
    )
    common.add_argument("--json", action="store_true", help="print JSON on stdout")
    common.add_argument("-v", "--verbose", action="count", default=0)
    common.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument(
        "--lock-timeout", type=float, default=60.0, metavar="SECONDS",
        help="how long to wait for another writer (default: 60)",
    )
    return common


def _command(commands, name: str, common, summary: str, handler) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, parents=[common], help=summary, description=summary, epilog=EPILOG[name]
    )
    parser.set_defaults(command=name, handler=handler)
    return parser


def _add_append(commands, common) -> None:
    parser = _command(commands, "append", common, "record SRC as the next visit", _append)
    parser.add_argument("src", metavar="SRC", help="the directory to record")
    parser.add_argument("-m", "--message", default="", help="a note kept with the visit")
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="gitignore-style pattern to leave out (repeatable)",
    )
    parser.add_argument(
        "--checksum", action="store_true", help="hash every file instead of trusting stat data"
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on unreadable paths instead of warning"
    )


def _add_materialize(commands, common) -> None:
    parser = _command(
        commands, "materialize", common, "rebuild the exact tree of a visit", _materialize
    )
    parser.add_argument("dest", metavar="DEST", help="directory to write (new or empty)")
    parser.add_argument("--visit", default=None, help="number, -1 for latest, or message")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DEST")
    parser.add_argument(
        "--path", action="append", default=[], metavar="SUBPATH",
        help="restore only this path of the visit (repeatable)",
    )
    parser.add_argument(
        "--devices", action="store_true", help="recreate device nodes (root only)"
    )


def _add_compact(commands, common) -> None:
    parser = _command(
        commands, "compact", common, "squash the chain into a new base", _compact
    )
    parser.add_argument(
        "--keep-last", type=_positive_int, default=None, metavar="N",
        help="drop visits older than the last N",
    )
    parser.add_argument("--dry-run", action="store_true", help="report, change nothing")


def _add_log(commands, common) -> None:
    _command(commands, "log", common, "list the visits of the store", _log)


def _add_verify(commands, common) -> None:
    parser = _command(commands, "verify", common, "check the store for damage", _verify)
    parser.add_argument("--visit", default=None, help="check only this visit")
    parser.add_argument(
        "--quick", action="store_true", help="check structure and sizes, not content ids"
    )


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
    from .store import Store

    store = Store.open_or_create(args.store)
    store.lock_timeout = args.lock_timeout
    started = time.perf_counter()
    record = store.append(
        args.src,
        message=args.message,
        excludes=args.exclude,
        checksum=args.checksum,
        strict=args.strict,
    )
    elapsed = time.perf_counter() - started
    store_bytes = store.disk_usage()
    if args.json:
        _print_json(_record_json(record) | {"store_bytes": store_bytes, "seconds": elapsed})
    elif not args.quiet:
        _stdout_console().print(
            f"visit {record.visit}: {record.added} added, {record.changed} changed, "
            f"{record.deleted} deleted; {_size(record.bytes_stored)} stored "
            f"(store {_size(store_bytes)}, {elapsed:.2f}s)",
            markup=False, highlight=False,
        )
    return EXIT_OK


def _materialize(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    started = time.perf_counter()
    record = store.materialize(
        args.visit, args.dest, force=args.force, devices=args.devices, paths=args.path
    )
    elapsed = time.perf_counter() - started
    if args.json:
        _print_json({"visit": record.visit, "dest": args.dest, "seconds": elapsed})
    elif not args.quiet:
        _stdout_console().print(
            f"visit {record.visit} materialized into {args.dest} "
            f"({record.entries} entries, {_size(record.tree_bytes)}, {elapsed:.2f}s)",
            markup=False, highlight=False,
        )
    return EXIT_OK


def _compact(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    store.lock_timeout = args.lock_timeout
    report = store.compact(keep_last=args.keep_last, dry_run=args.dry_run)
    if args.json:
        _print_json(report)
    elif not args.quiet:
        verb = "would keep" if args.dry_run else "kept"
        dropped = ", ".join(map(str, report["dropped"])) or "none"
        after = report.get("store_bytes_after")
        sizes = _size(report["store_bytes_before"])
        if after is not None:
            sizes += f" -> {_size(after)}"
        _stdout_console().print(
            f"{verb} visits {report['kept']}; dropped: {dropped}; store {sizes}",
            markup=False, highlight=False,
        )
    return EXIT_OK


def _log(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    records = store.visits()
    if args.json:
        _print_json({"visits": [_record_json(record) for record in records]})
        return EXIT_OK
    _print_log_table(records)
    return EXIT_OK


def _verify(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    problems = store.verify(args.visit, quick=args.quick)
    if args.json:
        _print_json({"ok": not problems, "problems": problems})
    else:
        console = _stderr_console()
        for problem in problems:
            console.print(f"damaged: {problem}", markup=False, highlight=False)
        if not problems and not args.quiet:
            _stdout_console().print("store verified: no problems found", markup=False)
    return EXIT_ERROR if problems else EXIT_OK


# -- output --------------------------------------------------------------------


def _record_json(record) -> dict[str, Any]:
    return {
        "visit": record.visit,
        "time": _iso_time(record.time_ns),
        "message": record.message,
        "kind": record.kind,
        "entries": record.entries,
        "tree_bytes": record.tree_bytes,
        "added": record.added,
        "changed": record.changed,
        "deleted": record.deleted,
        "metadata_only": record.metadata_only,
        "bytes_stored": record.bytes_stored,
        "layer_bytes": record.layer_bytes,
        "stored": record.stored,
    }


def _print_log_table(records) -> None:
    from rich.table import Table

    table = Table(title="visits", title_justify="left")
    for column in ("visit", "time", "message", "added", "changed", "deleted", "stored"):
        justify = "right" if column not in ("time", "message") else "left"
        table.add_column(column, justify=justify)
    for record in records:
        table.add_row(
            str(record.visit),
            _iso_time(record.time_ns),
            record.message,
            str(record.added),
            str(record.changed),
            str(record.deleted),
            _size(record.bytes_stored),
        )
    _stdout_console().print(table)


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=True) + "\n")


def _iso_time(time_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time_ns / 1e9))


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _stdout_console():
    from rich.console import Console

    return Console(soft_wrap=True)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _configure_logging(args) -> None:
    level = logging.WARNING
    if args.quiet:
        level = logging.ERROR
    elif args.verbose == 1:
        level = logging.INFO
    elif args.verbose >= 2 or args.debug:
        level = logging.DEBUG
    from rich.logging import RichHandler

    handler = RichHandler(
        console=_stderr_console(), show_time=False, show_path=False, markup=False
    )
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s")
