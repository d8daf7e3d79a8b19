"""Restore timing after the last visit, with an exactness check for every tool.

Restoring is the other half of the bargain: a delta chain is cheap to append
but a late visit needs every layer of its chain.  Every tool restores the
first, the middle and the last visit, deltatar before and after ``compact``,
and each result is compared with a copy of the tree kept when that visit was
appended.  The floor of each visit is the cheapest restore any tool can
offer: unpacking that visit's own full ``tar | zstd`` archive.

deltatar's restores and the floors run ``repeats`` times (three by default),
taking turns, and the median counts: they are what the restore target
compares, a restore takes about a second, and on a shared two-core machine a
single sample was seen to swing by half that.  The peers run once.  Only the
first result is compared; all are deleted, and the disk is synced after each
so that no restore pays for the one before it.
"""

from __future__ import annotations

import json
import os
import shutil
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
    compared = [deltatar] if full is None else [deltatar, full]
    outcomes = _restore_all(compared, copies, scratch, repeats)
    results: dict[str, Any] = {"before_compact": outcomes[deltatar.name]}
    if full is not None:
        results["floor"] = outcomes[full.name]

    peers = [tool for tool in tools if tool not in (deltatar, full)]
    results["peers"] = {
        tool.name: _restore_all([tool], copies, scratch, 1)[tool.name] for tool in peers
    }

    try:
        timed = run(deltatar.command("compact", "--store", deltatar.store, "--json"))
        results["compact"] = timed.summary() | {
            "report": json.loads(timed.stdout),
            "store_bytes_after": disk_bytes(deltatar.store),
        }
        results["after_compact"] = _restore_all(compared, copies, scratch, repeats)[
            deltatar.name
        ]
    except ToolFailed as error:
        results["compact"] = {"error": str(error)}
    return results


def _restore_all(
    tools: list[Tool], copies: dict[int, Path], scratch: Path, repeats: int
) -> dict[str, dict[int, dict[str, Any]]]:
    """Each kept visit restored by each tool that recorded it.

    The tools take turns run by run, so a restore and the floor it is
    compared with meet the same state of the machine and its disk.
    """
    outcomes: dict[str, dict[int, dict[str, Any]]] = {tool.name: {} for tool in tools}
    for visit, expected in sorted(copies.items()):
        runs: dict[str, list[Timed]] = {tool.name: [] for tool in tools}
        checked: dict[str, dict[str, Any]] = {}
        for tool in tools:
            if visit > tool.recorded:
                error = f"{tool.name} did not record visit {visit}"
                outcomes[tool.name][visit] = {"error": error}
        for attempt in range(repeats):
            for tool in tools:
                if visit in outcomes[tool.name]:
                    continue
                destination = scratch / f"{tool.name}_{visit}"
                try:
                    runs[tool.name].append(tool.restore(visit, destination))
                    if attempt == 0:
                        checked[tool.name] = _checked(expected, destination)
                except ToolFailed as error:
                    outcomes[tool.name][visit] = {"error": str(error)}
                _remove_settled(destination)
        for tool in tools:
            if visit not in outcomes[tool.name]:
                outcomes[tool.name][visit] = _summary(
                    runs[tool.name], checked[tool.name]
                )
    return outcomes


def _remove_settled(destination: Path) -> None:
    """Delete a restored tree and let the disk finish with it.

    Without the sync, the next restore would pay for writing back and
    freeing this one, and its time would depend on what ran before it.
    """
    shutil.rmtree(destination, ignore_errors=True)
    os.sync()


def _summary(runs: list[Timed], checked: dict[str, Any]) -> dict[str, Any]:
    """The median run's figures, every run's time and the exactness check."""
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
