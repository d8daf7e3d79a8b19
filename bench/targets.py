"""deltatar's size targets, and how one workload's final numbers meet them.

The targets say what "small" means for a delta chain, each against a
different yardstick:

- the ideal (see ``bench.ideal``): the store may cost at most 1.25 times
  a zstd-3 stream of only the new bytes, leaving a quarter for manifests,
  framing and the occasional missed match;
- GNU tar's incremental chain, the nearest thing people already use: the
  store should be at most half of it, since tar re-sends every changed file
  whole and never notices moves or copies;
- a full ``tar | zstd`` per visit, the habit deltatar replaces: after 20
  visits the store should be at least 10 times smaller.
"""

from __future__ import annotations

from typing import Any

IDEAL_FACTOR = 1.25
TAR_INCREMENTAL_FACTOR = 0.5
FULL_ARCHIVES_FACTOR = 10.0
FULL_ARCHIVES_VISITS = 20


def cumulative_ideal(rows: list[dict[str, Any]]) -> list[int]:
    """The ideal store size after each visit: the running sum of visit prices."""
    total, sums = 0, []
    for row in rows:
        total += row["ideal"]["ideal_bytes"]
        sums.append(total)
    return sums


def store_after(row: dict[str, Any], tool: str) -> int | None:
    """A tool's store size after a visit, or None when it did not record it."""
    outcome = row["tools"].get(tool)
    if not outcome or "error" in outcome:
        return None
    return outcome["store_bytes"]


def final_numbers(rows: list[dict[str, Any]], tools: list[str]) -> dict[str, Any]:
    """Final sizes, ratios and a verdict for each target of one workload."""
    if not rows:
        return {}
    last = rows[-1]
    ideal = cumulative_ideal(rows)[-1]
    sizes = {tool: store_after(last, tool) for tool in tools}
    store = sizes.get("deltatar")

    return {
        "visits": last["visit"],
        "tree_bytes": last["tree_bytes"],
        "ideal_bytes": ideal,
        "store_bytes": sizes,
        "targets": _verdicts(store, ideal, sizes, last["visit"]),
    }


def _verdicts(
    store: int | None, ideal: int, sizes: dict[str, int | None], visits: int
) -> dict[str, dict[str, Any]]:
    incremental, full = sizes.get("tar-incremental"), sizes.get("full")
    verdicts = {
        "store_vs_ideal": _at_most(store, ideal, IDEAL_FACTOR),
        "store_vs_tar_incremental": _at_most(
            store, incremental, TAR_INCREMENTAL_FACTOR
        ),
        "full_archives_vs_store": _at_least(full, store, FULL_ARCHIVES_FACTOR),
    }
    # Whether a target can be met at all: if even the ideal is above half of
    # tar's chain, no store can reach that target on this workload.
    verdicts["store_vs_tar_incremental"]["ideal_ratio"] = _ratio(ideal, incremental)
    if visits < FULL_ARCHIVES_VISITS:
        verdicts["full_archives_vs_store"]["note"] = (
            f"the target is stated for {FULL_ARCHIVES_VISITS} visits; "
            f"this run had {visits}"
        )
    return verdicts


def _ratio(value: int | None, reference: int | None) -> float | None:
    return round(value / reference, 4) if value and reference else None


def _at_most(value: int | None, reference: int | None, factor: float) -> dict[str, Any]:
    """value / reference must not exceed factor."""
    if not value or not reference:
        return {"ratio": None, "target": f"<= {factor}", "met": None}
    ratio = value / reference
    return {"ratio": round(ratio, 4), "target": f"<= {factor}", "met": ratio <= factor}


def _at_least(
    value: int | None, reference: int | None, factor: float
) -> dict[str, Any]:
    """value / reference must reach factor."""
    if not value or not reference:
        return {"ratio": None, "target": f">= {factor}", "met": None}
    ratio = value / reference
    return {"ratio": round(ratio, 4), "target": f">= {factor}", "met": ratio >= factor}
