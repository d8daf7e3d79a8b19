"""Everything the command line shows: tables, charts, progress bars, lines.

rich is imported only where something is drawn with it, so ``deltatar
--version`` and scripted runs stay fast.  Text the terminal cannot encode is
escaped or drawn in ASCII, never fatal: reporting must not fail on what it
reports.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from typing import Any

from .. import documents

# Progress bars appear only for work that lasts longer than this.
PROGRESS_DELAY = 1.0


DIFF_MARKS = {
    "added": "+",
    "deleted": "-",
    "changed": "M",
    "type": "T",
    "mode": "m",
    "touched": "t",
}


def change_line(change) -> str:
    line = f"{DIFF_MARKS[change.kind]} {escape(change.path)}"
    if change.kind == "mode":
        line += f" ({change.old.mode:o} -> {change.new.mode:o})"
    elif change.kind == "type":
        line += f" ({change.old.type} -> {change.new.type})"
    return line


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


def print_log(records, totals: list[int], store_bytes: int) -> None:
    """The visits as a table, with a bar of the store's size after each.

    Every column but the message keeps its full width; the message takes
    what is left of the terminal and is cut with an ellipsis.
    """
    from rich.table import Table
    from rich.text import Text

    if not records:
        print_out("no visits yet; 'deltatar append SRC --store S' records one")
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
            _printable(escape(record.message)) or "-",
            str(record.added),
            str(record.changed),
            str(record.deleted),
            human_size(record.bytes_stored),
            human_size(total),
            _bar(total / biggest, CHART_WIDTH),
        )
        for record, total in zip(records, totals, strict=True)
    ]
    console = stdout_console()
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
    print_out(
        f"{len(records)} visits, store {human_size(store_bytes)} on disk; "
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


def print_visit(detail, document: dict[str, Any]) -> None:
    record = detail.record
    stored = record.stored
    lines = [
        f"visit {record.visit}  {_long_time(record.time_ns)}  ({record.kind} layer)",
        f"message   {escape(record.message) or '-'}",
        f"tree      {record.entries} entries, {human_size(record.tree_bytes)} in files",
        f"changes   {counts_text(record)}"
        + (f" ({record.metadata_only} metadata only)" if record.metadata_only else ""),
        f"stored    {human_size(record.bytes_stored)}: layer {human_size(record.layer_bytes)}"
        f", manifest {human_size(record.manifest_bytes)}",
        f"new       {human_size(stored.get('new_bytes', 0))} of file content "
        f"({human_size(stored.get('tail_bytes', 0))} as tails, "
        f"{human_size(stored.get('block_bytes', 0))} as blocks)",
        f"patched   {human_size(stored.get('patch_source_bytes', 0))} of edited files",
        f"dedup     {human_size(stored.get('deduplicated_bytes', 0))} already stored",
        f"chain     base visit {detail.base}"
        + (f", previous visit {detail.previous}" if detail.previous else ""),
        f"layer     {record.layer}",
        f"manifest  {record.manifest}",
    ]
    lines += _show_changes(detail)
    print_out("\n".join(lines))


def _show_changes(detail) -> list[str]:
    if detail.previous is None:
        return []
    changes = detail.changes
    lines = [f"since visit {detail.previous}:" + ("" if changes else " no changes")]
    lines += [f"  {change_line(change)}" for change in changes[:SHOW_PATHS]]
    if len(changes) > SHOW_PATHS:
        lines.append(
            f"  ... and {len(changes) - SHOW_PATHS} more "
            f"(deltatar diff {detail.previous} {detail.record.visit})"
        )
    return lines


def counts_text(record) -> str:
    return f"{record.added} added, {record.changed} changed, {record.deleted} deleted"


def escape(path: str) -> str:
    """Show a path that may hold undecodable bytes without ever failing to print."""
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n")


def shown_path(entry) -> str:
    text = escape(entry.path)
    if entry.type == "dir":
        return text + "/"
    if entry.type == "symlink":
        return f"{text} -> {escape(entry.target or '')}"
    return text


def mode_text(entry) -> str:
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
def progress_bar(args, label: str):
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
            return Text(f"{human_size(speed)}/s" if speed else "", style="green")

    columns = (
        TextColumn("{task.description}", style="bold"),
        BarColumn(bar_width=12),
        TextColumn("{task.fields[files]}"),
        DownloadColumn(binary_units=True),
        Rate(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=stderr_console(), transient=True)


def print_json(document: dict[str, Any]) -> None:
    """One JSON document on stdout; its first field is the schema version."""
    versioned = {"schema_version": documents.SCHEMA_VERSION} | document
    sys.stdout.write(json.dumps(versioned, indent=2, ensure_ascii=True) + "\n")
    sys.stdout.flush()


def print_out(text: str, end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def print_err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def write_lines(lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    encoding = sys.stdout.encoding or "utf-8"
    write_bytes([text.encode(encoding, errors="backslashreplace")])


def write_bytes(chunks) -> None:
    """Write straight to stdout's descriptor, every byte or an error.

    A buffered write that the reader cuts short (``| head -c 10``) reports
    the bytes it managed and drops the rest without an error; ``os.write``
    raises BrokenPipeError instead, so a closed pipe always exits 141.
    """
    sys.stdout.flush()
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        # stdout replaced by an object without a descriptor (an embedding).
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        return
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(descriptor, view) :]


def _long_time(time_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(time_ns / 1e9))


def short_time(time_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(time_ns / 1e9))


def human_size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def stdout_console():
    from rich.console import Console

    return Console(soft_wrap=False)


@functools.cache
def stderr_console():
    """One console for stderr, shared by logs and progress bars.

    Sharing it lets rich print a log line above a live bar instead of
    gluing it onto the bar's line.
    """
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)
