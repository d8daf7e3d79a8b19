"""Demo: record a pipeline node that is visited again and again, then prove it.

A simulated node directory (``deltatar.simulate``) goes through a number of
visits.  After each one the real command line appends a visit to a store that
lives inside the node directory, exactly as a pipeline would use it.  For
comparison the demo works out what two naive approaches would have cost:

* a full compressed tar of the tree at every visit, and
* the nested variant that motivated deltatar, where each visit's archive is
  written into the node directory and so ends up inside every later archive.

Finally it materializes an early visit and the last one and checks that each is
identical to a copy of the tree taken right after that visit was appended:
paths, types, modes, symlink targets, bytes and mtimes to the nanosecond.

Run it through ``scripts/demo``, which prepares ``.venv`` first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyzstd
from rich import box
from rich.console import Console
from rich.table import Table

from deltatar import simulate

STORE_NAME = ".deltatar"
EARLY_VISIT = 2
ZSTD_LEVEL = 3

CAPTION = """\
stored / store: bytes_stored and store_bytes from `deltatar append --json`
naive full: tar | zstd -3 of the whole tree at every visit, summed
naive nested: every archive stays in the node dir, so archive N = zstd(tree N)
  + all earlier archives; the column sums all archives on disk (a lower bound,
  tar headers not counted)"""

# The table fits 80 columns; piped output keeps that width too.
console = Console(width=None if sys.stdout.isatty() else 80)
progress = Console(stderr=True)


@dataclass
class VisitRow:
    """One line of the results table."""

    visit: int
    tree_bytes: int
    changes: str
    bytes_stored: int
    store_bytes: int
    naive_full_total: int
    naive_nested_total: int


class CliFailed(Exception):
    """The deltatar command line exited non-zero or printed something unusable."""


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    workdir, is_temporary = _prepare_workdir(args.workdir)
    started = time.monotonic()

    try:
        rows = _run_visits(workdir, args)
        _print_table(rows, args)
        _print_summary(rows[-1])
        passed = _verify(workdir, sorted({EARLY_VISIT, args.visits}))
    except CliFailed as error:
        progress.print(f"[bold red]deltatar failed:[/] {error}", markup=True)
        progress.print(f"work directory kept at {workdir}")
        return 2

    console.print(f"finished in {time.monotonic() - started:.1f} s")
    if passed and is_temporary and not args.keep:
        shutil.rmtree(workdir)
    else:
        console.print(f"work directory: {workdir}")
    return 0 if passed else 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=12, help="visits to simulate")
    parser.add_argument("--scale", type=float, default=0.3, help="size multiplier")
    parser.add_argument("--seed", type=int, default=1, help="simulation seed")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="empty or missing directory to work in (default: a fresh temp dir)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir even on success"
    )
    args = parser.parse_args(argv)

    if args.visits < EARLY_VISIT:
        parser.error(f"--visits must be at least {EARLY_VISIT}")
    return args


def _prepare_workdir(requested: Path | None) -> tuple[Path, bool]:
    """Return the directory to work in and whether the demo created it."""
    if requested is None:
        return Path(tempfile.mkdtemp(prefix="deltatar-demo-")), True

    requested.mkdir(parents=True, exist_ok=True)
    if any(requested.iterdir()):
        sys.exit(f"demo: {requested} is not empty; pass an empty or new --workdir")
    return requested.resolve(), False


# --------------------------------------------------------------------------
# the visits


def _run_visits(workdir: Path, args: argparse.Namespace) -> list[VisitRow]:
    """Simulate each visit, append it with the CLI, and measure the naive ways."""
    node = workdir / "node"
    store = node / STORE_NAME
    rng = random.Random(args.seed)
    naive_full_total = 0
    naive_nested_total = 0
    rows = []

    for visit in range(1, args.visits + 1):
        progress.print(f"visit {visit}/{args.visits}: simulating and appending")
        simulate.apply_visit(node, visit, rng, args.scale)
        report = _append(node, store, visit)
        if visit in (EARLY_VISIT, args.visits):
            _save_reference(node, workdir / f"reference-{visit}")

        # Naive nested archives: archive N is written into the node directory
        # and stays there (pipelines move it under visit_N/), so archive N holds
        # the tree plus every earlier archive.  Those are already compressed, so
        # they enter archive N at their own size: A_N = C_N + (A_1 + ... +
        # A_{N-1}).  The column shows the disk they take together, A_1 + ... +
        # A_N, which doubles every visit.  Tar headers are left out, so these
        # figures are a lower bound.
        compressed_tree = _compressed_tree_size(node)
        naive_full_total += compressed_tree
        naive_nested_total += compressed_tree + naive_nested_total

        row = VisitRow(
            visit=visit,
            tree_bytes=simulate.tree_size(node, skip=(STORE_NAME,)),
            changes=f"+{report['added']} ~{report['changed']} -{report['deleted']}",
            bytes_stored=report["bytes_stored"],
            store_bytes=report["store_bytes"],
            naive_full_total=naive_full_total,
            naive_nested_total=naive_nested_total,
        )
        rows.append(row)
    return rows


def _append(node: Path, store: Path, visit: int) -> dict:
    """Append one visit with the real CLI and return its JSON report."""
    output = _deltatar(
        "append",
        str(node),
        "--store",
        str(store),
        "--message",
        f"visit {visit}",
        "--json",
    )
    try:
        report = json.loads(output)
    except json.JSONDecodeError as error:
        message = f"append --json printed no JSON ({error}): {output!r}"
        raise CliFailed(message) from None

    expected = {"visit", "added", "changed", "deleted", "bytes_stored", "store_bytes"}
    missing = expected - report.keys()
    if missing:
        raise CliFailed(f"append --json lacks {sorted(missing)}: {report}")
    if report["visit"] != visit:
        raise CliFailed(f"append reported visit {report['visit']}, expected {visit}")
    return report


def _deltatar(*arguments: str) -> str:
    """Run ``python -m deltatar`` and return its stdout; raise on failure."""
    command = [sys.executable, "-m", "deltatar", *arguments]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise CliFailed(
            f"{' '.join(command)}\nexit code {result.returncode}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )
    return result.stdout


def _save_reference(node: Path, target: Path) -> None:
    """Copy the tree, store left out, keeping modes, links and mtimes.

    The copy is checked against the live tree at once, so a later mismatch
    can only come from materialize and not from the copy.
    """
    ignore_store = shutil.ignore_patterns(STORE_NAME)
    shutil.copytree(node, target, symlinks=True, ignore=ignore_store)

    live = {k: v for k, v in _listing(node).items() if k.split("/")[0] != STORE_NAME}
    if live != _listing(target):
        raise RuntimeError(f"the reference copy {target} differs from {node}")


# --------------------------------------------------------------------------
# what naive archives would have cost


class _CompressedCounter:
    """A write-only file that zstd-compresses what it gets and keeps only a count."""

    def __init__(self) -> None:
        self._compressor = pyzstd.ZstdCompressor(ZSTD_LEVEL)
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(self._compressor.compress(data))
        return len(data)

    def finish(self) -> int:
        self.size += len(self._compressor.flush())
        return self.size


def _compressed_tree_size(node: Path) -> int:
    """Bytes of ``tar | zstd -3`` over the tree, the store left out."""
    counter = _CompressedCounter()
    with tarfile.open(fileobj=counter, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(node.iterdir()):
            if entry.name != STORE_NAME:
                tar.add(entry, arcname=entry.name)
    return counter.finish()


# --------------------------------------------------------------------------
# checking materialized visits


def _verify(workdir: Path, visits: list[int]) -> bool:
    """Materialize each visit with the CLI and compare it with its reference."""
    all_passed = True
    for visit in visits:
        target = workdir / f"materialized-{visit}"
        store = workdir / "node" / STORE_NAME
        _deltatar(
            "materialize", "--store", str(store), "--visit", str(visit), str(target)
        )

        differences = _compare(
            _listing(workdir / f"reference-{visit}"), _listing(target)
        )
        if differences:
            all_passed = False
            console.print(
                f"[bold red]FAIL[/] visit {visit}: {len(differences)} differences"
            )
            for line in differences[:15]:
                console.print(f"    {line}", markup=False, soft_wrap=True)
        else:
            console.print(f"[bold green]PASS[/] visit {visit} materializes identical")
    return all_passed


def _listing(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` with the metadata a visit must reproduce."""
    entries = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory, name)
            entries[path.relative_to(root).as_posix()] = _describe(path)
    return entries


