"""One handler a command: call the library, hand the result to the output.

Each handler takes the parsed options and returns the exit status.  With
``--json`` a handler prints one document (docs/json.md) and nothing else.
"""

from __future__ import annotations

import time
from typing import Any

from .. import documents
from ..errors import DeltatarError
from .output import (
    DIFF_MARKS,
    PREVIEW_PATHS,
    change_line,
    counts_text,
    escape,
    human_size,
    mode_text,
    print_err,
    print_json,
    print_log,
    print_out,
    print_visit,
    progress_bar,
    short_time,
    shown_path,
    stdout_console,
    write_bytes,
    write_lines,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141


def run_append(args) -> int:
    from pathlib import Path

    from ..append import check_source
    from ..scan import exclusion_spec
    from ..store import Store

    if args.dry_run:
        return _append_dry_run(args)
    check_source(Path(args.src))
    # A pattern that does not parse is refused before a store is created.
    exclusion_spec(Path(args.src), args.exclude)
    store = Store.open_or_create(args.store)
    store.lock_timeout = args.lock_timeout
    started = time.perf_counter()
    with progress_bar(args, "append") as progress:
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
        print_json(
            documents.visit_record(record)
            | {"store_bytes": store_bytes, "seconds": elapsed}
        )
    elif not args.quiet:
        print_out(
            f"visit {record.visit}: {counts_text(record)}; "
            f"{human_size(record.bytes_stored)} stored, store {human_size(store_bytes)}"
        )
    return EXIT_OK


def _append_dry_run(args) -> int:
    from pathlib import Path

    from ..errors import StoreNotFound
    from ..preview import preview_append
    from ..store import Store

    try:
        store = Store.open(args.store)
    except StoreNotFound:
        store = None  # the real append would create it; a dry run creates nothing
    with progress_bar(args, "dry run") as progress:
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
        print_json(documents.preview(preview))
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
    lines = [f"{mark} {escape(path)}" for mark, path in shown]
    if len(shown) < len(marked):
        lines.append(f"... and {len(marked) - len(shown)} more (-v lists all)")
    only = f" ({len(metadata)} metadata only)" if metadata else ""
    lines += [
        f"dry run: visit {preview.visit} would record",
        f"  {len(preview.added)} added, {len(preview.changed)} changed{only}, "
        f"{len(preview.deleted)} deleted",
        f"  {human_size(preview.new_bytes)} of new content, "
        f"{human_size(preview.deduplicated_bytes)} already stored",
        f"  about {human_size(preview.estimate_bytes)} to store",
        "nothing was written",
    ]
    lines += [f"warning: {problem}" for problem in preview.problems]
    print_out("\n".join(lines))


def run_materialize(args) -> int:
    from ..store import Store

    store = Store.open(args.store)
    started = time.perf_counter()
    with progress_bar(args, "materialize") as progress:
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
        print_json(
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
        print_out(
            f"visit {done.visit}{part} materialized into {args.dest} "
            f"({done.entries} entries, {human_size(done.tree_bytes)}, {elapsed:.2f}s)"
        )
    return EXIT_OK


def run_compact(args) -> int:
    from ..store import Store

    store = Store.open(args.store)
    store.lock_timeout = args.lock_timeout
    report = store.compact(
        keep_last=args.keep_last, dry_run=args.dry_run, auto=args.auto
    )
    if args.json:
        print_json(report)
    elif not args.quiet:
        print_out(_compact_line(report))
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
            f"({human_size(report['merged_bytes'])})"
        )
    if report["rebase"]:
        parts.append("new base for the latest visit")
    sizes = human_size(report["store_bytes_before"])
    if "store_bytes_after" in report:
        sizes += f" -> {human_size(report['store_bytes_after'])}"
        sizes += f", wrote {human_size(report['bytes_written'])}"
    elif "freed_layer_bytes" in report:
        sizes += (
            f", frees {human_size(report['freed_layer_bytes'])} of layers and "
            f"carries about {human_size(report['carried_bytes'])}"
        )
    else:
        sizes += f", needs up to {human_size(report['bytes_needed'])} free"
    parts.append(f"store {sizes}")
    return "; ".join(parts)


def run_log(args) -> int:
    from ..store import Store

    store = Store.open(args.store)
    records = store.visits()
    totals = _running_totals(records)
    if args.json:
        rows = [
            documents.visit_record(record) | {"cumulative_bytes": total}
            for record, total in zip(records, totals, strict=True)
        ]
        print_json({"visits": rows, "store_bytes": store.disk_usage()})
        return EXIT_OK
    if not args.quiet:
        print_log(records, totals, store.disk_usage())
    return EXIT_OK


def _running_totals(records) -> list[int]:
    totals, total = [], 0
    for record in records:
        total += record.bytes_stored
        totals.append(total)
    return totals


def run_verify(args) -> int:
    from ..store import Store

    store = Store.open(args.store)
    problems = store.verify(args.visit, quick=args.quick)
    if args.json:
        print_json({"ok": not problems, "problems": problems})
    else:
        for problem in problems:
            print_err(f"damaged: {problem}")
        if not problems and not args.quiet:
            print_out("store verified: no problems found")
    return EXIT_ERROR if problems else EXIT_OK


def run_stats(args) -> int:
    from ..browse import store_stats
    from ..store import Store

    stats = store_stats(Store.open(args.store))
    if args.json:
        print_json(stats)
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
            human_size(row["tree_bytes"]),
            human_size(row["bytes_stored"]),
            human_size(row["new_bytes"]),
            human_size(row["tail_bytes"]),
            human_size(row["patch_source_bytes"]),
            human_size(row["block_bytes"]),
            human_size(row["deduplicated_bytes"]),
        )
    console = stdout_console()
    console.print(table)
    total = stats["total"]
    ratio = total["store_to_naive_compressed"]
    print_out(
        f"store: {human_size(total['store_bytes'])}\n"
        f"per-visit full archives: about {human_size(total['naive_compressed_estimate'])}"
        f" compressed, {human_size(total['naive_full_bytes'])} as plain tar"
        + (f"\nstore / full archives: {ratio:.3f}" if ratio else "")
    )


