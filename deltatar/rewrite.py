"""Writing what compaction produces, beside the objects it replaces.

New layers are written in scratch space and published whole
(:class:`NewLayer`).  A visit whose recipes moved, whose previous visit
changed, or that became the oldest gets a new manifest and contents list;
every other visit keeps its objects.  Nothing here commits a head: the
records returned are committed by compaction once all its steps are done.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .delta import LayerBuilder
from .errors import NoSpace
from .head import VisitRecord
from .layer import LayerWriter
from .manifest import Manifest, departed_contents, departed_document
from .relocate import Moves, build_base_entries, map_to_base

SPACE_MARGIN = 1.1


def write_base(store, record: VisitRecord, source, moves) -> tuple[str, list]:
    """Write ``record``'s visit as a base; record where its old pieces went."""
    manifest = store.load_manifest(record)
    name = store.new_object_name("layers", record.visit, ".tar.zst")
    with NewLayer(store, name) as writer:
        builder = LayerBuilder(writer, name, True, {}, source, store.settings())
        entries = build_base_entries(manifest, builder, source)
    map_to_base(manifest.entries, entries, moves)
    return name, entries


class NewLayer:
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


def rewrite_visits(store, visits, moves, fresh, predecessor_changed, before):
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
            names = store.save_visit(rebuilt, departed_document(departed), reference)
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


def check_space(store, needed_bytes: int, margin: float = SPACE_MARGIN) -> None:
    needed = int(margin * needed_bytes)
    free = store.backend.free_bytes()
    if free is not None and free < needed:
        raise NoSpace(
            f"{store.location}: no space for compaction: it needs about "
            f"{needed} bytes free and only {free} are; free at least "
            f"{needed - free} more bytes and run it again"
        )


def owner_of(layer: str, records: list[VisitRecord]) -> int:
    """The last visit that names a layer (as its own or as a retained one)."""
    return max(record.visit for record in records if layer in record.layers())