def _describe(path: Path) -> tuple:
    """Type, full mode, mtime in ns and content: link target or sha256 of bytes."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        content = "-> " + os.readlink(path)
    elif stat.S_ISREG(info.st_mode):
        content = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        content = ""
    return (stat.filemode(info.st_mode), info.st_mtime_ns, content)


def _compare(expected: dict[str, tuple], actual: dict[str, tuple]) -> list[str]:
    """Readable differences between two listings, sorted by path."""
    differences = []
    for path in sorted(expected.keys() | actual.keys()):
        if path not in actual:
            differences.append(f"missing    {path}")
        elif path not in expected:
            differences.append(f"unexpected {path}")
        elif expected[path] != actual[path]:
            differences.append(
                f"differs    {path}: " + _field_changes(expected[path], actual[path])
            )
    return differences


def _field_changes(expected: tuple, actual: tuple) -> str:
    pairs = zip(("mode", "mtime_ns", "content"), expected, actual, strict=True)
    changes = [
        f"{name} {_short(want)} != {_short(got)}"
        for name, want, got in pairs
        if want != got
    ]
    return ", ".join(changes)


def _short(value: object) -> str:
    """A content hash cut to a readable prefix; anything else unchanged."""
    text = str(value)
    return text[:12] + "..." if len(text) == 64 else text


# --------------------------------------------------------------------------
# output


def _print_table(rows: list[VisitRow], args: argparse.Namespace) -> None:
    title = (
        f"deltatar on a simulated pipeline node: {args.visits} visits, "
        f"scale {args.scale}, seed {args.seed}"
    )
    # Short headers and no outer padding keep the table within 80 columns;
    # the caption says what each column means.
    table = Table(
        title=title,
        caption=CAPTION,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    headers = (
        "visit",
        "tree",
        "+add ~chg -del",
        "stored",
        "store",
        "naive full",
        "naive nested",
    )
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)

    for row in rows:
        table.add_row(
            str(row.visit),
            _human(row.tree_bytes),
            row.changes,
            _human(row.bytes_stored),
            _human(row.store_bytes),
            _human(row.naive_full_total),
            _human(row.naive_nested_total),
        )
    console.print(table)


def _print_summary(last: VisitRow) -> None:
    """One line comparing the store with the two naive ways after the last visit."""
    store = max(last.store_bytes, 1)
    console.print(
        f"after {last.visit} visits the store takes {_human(last.store_bytes)}: "
        f"{last.naive_full_total / store:.1f}x less than naive full archives, "
        f"{last.naive_nested_total / store:,.0f}x less than naive nested ones"
    )


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


if __name__ == "__main__":
    raise SystemExit(main())