def run_config(args) -> int:
    from ..store import Store

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
        print_json(shown)
    else:
        print_out(
            "\n".join(
                f"{key} = {'none' if value is None else value}"
                for key, value in shown.items()
            )
        )
    return EXIT_OK


def run_ls(args) -> int:
    from ..browse import list_entries
    from ..store import Store

    record, entries = list_entries(Store.open(args.store), args.visit, args.path)
    if args.json:
        print_json(
            {"visit": record.visit, "entries": [documents.entry(e) for e in entries]}
        )
        return EXIT_OK
    width = max((len(str(e.size)) for e in entries), default=1)
    lines = [
        f"{mode_text(e)} {e.size:>{width}} {short_time(e.mtime_ns)} {shown_path(e)}"
        for e in entries
    ]
    write_lines(lines)
    return EXIT_OK


def run_cat(args) -> int:
    from ..browse import read_file
    from ..manifest import visit_path
    from ..store import Store

    store = Store.open(args.store)
    chunks = read_file(store, args.visit, args.path)
    if args.json:
        import base64

        data = b"".join(chunks)
        visit = store.read_head().resolve(args.visit, store.location).visit
        print_json(
            {
                "visit": visit,
                "path": documents.path_text(visit_path(args.path)),
                "size": len(data),
                "encoding": "base64",
                "data": base64.b64encode(data).decode("ascii"),
            }
        )
        return EXIT_OK
    write_bytes(chunks)
    return EXIT_OK


def run_diff(args) -> int:
    from ..browse import diff_visits
    from ..store import Store

    store = Store.open(args.store)
    first, second, changes = diff_visits(store, args.first, args.second, args.path)
    counts = {kind: 0 for kind in DIFF_MARKS}
    for change in changes:
        counts[change.kind] += 1
    if args.json:
        listing = [] if args.stat else [documents.change(c) for c in changes]
        print_json({"from": first, "to": second, "counts": counts, "changes": listing})
        return EXIT_OK
    if not args.stat:
        write_lines([change_line(change) for change in changes])
    if not args.quiet or args.stat:
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        verdict = summary or "no changes"
        target = print_out if args.stat else print_err
        target(f"visit {first} -> {second}: {verdict}")
    return EXIT_OK


def run_show(args) -> int:
    from ..browse import describe_visit
    from ..store import Store

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
        print_json(document)
        return EXIT_OK
    if not args.quiet:
        print_visit(detail, document)
    return EXIT_OK


def _change_counts(changes) -> dict[str, int]:
    counts = {kind: 0 for kind in DIFF_MARKS}
    for change in changes:
        counts[change.kind] += 1
    return counts


def run_completion(args) -> int:
    import shtab

    # Imported here: the parser names this module's handlers.
    from .parser import build_parser

    print_out(shtab.complete(build_parser(), shell=args.shell), end="")
    return EXIT_OK
