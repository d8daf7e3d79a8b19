"""Restore timing after the last visit, with an exactness check for deltatar.

Restoring is the other half of the bargain: a delta chain is cheap to append
but a late visit needs every layer of its chain.  deltatar materializes the
first, the middle and the last visit, before and after ``compact``, and each
result is compared with a copy of the tree kept when that visit was
appended.  The floor is the cheapest restore of the last visit any tool can
offer: unpacking that visit's own full ``tar | zstd`` archive.

Each restore runs three times and the median counts: a restore takes about
a second, and on a shared two-core machine a single sample was seen to swing
by half that.  Only the first result is compared; all are deleted.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .measure import (
    Timed,
    ToolFailed,
    compare_trees,
    disk_bytes,
    quote,
    run,
    run_shell,
)
from .tools import Deltatar, FullArchives

REPEATS = 3


def measure_restores(
    deltatar: Deltatar,
    full: FullArchives | None,
    copies: dict[int, Path],
    scratch: Path,
) -> dict[str, Any]:
    """Time every restore named in the module docstring; never raises ToolFailed."""
    results: dict[str, Any] = {
        "before_compact": _materialize_all(deltatar, copies, scratch)
    }

    try:
        timed = run(deltatar.command("compact", "--store", deltatar.store, "--json"))
        results["compact"] = timed.summary() | {
            "report": json.loads(timed.stdout),
            "store_bytes_after": disk_bytes(deltatar.store),
        }
        results["after_compact"] = _materialize_all(deltatar, copies, scratch)
    except ToolFailed as error:
        results["compact"] = {"error": str(error)}

    if full is not None and full.started:
        results["floor"] = _unpack_full(full, max(copies), copies[max(copies)], scratch)
    return results


def _materialize_all(
    deltatar: Deltatar, copies: dict[int, Path], scratch: Path
) -> dict[int, dict[str, Any]]:
    return {
        visit: _materialize(deltatar, visit, expected, scratch / f"visit_{visit}")
        for visit, expected in sorted(copies.items())
    }


def _materialize(
    deltatar: Deltatar, visit: int, expected: Path, destination: Path
) -> dict[str, Any]:
    argv = deltatar.command(
        "materialize", "--store", deltatar.store, "--visit", str(visit), destination
    )
    return _repeated(lambda: run(argv), expected, destination)


def _unpack_full(
    full: FullArchives, visit: int, expected: Path, scratch: Path
) -> dict[str, Any]:
    destination = scratch / "floor"
    script = (
        f"mkdir -p {quote(destination)} && zstd -dc {quote(full.archive(visit))} "
        f"| tar -xf - -C {quote(destination)}"
    )
    return {"visit": visit} | _repeated(
        lambda: run_shell(script), expected, destination
    )


def _repeated(
    restore: Callable[[], Timed], expected: Path, destination: Path
) -> dict[str, Any]:
    """Run a restore REPEATS times; the median run's figures, the first one checked."""
    runs, checked = [], {}
    try:
        for attempt in range(REPEATS):
            runs.append(restore())
            if attempt == 0:
                checked = _checked(expected, destination)
            shutil.rmtree(destination, ignore_errors=True)
    except ToolFailed as error:
        return {"error": str(error)}

    median = sorted(runs, key=lambda timed: timed.wall_seconds)[len(runs) // 2]
    seconds = [round(timed.wall_seconds, 4) for timed in runs]
    return median.summary() | {"all_seconds": seconds} | checked


def _checked(expected: Path, destination: Path) -> dict[str, Any]:
    """Compare a restore with the copy kept when its visit was appended."""
    differences = compare_trees(expected, destination)
    return {
        "exact": not differences["content"],
        "content_differences": differences["content"][:20],
        "content_difference_count": len(differences["content"]),
        "mtime_difference_count": len(differences["mtime"]),
    }
