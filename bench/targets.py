"""deltatar's targets, and how one workload's measurements meet them.

Every target is a ratio of two figures from the same run, so that a slow or
busy machine slows both sides alike:

- append: each incremental append (visits 2 on) at most 1.5 times its floor
  (stat of the tree, reading and compressing only the new bytes; see
  ``bench.limits``), and at least 3 times faster than restic and than borg.
  Ratios are of the sums over visits 2 on, so one noisy visit cannot decide;
- restore: every restored visit, before compaction, at most 1.5 times the
  ``zstd -dc | tar -x`` floor of that visit's own tree, and the first, middle
  and last visit about equal: their ratios to their floors at most 1.25
  apart.  The target is
  stated for a store of 50 visits;
- memory: peak RSS of append and materialize under 300 MB on a tree of at
  least 200,000 files;
- size: the smallest store of all tools (judged on attractor and on the real
  release history), and, as before, at most 1.25 times the ideal and at most
  half of GNU tar's incremental chain.
"""

from __future__ import annotations

from typing import Any

APPEND_FLOOR_FACTOR = 1.5
APPEND_PEER_FACTOR = 3.0
RESTORE_FLOOR_FACTOR = 1.5
RESTORE_SPREAD_FACTOR = 1.25
RESTORE_VISITS = 50
RSS_LIMIT_BYTES = 300 * 10**6
RSS_FILES = 200_000
SMALLEST_WORKLOADS = ("attractor", "releases")
IDEAL_FACTOR = 1.25
TAR_INCREMENTAL_FACTOR = 0.5


def cumulative_ideal(rows: list[dict[str, Any]]) -> list[int | None]:
    """The ideal store size after each visit: the running sum of visit prices."""
    total, sums = 0, []
    for row in rows:
        price = (row.get("ideal") or {}).get("ideal_bytes")
        total = None if price is None or total is None else total + price
        sums.append(total)
    return sums


def store_after(row: dict[str, Any], tool: str) -> int | None:
    """A tool's store size after a visit, or None when it did not record it."""
    outcome = row["tools"].get(tool)
    if not outcome or "error" in outcome:
        return None
    return outcome["store_bytes"]


def final_numbers(data: dict[str, Any], tools: list[str]) -> dict[str, Any]:
    """Final sizes, ratios and a verdict for each target of one workload."""
    rows = data["visits"]
    if not rows:
        return {}
    last = rows[-1]
    ideal = cumulative_ideal(rows)[-1]
    sizes = {tool: store_after(last, tool) for tool in tools}
    files = max(row["floor"]["files"] for row in rows)
    restore = data.get("restore") or {}

    targets = {
        "append_vs_floor": _append_vs_floor(rows),
        "append_vs_restic": _append_vs_peer(rows, "restic"),
        "append_vs_borg": _append_vs_peer(rows, "borg"),
        "restore_vs_floor": _restore_vs_floor(restore, last["visit"]),
        "restore_spread": _restore_spread(restore, last["visit"]),
        "peak_rss": _peak_rss(rows, restore, files),
        "smallest_store": _smallest(sizes, data.get("name")),
        "store_vs_ideal": _at_most(sizes.get("deltatar"), ideal, IDEAL_FACTOR),
        "store_vs_tar_incremental": _at_most(
            sizes.get("deltatar"), sizes.get("tar-incremental"), TAR_INCREMENTAL_FACTOR
        ),
    }
    return {
        "visits": last["visit"],
        "files": files,
        "tree_bytes": last["tree_bytes"],
        "ideal_bytes": ideal,
        "store_bytes": sizes,
        "targets": targets,
    }


def _seconds(rows: list[dict[str, Any]], tool: str) -> float | None:
    """A tool's append seconds summed over visits 2 on, if it made them all."""
    total = 0.0
    for row in rows[1:]:
        outcome = row["tools"].get(tool)
        if not outcome or "error" in outcome:
            return None
        total += outcome["seconds"]
    return total if rows[1:] else None


def _append_vs_floor(rows: list[dict[str, Any]]) -> dict[str, Any]:
    floor = sum(row["floor"]["floor_seconds"] for row in rows[1:])
    return _at_most(_seconds(rows, "deltatar"), floor, APPEND_FLOOR_FACTOR)


