"""Compaction: drop visits a policy does not keep, merge deltas, rebase.

Compaction costs I/O in proportion to what it frees or merges, never to the
size of the store (the algorithm is in docs/format.md, *Compaction*):

* **Retention** drops visits.  A layer no kept visit points into is simply
  retired.  The live ranges of a retired layer are carried into the layer of
  the next kept visit; when the oldest kept visit was a delta, it gets a base
  (so ``zstd -dc | tar -x`` of the oldest kept layer still yields its tree).
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
from pathlib import Path
from typing import Any

from . import policy as policy_module
from .content import ContentSource
from .delta import LayerBuilder
from .errors import NoSpace, StoreLocked, UsageError
from .head import Head, VisitRecord, format_ranges
from .layer import BLOCK, LayerWriter
from .manifest import Manifest, departed_contents
from .policy import Policy
from .relocate import (
    Moves,
    build_base_entries,
    carry_ranges,
    collect_live_of_departed,
    collect_live_of_entries,
    copy_layer,
    live_bytes,
    map_to_base,
    merged_ranges,
)

logger = logging.getLogger(__name__)

SPACE_MARGIN = 1.1
ADOPT_SHARE = 0.5


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
    _check_space(store, report["bytes_needed"], margin=1.0)
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
        records = _drop(store, visits, plan)
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


def _drop(store, visits: list[VisitRecord], plan: Plan) -> list[VisitRecord]:
    """Drop visits, keeping or carrying what kept visits still need."""
    kept = plan.kept
    source = ContentSource(store.backend)
    moves = Moves()
    retired = _layers_of(plan.dropped) - _layers_of(kept)
    predecessor_changed = _first_after_gaps(visits, kept)
    live = _live_ranges(store, kept, retired, moves, predecessor_changed)
    vessels = _vessels(visits, kept, live)
    adopted = _adopted(source, live)
    carried = {layer: spans for layer, spans in live.items() if layer not in adopted}
    _check_space(store, _carry_estimate(store, source, carried))
    written = _write_carried(store, vessels, carried, source, moves)
    kept = _retain(kept, vessels, adopted, written, store)
    return _rewrite_visits(store, kept, moves, {}, predecessor_changed, None)


def _layers_of(records: list[VisitRecord]) -> set[str]:
    return {layer for record in records for layer in record.layers()}


def _adopted(source: ContentSource, live: dict[str, list]) -> set[str]:
    """Retired layers still mostly live: kept whole rather than carried.

    Carrying a layer that kept visits still mostly read would cost nearly a
    full copy and free little (think of the base when only the first visit
    is dropped); the layer is kept as it is and freed once enough of it is
    dead that carrying its rest costs at most half of it.
    """
    adopted = set()
    for layer, spans in live.items():
        share = live_bytes({layer: spans}) / max(1, source.reader(layer).raw_size)
        if share >= ADOPT_SHARE:
            adopted.add(layer)
    return adopted


# TODO: a kept visit's retained layers are examined again only when that visit
# is dropped, so a long-kept visit (keep-monthly) can hold a layer gone dead.
def _retain(kept, vessels, adopted, written, store) -> list[VisitRecord]:
    """Name adopted and newly written layers in their vessel visit's record."""
    retained: dict[int, list[str]] = {}
    for layer in sorted(adopted):
        retained.setdefault(vessels[layer].visit, []).append(layer)
    for visit, layer in written.items():
        retained.setdefault(visit, []).append(layer)
    records = []
    for record in kept:
        extra = retained.get(record.visit, [])
        if extra:
            layers = record.retained_layers + extra
            record = dataclasses.replace(
                record,
                retained_layers=layers,
                retained_bytes=sum(store.backend.size(name) for name in layers),
            )
        records.append(record)
    return records


def _first_after_gaps(visits: list[VisitRecord], kept: list[VisitRecord]) -> set[int]:
    """Kept visits whose previous visit is dropped: their contents list changes."""
    numbers = {record.visit for record in kept}
    changed = {kept[0].visit}
    for before, record in zip(visits, visits[1:], strict=False):
        if record.visit in numbers and before.visit not in numbers:
            changed.add(record.visit)
    return changed


def _live_ranges(store, kept, retired, moves, predecessor_changed):
    """Ranges of retired layers that kept manifests or contents lists need."""
    live: dict[str, list] = {}
    for record in kept:
        manifest = store.load_manifest(record)
        collect_live_of_entries(manifest.entries, moves, retired, live)
        if record.visit not in predecessor_changed:
            departed = store.load_departed(record)
            collect_live_of_departed(departed, moves, retired, live)
    return {layer: merged_ranges(spans) for layer, spans in live.items()}


def _owner(layer: str, records: list[VisitRecord]) -> int:
    """The last visit that names a layer (as its own or as a retained one)."""
    return max(record.visit for record in records if layer in record.layers())


