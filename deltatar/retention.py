"""Retention: dropping visits while keeping every byte kept visits still read.

A layer of a dropped visit that no kept manifest or contents list points
into is retired.  One that kept visits still mostly read is *adopted*: kept
whole and named by the first kept visit that can read it, at no I/O.  Of any
other, only the live byte ranges are *carried* into a new layer, and the
recipes that name them are rewritten.  docs/format.md (*Compaction*) gives
the algorithm and its cost.
"""

from __future__ import annotations

import dataclasses
import logging

from .content import ContentSource
from .head import VisitRecord
from .layer import BLOCK
from .relocate import (
    Moves,
    carry_ranges,
    collect_live_of_departed,
    collect_live_of_entries,
    live_bytes,
    merged_ranges,
)
from .rewrite import NewLayer, check_space, owner_of, rewrite_visits

logger = logging.getLogger(__name__)

# A retired layer at least this share live is adopted whole, not carried.
ADOPT_SHARE = 0.5


def drop_visits(
    store,
    visits: list[VisitRecord],
    kept: list[VisitRecord],
    dropped: list[VisitRecord],
) -> list[VisitRecord]:
    """The kept visits' records once the dropped ones are gone.

    Writes the carried layers and the manifests and contents lists that
    changed; the caller commits the records.
    """
    source = ContentSource(store.backend)
    moves = Moves()
    retired = record_layers(dropped) - record_layers(kept)
    predecessor_changed = _first_after_gaps(visits, kept)
    live = _live_ranges(store, kept, retired, moves, predecessor_changed)
    vessels = _vessels(visits, kept, live)
    adopted = _adopted(source, live)
    carried = {layer: spans for layer, spans in live.items() if layer not in adopted}
    check_space(store, carry_estimate(store, source, carried))
    written = _write_carried(store, vessels, carried, source, moves)
    kept = _retain(kept, vessels, adopted, written, store)
    return rewrite_visits(store, kept, moves, {}, predecessor_changed, None)


def record_layers(records: list[VisitRecord]) -> set[str]:
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


def _vessels(every, kept, live) -> dict[str, VisitRecord]:
    """For each retired layer still read, the kept visit that will hold it.

    A layer is only read by visits after the one it was written for, and a
    base reads only itself, so the first kept delta after that visit is the
    earliest visit that can take the layer's bytes over.  The choice ties
    the bytes' lifetime to the first visit that needs them.
    """
    vessels = {}
    for layer in live:
        owner = owner_of(layer, every)
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
        with NewLayer(store, name) as writer:
            for layer in layers:
                carry_ranges(writer, source, layer, carried[layer], name, moves)
        written[visit] = name
        carried_bytes = live_bytes({layer: carried[layer] for layer in layers})
        logger.info("carried %d live bytes into %s", carried_bytes, name)
    return written


def carry_estimate(store, source, carried) -> int:
    """Compressed bytes of the carried ranges, at their layers' ratio."""
    total = 0
    for layer, spans in carried.items():
        ratio = store.backend.size(layer) / max(1, source.reader(layer).raw_size)
        total += int(live_bytes({layer: spans}) * ratio) + BLOCK * len(spans)
    return total


def preview_drop(
    store,
    visits: list[VisitRecord],
    kept: list[VisitRecord],
    dropped: list[VisitRecord],
) -> dict[str, int]:
    """What dropping would adopt, carry and free, without writing anything."""
    source = ContentSource(store.backend)
    retired = record_layers(dropped) - record_layers(kept)
    changed = _first_after_gaps(visits, kept)
    live = _live_ranges(store, kept, retired, Moves(), changed)
    adopted = _adopted(source, live)
    carried = {layer: spans for layer, spans in live.items() if layer not in adopted}
    return {
        "adopted_layers": len(adopted),
        "carried_bytes": carry_estimate(store, source, carried),
        "freed_layer_bytes": sum(
            store.backend.size(layer) for layer in retired - adopted
        ),
    }
