"""Restore timing after the last visit, with an exactness check for every tool.

Restoring is the other half of the bargain: a delta chain is cheap to append
but a late visit needs every layer of its chain.  Every tool restores the
first, the middle and the last visit, deltatar before and after ``compact``,
and each result is compared with a copy of the tree kept when that visit was
appended.  The floor of each visit is the cheapest restore any tool can
offer: unpacking that visit's own full ``tar | zstd`` archive.

deltatar's restores and the floors run ``repeats`` times (three by default)
and the median counts: they are what the restore target compares, a restore
takes about a second, and on a shared two-core machine a single sample was
seen to swing by half that.  The peers run once.  Only the first result is compared; all are
deleted.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .measure import Timed, ToolFailed, compare_trees, disk_bytes, run
from .tools import Deltatar, FullArchives, Tool


def measure_restores(
    tools: list[Tool], copies: dict[int, Path], scratch: Path, repeats: int
) -> dict[str, Any]:
    """Time every restore named in the module docstring; never raises ToolFailed."""
    deltatar = next(tool for tool in tools if isinstance(tool, Deltatar))
    full = next((tool for tool in tools if isinstance(tool, FullArchives)), None)
    results: dict[str, Any] = {
        "before_compact": _restore_all(deltatar, copies, scratch, repeats)
    }
    if full is not None:
        results["floor"] = _restore_all(full, copies, scratch, repeats)

    peers = [tool for tool in tools if tool not in (deltatar, full)]
    results["peers"] = {
        tool.name: _restore_all(tool, copies, scratch, 1) for tool in peers
    }

    try:
        timed = run(deltatar.command("compact", "--store", deltatar.store, "--json"))
        results["compact"] = timed.summary() | {
            "report": json.loads(timed.stdout),
            "store_bytes_after": disk_bytes(deltatar.store),
        }
        results["after_compact"] = _restore_all(deltatar, copies, scratch, repeats)
    except ToolFailed as error:
        results["compact"] = {"error": str(error)}
    return results


def _restore_all(
    tool: Tool, copies: dict[int, Path], scratch: Path, repeats: int
) -> dict[int, dict[str, Any]]:
    """Each kept visit restored by ``tool``, if the tool recorded it."""
    outcomes = {}
    for visit, expected in sorted(copies.items()):
        if visit > tool.recorded:
            outcomes[visit] = {"error": f"{tool.name} did not record visit {visit}"}
            continue
        destination = scratch / f"{tool.name}_{visit}"
        outcomes[visit] = _repeated(
            lambda v=visit, d=destination: tool.restore(v, d),
            expected,
            destination,
            repeats,
        )
    return outcomes


def _repeated(
    restore: Callable[[], Timed], expected: Path, destination: Path, repeats: int
) -> dict[str, Any]:
    """Run a restore ``repeats`` times; the median run's figures, the first checked."""
    runs, checked = [], {}
    try:
        for attempt in range(repeats):
            runs.append(restore())
            if attempt == 0:
                checked = _checked(expected, destination)
            shutil.rmtree(destination, ignore_errors=True)
    except ToolFailed as error:
        shutil.rmtree(destination, ignore_errors=True)
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
