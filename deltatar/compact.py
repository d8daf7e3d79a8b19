"""Compaction: drop visits a policy does not keep, merge deltas, rebase.

Compaction costs I/O in proportion to what it frees or merges, never to the
size of the store (the algorithm is in docs/format.md, *Compaction*):

* **Retention** drops visits.  A layer no kept visit points into is simply
  retired; one kept visits still mostly read is kept whole (retained by the
  next kept visit); of any other only the live ranges are carried into a new
  layer (see retention.py).
* **Merging** copies a run of adjacent small delta layers into one layer; the
  base and every other layer stay as they are.
* **Rebasing** gives the latest visit a base of its own when the deltas after
  the last base have grown too large relative to it.

Only manifests whose recipes moved are written again.  Visit numbers never
change.  All steps of one run are committed by a single head; nothing is
deleted before that head is durable, and retired objects a reader may still
need stay listed as garbage until no reader holds the reader guard.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from . import policy as policy_module
from .content import ContentSource
from .errors import StoreLocked, UsageError
from .head import Head, VisitRecord, format_ranges
from .policy import Policy
from .relocate import Moves, copy_layer
from .retention import drop_visits, preview_drop, record_layers
from .rewrite import (
    SPACE_MARGIN,
    NewLayer,
    check_space,
    owner_of,
    rewrite_visits,
    write_base,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Plan:
    """What a compaction will do, decided from the head and the policy alone."""

    kept: list[VisitRecord]
    dropped: list[VisitRecord]
    merge: list[str]
    rebase: bool
    reasons: list[str]
    policy: Policy

    @property
    def due(self) -> bool:
        return bool(self.dropped or self.merge or self.rebase)


def compact_store(
    store,
    keep_last: int | None = None,
    dry_run: bool = False,
    auto: bool = False,
    policy: Policy | None = None,
) -> dict[str, Any]:
    """Apply the store's policy (or the one given); see the module docstring.

    ``keep_last`` replaces the policy's retention rules.  Without ``auto``
    the delta layers after the latest base are merged even when the policy
    does not ask for it; with ``auto`` only what the policy makes due is
    done, and a store whose writer lock is held is left alone.
    """
    if keep_last is not None and keep_last < 1:
        raise UsageError(f"--keep-last {keep_last}: must keep at least one visit")
    chosen = _effective_policy(store, policy, keep_last)
    if auto:
        plan = plan_compaction(store.read_head(), chosen, merge_all=False)
        if not plan.due:
            return _idle_report(store, plan, "nothing due")
        if dry_run:
            return _preview(store, store.read_head().visits, plan)
        return _run_when_free(store, chosen)
    with store.writing("compact") as (head, token):
        plan = plan_compaction(head, chosen, merge_all=True)
        if dry_run and plan.due:
            return _preview(store, head.visits, plan)
        if not plan.due:
            return _report(store, plan, dry_run=dry_run)
        return _execute(store, head, token, plan, merge_all=True)


def _effective_policy(store, policy: Policy | None, keep_last: int | None) -> Policy:
    chosen = dataclasses.replace(policy or store.policy())
    if keep_last is not None:
        for name in policy_module.RETENTION_FIELDS:
            setattr(chosen, name, None)
        chosen.keep_last = keep_last
    return chosen


def _run_when_free(store, chosen: Policy) -> dict[str, Any]:
    """Take the writer lock without waiting, then plan again under it.

    A timer runs ``--auto`` every few minutes; when an append holds the
    lock, waiting would only pile runs up behind it, so the run ends at once
    and the next one catches up.
    """
    try:
        with store.writing("compact --auto", timeout=0) as (head, token):
            plan = plan_compaction(head, chosen, merge_all=False)
            if not plan.due:
                return _idle_report(store, plan, "nothing due")
            return _execute(store, head, token, plan, merge_all=False)
    except StoreLocked:
        plan = plan_compaction(store.read_head(), chosen, merge_all=False)
        return _idle_report(store, plan, "store busy, nothing done")


def plan_compaction(head: Head, chosen: Policy, merge_all: bool) -> Plan:
    """Decide what is due; reads nothing but the head."""
    kept = policy_module.kept_visits(head.visits, chosen)
    kept_numbers = {record.visit for record in kept}
    dropped = [r for r in head.visits if r.visit not in kept_numbers]
    reasons = []
    if dropped:
        reasons.append(
            f"policy drops visits {format_ranges([r.visit for r in dropped])}"
        )
    shaped = kept
    rebase = _rebase_due(shaped, chosen, reasons)
    merge = [] if rebase else _merge_due(shaped, chosen, merge_all, reasons)
    return Plan(kept, dropped, merge, rebase, reasons, chosen)


def _rebase_due(shaped: list[VisitRecord], chosen: Policy, reasons: list) -> bool:
    if not chosen.max_delta_percent or len(shaped) < 2:
        return False
    share = policy_module.delta_share_percent(shaped)
    if share <= chosen.max_delta_percent:
        return False
    reasons.append(
        f"deltas hold {share:.0f}% of the base's bytes "
        f"(max-delta-percent {chosen.max_delta_percent})"
    )
    return True


def _merge_due(
    shaped: list[VisitRecord], chosen: Policy, merge_all: bool, reasons: list
) -> list[str]:
    _, layers = policy_module.latest_chain(shaped)
    if chosen.max_chain:
        window = policy_module.merge_window(shaped, chosen.max_chain)
    else:
        window = layers if merge_all and len(layers) > 1 else []
    if window:
        reasons.append(
            f"chain of {len(layers)} delta layers"
            + (f" (max-chain {chosen.max_chain})" if chosen.max_chain else "")
        )
    return window


# -- execution -----------------------------------------------------------------


def _execute(store, head: Head, token, plan: Plan, merge_all: bool):
    report = _report(store, plan, dry_run=False)
    if plan.dropped:
        carried = preview_drop(store, head.visits, plan.kept, plan.dropped)
        report["bytes_needed"] = _bytes_needed(plan, carried["carried_bytes"])
    check_space(store, report["bytes_needed"], margin=1.0)
    objects_before = _object_names(store)
    try:
        records = _apply(store, head.visits, plan, merge_all)
    except BaseException:
        _remove_written(store, objects_before)
        raise
    report["bytes_written"] = sum(
        store.backend.size(name) for name in _object_names(store) - objects_before
    )
    _commit(store, head, token, records)
    report["store_bytes_after"] = store.disk_usage()
    logger.info(
        "compacted %s: kept visits %s, dropped %d, merged %d layers%s",
        store.location,
        report["kept"],
        len(plan.dropped),
        len(plan.merge),
        ", rebased the latest visit" if plan.rebase else "",
    )
    return report


def _apply(store, visits: list[VisitRecord], plan: Plan, merge_all: bool):
    """Run the plan's steps on the head's records; the caller commits once.

    One commit for all steps keeps a failed compaction (a full disk, a
    crash) from leaving half of its work visible: the store stays exactly
    as it was, and what the steps wrote is unnamed and deleted.
    """
    records = visits
    if plan.dropped:
        records = drop_visits(store, visits, plan.kept, plan.dropped)
    if plan.rebase:
        records = _rebase_latest(store, records)
    elif plan.merge:
        # Plan the window again on the records the drop produced.
        window = _merge_due(records, plan.policy, merge_all, [])
        if window:
            records = _merge(store, records, window)
    return records


def _remove_written(store, objects_before: set[str]) -> None:
    """Delete what a failed compaction wrote (no head names it yet)."""
    for name in _object_names(store) - objects_before:
        store.backend.delete(name)


def _object_names(store) -> set[str]:
    names: set[str] = set()
    for kind in ("layers/", "manifests/", "contents/"):
        names.update(store.backend.list(kind))
    return names


def _commit(store, head: Head, token, records: list[VisitRecord]) -> None:
    """Name only ``records`` in the head; what they stopped naming is garbage.

    Objects an earlier step wrote and a later step replaced were never named
    by a committed head; the garbage collection right after deletes them.
    """
    before = head.referenced_objects()
    head.visits = records
    retired = before - head.referenced_objects()
    head.garbage = sorted(set(head.garbage) | retired)
    store.commit_head(head, token)
    store.collect_garbage(*store.read_head_with_token())


def _merge(store, visits: list[VisitRecord], window: list[str]):
    """Copy adjacent delta layers into one; the base is not touched."""
    source = ContentSource(store.backend)
    moves = Moves()
    owner = owner_of(window[-1], visits)
    check_space(store, sum(store.backend.size(layer) for layer in window))
    name = store.new_object_name("layers", owner, ".tar.zst")
    with NewLayer(store, name) as writer:
        for layer in window:
            copy_layer(writer, source, layer, name, moves)
    first = min(r.visit for r in visits if r.layer in window)
    unchanged = [r for r in visits if r.visit < first]
    later = [r for r in visits if r.visit >= first]
    before = unchanged[-1] if unchanged else None
    records = unchanged + rewrite_visits(store, later, moves, {}, set(), before)
    return records


def _rebase_latest(store, visits: list[VisitRecord]) -> list[VisitRecord]:
    """Give the latest visit a base; earlier visits keep their layers."""
    latest = visits[-1]
    check_space(store, _base_estimate(visits, latest))
    source = ContentSource(store.backend)
    moves = Moves()
    fresh = {latest.visit: write_base(store, latest, source, moves)}
    before = visits[-2] if len(visits) > 1 else None
    rewritten = rewrite_visits(store, [latest], moves, fresh, set(), before)
    return visits[:-1] + rewritten


# -- space and reports ---------------------------------------------------------


def _base_estimate(visits: list[VisitRecord], record: VisitRecord) -> int:
    """Compressed bytes a base of ``record`` takes, at most its chain's bytes.

    The chain includes the layers its visits retain for dropped visits: after
    retention the oldest kept visit may hold most of the bytes that way.
    """
    chain = [r for r in visits if r.visit <= record.visit]
    sizes = policy_module.layer_sizes(chain)
    retained = sum(r.retained_bytes for r in chain)
    bound = min(record.tree_bytes, sum(sizes.values()) + retained)
    return (bound or record.layer_bytes) + LAYER_OVERHEAD * record.entries


# Room for what every step writes besides layer bytes: the new head, scratch
# files and the frame and header bytes of new layers.
FIXED_OVERHEAD = 64 * 1024
# Tar header and frame bytes a stored entry may take in a new layer.
LAYER_OVERHEAD = 1024


# TODO: sizes are the stored (compressed) ones; after the store's level was
# lowered, recompressed layers can outgrow them and the disk fill up midway
# (the store stays intact; see tests/test_disk_full.py).
def _bytes_needed(plan: Plan, carried_bytes: int) -> int:
    """An upper bound of what all steps of ``plan`` write, with a margin.

    ``carried_bytes`` is what retention carries (retention.carry_estimate);
    a merge writes its window again; a rebase at most the latest visit's
    chain; rewritten manifests and contents lists at most those of the kept
    visits plus one written whole.  A drop that carries nothing needs only
    room for manifests and the head.
    """
    sizes = policy_module.layer_sizes(plan.kept + plan.dropped)
    needed = carried_bytes + sum(sizes.get(layer, 0) for layer in plan.merge)
    every = sorted(plan.kept + plan.dropped, key=lambda record: record.visit)
    if plan.rebase:
        needed += _base_estimate(every, plan.kept[-1])
    if plan.due:
        needed += sum(r.manifest_bytes for r in plan.kept)
        needed += max(r.manifest_bytes for r in every) + FIXED_OVERHEAD
    return int(SPACE_MARGIN * needed)


def _report(store, plan: Plan, dry_run: bool) -> dict[str, Any]:
    sizes = policy_module.layer_sizes(plan.kept + plan.dropped)
    for record in plan.dropped:
        for name in record.retained_layers:
            sizes[name] = store.backend.size(name)
    retired = record_layers(plan.dropped) - record_layers(plan.kept)
    report = {
        "did": "would compact"
        if dry_run
        else ("compacted" if plan.due else "nothing due"),
        "reasons": plan.reasons,
        "kept": format_ranges([record.visit for record in plan.kept]),
        "dropped": [record.visit for record in plan.dropped],
        "merged_layers": len(plan.merge),
        "merged_bytes": sum(sizes.get(layer, 0) for layer in plan.merge),
        "rebase": plan.rebase,
        "retired_layer_bytes": sum(sizes.get(layer, 0) for layer in retired),
        "bytes_needed": _bytes_needed(plan, _carry_bound(sizes, retired)),
    }
    if plan.due:
        report["store_bytes_before"] = store.disk_usage()
    return report


def _carry_bound(sizes: dict[str, int], retired: set[str]) -> int:
    """From the head alone: a layer is carried only when at most half is live."""
    return sum(sizes.get(layer, 0) for layer in retired) // 2


def _preview(store, visits: list[VisitRecord], plan: Plan) -> dict[str, Any]:
    """The dry-run report, with what retention would free and carry exactly.

    Reads the kept manifests and contents lists (as the drop itself would)
    but writes nothing.
    """
    report = _report(store, plan, dry_run=True)
    if plan.dropped:
        report |= preview_drop(store, visits, plan.kept, plan.dropped)
        report["bytes_needed"] = _bytes_needed(plan, report["carried_bytes"])
    return report


def _idle_report(store, plan: Plan, why: str) -> dict[str, Any]:
    report = _report(store, plan, dry_run=False)
    report["did"] = why
    return report