def _vessels(every, kept, live) -> dict[str, VisitRecord]:
    """For each retired layer still read, the kept visit that will hold it.

    A layer is only read by visits after the one it was written for, and a
    base reads only itself, so the first kept delta after that visit is the
    earliest visit that can take the layer's bytes over.  The choice ties
    the bytes' lifetime to the first visit that needs them.
    """
    vessels = {}
    for layer in live:
        owner = _owner(layer, every)
        later = [r for r in kept if r.visit > owner]
        vessels[layer] = next((r for r in later if r.kind != "base"), later[0])
    return vessels


def _write_carried(store, vessels, carried, source, moves) -> dict[int, str]:
    """Write one layer per vessel visit holding the live ranges it takes over.

    The vessel's own layer is not touched: the new layer is retained beside
    it, so carrying costs exactly the live bytes.
    """
    by_vessel: dict[int, list[str]] = {}
    for layer in sorted(carried):
        by_vessel.setdefault(vessels[layer].visit, []).append(layer)
    written = {}
    for visit, layers in by_vessel.items():
        name = store.new_object_name("layers", visit, ".tar.zst")
        with _new_layer(store, name) as writer:
            for layer in layers:
                carry_ranges(writer, source, layer, carried[layer], name, moves)
        written[visit] = name
        carried_bytes = live_bytes({layer: carried[layer] for layer in layers})
        logger.info("carried %d live bytes into %s", carried_bytes, name)
    return written


def _write_base(store, record: VisitRecord, source, moves) -> tuple[str, list]:
    """Write ``record``'s visit as a base; record where its old pieces went."""
    manifest = store.load_manifest(record)
    name = store.new_object_name("layers", record.visit, ".tar.zst")
    with _new_layer(store, name) as writer:
        builder = LayerBuilder(writer, name, True, {}, source, store.settings())
        entries = build_base_entries(manifest, builder, source)
    map_to_base(manifest.entries, entries, moves)
    return name, entries


class _new_layer:
    """Write a layer in scratch space and publish it whole, or not at all."""

    def __init__(self, store, name: str) -> None:
        self.store, self.name = store, name
        settings = store.settings()
        self.staging = store.backend.scratch_dir() / Path(name).name
        self.writer = LayerWriter(
            self.staging, settings.level, settings.thread_count(), store.location
        )

    def __enter__(self) -> LayerWriter:
        return self.writer

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.writer.abort()
            return
        try:
            self.writer.finish()
            self.store.backend.put_file(self.name, self.staging)
        except BaseException:
            self.writer.abort()
            raise


def _rewrite_visits(store, visits, moves, fresh, predecessor_changed, before):
    """Save new manifests and contents lists for the visits whose recipes moved.

    ``before`` is the record of the visit just before ``visits`` (None when
    they start the store); a manifest is patched against its reference.
    """
    records: list[VisitRecord] = []
    previous: Manifest | None = None
    for record in visits:
        manifest = store.load_manifest(record)
        entries = _moved_entries(manifest, moves, fresh.get(record.visit))
        oldest = before is None and not records
        departed, departed_moved = _departed(
            store, record, previous, entries, moves, oldest, predecessor_changed
        )
        layer = _moved_layer(record.layer, moves)
        if record.visit in fresh:
            layer = fresh[record.visit][0]
        if layer == record.layer and entries == manifest.entries and not departed_moved:
            records.append(record)
        else:
            rebuilt = Manifest(
                record.visit, entries, manifest.scan_started_ns, manifest.info
            )
            reference = records[-1] if records else before
            names = store.save_visit(rebuilt, departed, reference)
            is_base = record.visit in fresh
            records.append(_new_record(record, layer, names, is_base))
            entries = rebuilt.entries
        previous = Manifest(record.visit, entries)
    return _share_layer_bytes(store, records)


def _moved_entries(manifest: Manifest, moves: Moves, fresh) -> list:
    if fresh is not None:
        return fresh[1]
    moved = []
    for entry in manifest.entries:
        if entry.recipe:
            recipe = moves.rewrite(entry.recipe)
            if recipe != entry.recipe:
                entry = dataclasses.replace(entry, recipe=recipe)
        moved.append(entry)
    return moved


def _departed(store, record, previous, entries, moves, oldest, predecessor_changed):
    """The visit's contents list and whether it differs from the stored one."""
    if oldest:
        return {}, store.load_departed(record) != {}
    if record.visit in predecessor_changed:
        return departed_contents(previous, entries), True
    departed = store.load_departed(record)
    moved = {}
    for content_id, stored in departed.items():
        moved[content_id] = dataclasses.replace(
            stored, recipe=moves.rewrite(stored.recipe)
        )
    return moved, moved != departed


def _moved_layer(layer: str, moves: Moves) -> str:
    shift = moves.shifts.get(layer)
    return shift[0] if shift else layer


def _new_record(record, layer, names, is_base) -> VisitRecord:
    manifest_name, reference, contents_name, stored = names
    return dataclasses.replace(
        record,
        layer=layer,
        manifest=manifest_name,
        manifest_reference=reference,
        contents=contents_name,
        kind="base" if is_base else record.kind,
        manifest_bytes=stored,
    )