def _append_vs_peer(rows: list[dict[str, Any]], peer: str) -> dict[str, Any]:
    return _at_least(
        _seconds(rows, peer), _seconds(rows, "deltatar"), APPEND_PEER_FACTOR
    )


def _restore_vs_floor(restore: dict[str, Any], visits: int) -> dict[str, Any]:
    """The worst ratio of a deltatar restore to its visit's floor."""
    ratios = {}
    for visit, outcome in (restore.get("before_compact") or {}).items():
        floor = (restore.get("floor") or {}).get(visit, {})
        if "error" in outcome or "error" in floor or not floor:
            continue
        ratios[visit] = outcome["seconds"] / floor["seconds"]
    if not ratios:
        return _unjudged(f"<= {RESTORE_FLOOR_FACTOR}")
    worst = max(ratios.values())
    verdict = _verdict(
        worst, f"<= {RESTORE_FLOOR_FACTOR}", worst <= RESTORE_FLOOR_FACTOR
    )
    verdict["by_visit"] = {str(k): round(v, 4) for k, v in ratios.items()}
    if visits < RESTORE_VISITS:
        verdict["note"] = f"stated for {RESTORE_VISITS} visits; this run had {visits}"
    return verdict


def _restore_spread(restore: dict[str, Any], visits: int) -> dict[str, Any]:
    """How far apart the restores of the first, middle and last visit are.

    The trees of those visits differ in size, so each restore is taken
    relative to its own visit's floor: a chain that is slow to walk shows as
    a late visit costing more than its tree explains.
    """
    ratios = _restore_vs_floor(restore, visits).get("by_visit") or {}
    target = f"<= {RESTORE_SPREAD_FACTOR}"
    if len(ratios) < 2:
        return _unjudged(target)
    spread = max(ratios.values()) / min(ratios.values())
    return _verdict(spread, target, spread <= RESTORE_SPREAD_FACTOR)


def _peak_rss(
    rows: list[dict[str, Any]], restore: dict[str, Any], files: int
) -> dict[str, Any]:
    """Largest peak RSS of deltatar's appends and materializes, in bytes."""
    peaks = [
        row["tools"]["deltatar"].get("peak_rss_kib")
        for row in rows
        if "deltatar" in row["tools"]
    ]
    peaks += [
        outcome.get("peak_rss_kib")
        for outcome in (restore.get("before_compact") or {}).values()
    ]
    known = [peak for peak in peaks if peak]
    target = f"< {RSS_LIMIT_BYTES // 10**6} MB at >= {RSS_FILES} files"
    if not known:
        return _unjudged(target)
    peak = max(known) * 1024
    verdict = _verdict(peak / 10**6, target, peak < RSS_LIMIT_BYTES)
    verdict["unit"] = "MB"
    if files < RSS_FILES:
        verdict["met"] = None
        verdict["note"] = f"the tree had {files} files; judged only at {RSS_FILES}"
    return verdict


def _smallest(sizes: dict[str, int | None], workload: str | None) -> dict[str, Any]:
    """deltatar's store over the smallest peer store (below 1 means smallest)."""
    peers = [size for tool, size in sizes.items() if tool != "deltatar" and size]
    store = sizes.get("deltatar")
    if not store or not peers:
        return _unjudged("< 1")
    ratio = store / min(peers)
    verdict = _verdict(ratio, "< 1", ratio < 1)
    verdict["smallest_peer"] = min(
        (size, tool) for tool, size in sizes.items() if tool != "deltatar" and size
    )[1]
    if workload not in SMALLEST_WORKLOADS:
        verdict["note"] = "judged on attractor and releases only"
        verdict["met"] = None
    return verdict


def _verdict(ratio: float, target: str, met: bool) -> dict[str, Any]:
    return {"ratio": round(ratio, 4), "target": target, "met": met}


def _unjudged(target: str) -> dict[str, Any]:
    return {"ratio": None, "target": target, "met": None}


def _at_most(value: float | None, reference: float | None, factor: float):
    """value / reference must not exceed factor."""
    if not value or not reference:
        return _unjudged(f"<= {factor}")
    ratio = value / reference
    return _verdict(ratio, f"<= {factor}", ratio <= factor)


def _at_least(value: float | None, reference: float | None, factor: float):
    """value / reference must reach factor."""
    if not value or not reference:
        return _unjudged(f">= {factor}")
    ratio = value / reference
    return _verdict(ratio, f">= {factor}", ratio >= factor)
