"""Restore timing after the last visit, with an exactness check for deltatar.

Restoring is the other half of the bargain: a delta chain is cheap to append
but a late visit needs every layer of its chain.  deltatar materializes the
first, the middle and the last visit, before and after ``compact``, and each
result is compared with a copy of the tree kept when that visit was
appended.  The floor is the cheapest restore of the last visit any tool can
offer: unpacking that visit's own full ``tar | zstd`` archive.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .measure import ToolFailed, compare_trees, disk_bytes, quote, run, run_shell
from .tools import Deltatar, FullArchives


def measure_restores(
    deltatar: Deltatar,
    full: FullArchives | None,
    copies: dict[int, Path],
    scratch: Path,
) -> dict[str, Any]:
    """Time every restore named in the module docstring; never raises ToolFailed."""
    results: dict[str, Any] = {"before_compact": _materialize_all(deltatar, copies, scratch)}

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
    try:
        timed = run(argv)
    except ToolFailed as error:
        return {"error": str(error)}
    return timed.summary() | _checked(expected, destination)


def _unpack_full(
    full: FullArchives, visit: int, expected: Path, scratch: Path
) -> dict[str, Any]:
    destination = scratch / "floor"
    destination.mkdir(parents=True)
    script = f"zstd -dc {quote(full.archive(visit))} | tar -xf - -C {quote(destination)}"
    try:
        timed = run_shell(script)
    except ToolFailed as error:
        return {"error": str(error)}
    return {"visit": visit} | timed.summary() | _checked(expected, destination)


def _checked(expected: Path, destination: Path) -> dict[str, Any]:
    """Compare a restore with the kept copy, then delete it to save disk."""
    differences = compare_trees(expected, destination)
    shutil.rmtree(destination, ignore_errors=True)
    return {
        "exact": not differences["content"],
        "content_differences": differences["content"][:20],
        "content_difference_count": len(differences["content"]),
        "mtime_difference_count": len(differences["mtime"]),
    }