def _share_layer_bytes(store, records: list[VisitRecord]) -> list[VisitRecord]:
    """A layer several visits share is counted once, on the last of them."""
    last = {record.layer: record.visit for record in records}
    shared = []
    for record in records:
        size = (
            store.backend.size(record.layer)
            if last[record.layer] == record.visit
            else 0
        )
        if size != record.layer_bytes:
            record = dataclasses.replace(record, layer_bytes=size)
        shared.append(record)
    return shared


def _merge(store, visits: list[VisitRecord], window: list[str]):
    """Copy adjacent delta layers into one; the base is not touched."""
    source = ContentSource(store.backend)
    moves = Moves()
    owner = _owner(window[-1], visits)
    _check_space(store, sum(store.backend.size(layer) for layer in window))
    name = store.new_object_name("layers", owner, ".tar.zst")
    with _new_layer(store, name) as writer:
        for layer in window:
            copy_layer(writer, source, layer, name, moves)
    first = min(r.visit for r in visits if r.layer in window)
    unchanged = [r for r in visits if r.visit < first]
    later = [r for r in visits if r.visit >= first]
    before = unchanged[-1] if unchanged else None
    records = unchanged + _rewrite_visits(store, later, moves, {}, set(), before)
    return records


def _rebase_latest(store, visits: list[VisitRecord]) -> list[VisitRecord]:
    """Give the latest visit a base; earlier visits keep their layers."""
    latest = visits[-1]
    _check_space(store, _base_estimate(visits, latest))
    source = ContentSource(store.backend)
    moves = Moves()
    fresh = {latest.visit: _write_base(store, latest, source, moves)}
    before = visits[-2] if len(visits) > 1 else None
    rewritten = _rewrite_visits(store, [latest], moves, fresh, set(), before)
    return visits[:-1] + rewritten


# -- space and reports ---------------------------------------------------------


def _base_estimate(visits: list[VisitRecord], record: VisitRecord) -> int:
    """Compressed bytes a base of ``record`` takes, at most its chain's bytes."""
    sizes = policy_module.layer_sizes([r for r in visits if r.visit <= record.visit])
    return min(record.tree_bytes, sum(sizes.values())) or record.layer_bytes


def _carry_estimate(store, source, carried) -> int:
    """Compressed bytes of the carried ranges, at their layers' ratio."""
    total = 0
    for layer, spans in carried.items():
        ratio = store.backend.size(layer) / max(1, source.reader(layer).raw_size)
        total += int(live_bytes({layer: spans}) * ratio) + BLOCK * len(spans)
    return total


def _check_space(store, needed_bytes: int, margin: float = SPACE_MARGIN) -> None:
    needed = int(margin * needed_bytes)
    free = store.backend.free_bytes()
    if free is not None and free < needed:
        raise NoSpace(
            f"{store.location}: no space for compaction: it needs about "
            f"{needed} bytes free and only {free} are; free some space or "
            "compact with --keep-last"
        )


def _space_needed(plan: Plan, sizes: dict[str, int], retired: set[str]) -> int:
    """An upper bound, from the head alone, of what all steps of ``plan`` write.

    A retired layer is carried only when less than half of it is live, so
    retention writes at most half of the retired bytes; a merge writes its
    window again; a rebase at most the latest visit's chain.
    """
    needed = sum(sizes.get(layer, 0) for layer in retired) // 2
    needed += sum(sizes.get(layer, 0) for layer in plan.merge)
    if plan.rebase:
        needed += _base_estimate(plan.kept, plan.kept[-1])
    return needed


def _report(store, plan: Plan, dry_run: bool) -> dict[str, Any]:
    sizes = policy_module.layer_sizes(plan.kept + plan.dropped)
    for record in plan.dropped:
        for name in record.retained_layers:
            sizes[name] = store.backend.size(name)
    retired = _layers_of(plan.dropped) - _layers_of(plan.kept)
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
        "bytes_needed": int(SPACE_MARGIN * _space_needed(plan, sizes, retired)),
    }
    if plan.due:
        report["store_bytes_before"] = store.disk_usage()
    return report


def _preview(store, visits: list[VisitRecord], plan: Plan) -> dict[str, Any]:
    """The dry-run report, with what retention would free and carry exactly.

    Reads the kept manifests and contents lists (as the drop itself would)
    but writes nothing.
    """
    report = _report(store, plan, dry_run=True)
    if not plan.dropped:
        return report
    source = ContentSource(store.backend)
    retired = _layers_of(plan.dropped) - _layers_of(plan.kept)
    changed = _first_after_gaps(visits, plan.kept)
    live = _live_ranges(store, plan.kept, retired, Moves(), changed)
    adopted = _adopted(source, live)
    carried = {layer: spans for layer, spans in live.items() if layer not in adopted}
    report["adopted_layers"] = len(adopted)
    report["carried_bytes"] = _carry_estimate(store, source, carried)
    report["freed_layer_bytes"] = sum(
        store.backend.size(layer) for layer in retired - adopted
    )
    return report


def _idle_report(store, plan: Plan, why: str) -> dict[str, Any]:
    report = _report(store, plan, dry_run=False)
    report["did"] = why
    return report
