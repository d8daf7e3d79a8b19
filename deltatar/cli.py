"""The ``deltatar`` command line: argument parsing and all terminal output.

The library never prints; this module turns its results into one line or a
table for people, or one JSON document on stdout for scripts (``--json``).
Errors the user can act on become one line on stderr and exit status 1; bad
usage exits 2; anything else is a bug and keeps its traceback.
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
    "stats": "example: deltatar stats --store ./node/.deltatar --json",
    "config": "example: deltatar config --store ./node/.deltatar level 6",
    "ls": "example: deltatar ls --store ./node/.deltatar --visit -2 worktree",
    "cat": "example: deltatar cat --store ./node/.deltatar --visit 3 logs/run.log",
    "diff": "example: deltatar diff --store ./node/.deltatar 3 -1 --stat",
    "show": "example: deltatar show --store ./node/.deltatar 7",
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
    _apply_object_store_options(args)
    try:
        return args.handler(args)
    except DeltatarError as error:
        if args.debug:
            raise
        _stderr_console().print(
            f"deltatar: error: {error}", markup=False, highlight=False
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        _stderr_console().print("deltatar: interrupted", markup=False)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatar",
        description="Store each visit of a directory as only what changed.",
    )
    parser.add_argument(
        "--version", action="version", version=f"deltatar {__version__}"
    )
    parser.set_defaults(command=None)
    common = _common_options()
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_append(commands, common)
    _add_materialize(commands, common)
    _add_compact(commands, common)
    _add_log(commands, common)
    _add_verify(commands, common)
    _add_stats(commands, common)
    _add_config(commands, common)
    _add_ls(commands, common)
    _add_cat(commands, common)
    _add_diff(commands, common)
    _add_show(commands, common)
    return parser


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        default=os.environ.get(STORE_VARIABLE),
        help=f"the store's directory or s3://bucket/prefix URL (default: ${STORE_VARIABLE})",
    )
    common.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="S3 endpoint of an s3:// store (default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)",
    )
    common.add_argument(
        "--region",
        help="region of an s3:// store (default: $AWS_REGION or $AWS_DEFAULT_REGION)",
    )
    common.add_argument("--json", action="store_true", help="print JSON on stdout")
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="say more (-vv: debug)"
    )
    common.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for another writer (default: 60)",
    )
    common.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars (default: when stderr is a terminal)",
    )
    return common


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
    commands, name: str, common, summary: str, handler
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        parents=[common],
        help=summary,
        description=summary,
        epilog=EPILOG[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(command=name, handler=handler)
    return parser


def _add_append(commands, common) -> None:
    parser = _command(
        commands, "append", common, "record SRC as the next visit", _append
    )
    parser.add_argument("src", metavar="SRC", help="the directory to record")
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


def _add_materialize(commands, common) -> None:
    parser = _command(
        commands,
        "materialize",
        common,
        "rebuild the exact tree of a visit",
        _materialize,
    )
    parser.add_argument(
        "dest", metavar="DEST", help="directory to write (new or empty)"
    )
    parser.add_argument(
        "--visit", default=None, help="number, -1 for latest, or message"
    )
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
        commands, "compact", common, "squash the chain into a new base", _compact
    )
    parser.add_argument(
        "--keep-last",
        type=_positive_int,
        default=None,
        metavar="N",
        help="drop visits older than the last N",
    )
    parser.add_argument("--dry-run", action="store_true", help="report, change nothing")


def _add_log(commands, common) -> None:
    _command(commands, "log", common, "list the visits of the store", _log)


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
    parser.add_argument(
        "--visit", default=None, help="number, -1 for latest, or message"
    )


def _add_cat(commands, common) -> None:
    parser = _command(
        commands, "cat", common, "write one file of a visit to stdout", _cat
    )
    parser.add_argument("path", metavar="PATH", help="the file's path in the visit")
    parser.add_argument(
        "--visit", default=None, help="number, -1 for latest, or message"
    )


def _add_diff(commands, common) -> None:
    parser = _command(commands, "diff", common, "compare two visits", _diff)
    parser.add_argument("first", metavar="A", help="the older visit")
    parser.add_argument("second", metavar="B", help="the newer visit")
    parser.add_argument(
        "path", nargs="?", metavar="PATH", help="compare only below this path"
    )
    parser.add_argument("--stat", action="store_true", help="print counts only")


def _add_show(commands, common) -> None:
    parser = _command(commands, "show", common, "describe one visit in detail", _show)
    parser.add_argument(
        "visit", metavar="VISIT", help="number, -1 for latest, or message"
    )


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
            _record_json(record) | {"store_bytes": store_bytes, "seconds": elapsed}
        )
    elif not args.quiet:
        _stdout_console().print(
            f"visit {record.visit}: {record.added} added, {record.changed} changed, "
            f"{record.deleted} deleted; {_size(record.bytes_stored)} stored "
            f"(store {_size(store_bytes)}, {elapsed:.2f}s)",
            markup=False,
            highlight=False,
        )
    return EXIT_OK


def _materialize(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    started = time.perf_counter()
    with _progress_bar(args, "materialize") as progress:
        record = store.materialize(
            args.visit,
            args.dest,
            force=args.force,
            devices=args.devices,
            paths=args.path,
            progress=progress,
        )
    elapsed = time.perf_counter() - started
    if args.json:
        _print_json({"visit": record.visit, "dest": args.dest, "seconds": elapsed})
    elif not args.quiet:
        _stdout_console().print(
            f"visit {record.visit} materialized into {args.dest} "
            f"({record.entries} entries, {_size(record.tree_bytes)}, {elapsed:.2f}s)",
            markup=False,
            highlight=False,
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
            markup=False,
            highlight=False,
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


def _stats(args) -> int:
    from .browse import store_stats
    from .store import Store

    stats = store_stats(Store.open(args.store))
    if args.json:
        _print_json(stats)
        return EXIT_OK
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
    console.print(
        f"store: {_size(total['store_bytes'])}\n"
        f"per-visit full archives: about {_size(total['naive_compressed_estimate'])}"
        f" compressed, {_size(total['naive_full_bytes'])} as plain tar"
        + (f"\nstore / full archives: {ratio:.3f}" if ratio else ""),
        markup=False,
        highlight=False,
    )
    return EXIT_OK


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
        for key, value in shown.items():
            _stdout_console().print(f"{key} = {value}", markup=False, highlight=False)
    return EXIT_OK


def _ls(args) -> int:
    from .browse import list_entries
    from .store import Store

    record, entries = list_entries(Store.open(args.store), args.visit, args.path)
    if args.json:
        _print_json(
            {"visit": record.visit, "entries": [_entry_json(e) for e in entries]}
        )
        return EXIT_OK
    lines = [
        f"{_mode_text(e)} {e.size:>12} {_iso_time(e.mtime_ns)} {_shown_path(e)}"
        for e in entries
    ]
    sys.stdout.write("".join(line + "\n" for line in lines))
    return EXIT_OK


def _cat(args) -> int:
    from .browse import read_file
    from .store import Store

    out = sys.stdout.buffer
    for chunk in read_file(Store.open(args.store), args.visit, args.path):
        out.write(chunk)
    out.flush()
    return EXIT_OK


def _diff(args) -> int:
    from .browse import diff_visits
    from .store import Store

    changes = diff_visits(Store.open(args.store), args.first, args.second, args.path)
    counts: dict[str, int] = {}
    for change in changes:
        counts[change.kind] = counts.get(change.kind, 0) + 1
    if args.json:
        listing = (
            []
            if args.stat
            else [{"change": c.kind, **_path_json(c.path)} for c in changes]
        )
        _print_json({"counts": counts, "changes": listing})
        return EXIT_OK
    if not args.stat:
        marks = {
            "added": "+",
            "deleted": "-",
            "changed": "M",
            "mode": "m",
            "type": "T",
            "touched": "t",
        }
        lines = [f"{marks[c.kind]} {_escape(c.path)}" for c in changes]
        sys.stdout.write("".join(line + "\n" for line in lines))
    summary = (
        ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no changes"
    )
    (_stdout_console() if args.stat else _stderr_console()).print(
        summary, markup=False, highlight=False
    )
    return EXIT_OK


def _show(args) -> int:
    from .store import Store

    store = Store.open(args.store)
    with store.backend.reader_guard():
        record = store.read_head().resolve(args.visit, store.location)
    document = _record_json(record) | {
        "layer": record.layer,
        "manifest": record.manifest,
        "tree_digest": record.tree_digest,
    }
    if args.json:
        _print_json(document)
        return EXIT_OK
    console = _stdout_console()
    for key, value in document.items():
        shown = (
            _size(value) if key.endswith("bytes") and isinstance(value, int) else value
        )
        if key == "stored":
            shown = ", ".join(
                f"{k} {_size(v) if k.endswith('bytes') else v}"
                for k, v in value.items()
            )
        console.print(f"{key:>14}: {shown}", markup=False, highlight=False)
    return EXIT_OK


# -- output --------------------------------------------------------------------


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


def _path_json(path: str) -> dict[str, str]:
    raw = os.fsencode(path)
    try:
        return {"path": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path_hex": raw.hex(), "path": raw.decode("utf-8", "backslashreplace")}


def _entry_json(entry) -> dict[str, Any]:
    document = _path_json(entry.path) | {
        "type": entry.type,
        "mode": entry.mode,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "content_id": entry.content_id,
    }
    if entry.target is not None:
        document["target"] = _escape(entry.target)
    if entry.hardlink_of is not None:
        document["hardlink_of"] = _escape(entry.hardlink_of)
    return document


@contextlib.contextmanager
def _progress_bar(args, label: str):
    """A transient rich progress bar on stderr, when one is wanted."""
    wanted = args.progress
    if wanted is None:
        wanted = sys.stderr.isatty() and not args.quiet and not args.json
    if not wanted:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_stderr_console(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


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
    from rich.text import Text

    table = Table(title="visits", title_justify="left", box=None, pad_edge=False)
    table.add_column("visit", justify="right", no_wrap=True)
    table.add_column("time", no_wrap=True)
    table.add_column("message", overflow="ellipsis", no_wrap=True, max_width=22)
    for column in ("added", "changed", "deleted", "stored"):
        table.add_column(column, justify="right", no_wrap=True)
    for record in records:
        table.add_row(
            str(record.visit),
            _iso_time(record.time_ns, zone=False),
            Text(_escape(record.message)),
            str(record.added),
            str(record.changed),
            str(record.deleted),
            _size(record.bytes_stored),
        )
    _stdout_console().print(table)


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=True) + "\n")


def _iso_time(time_ns: int, zone: bool = True) -> str:
    layout = "%Y-%m-%d %H:%M:%S%z" if zone else "%Y-%m-%d %H:%M:%S"
    return time.strftime(layout, time.localtime(time_ns / 1e9))


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
