"""Compaction: squash the chain into a fresh base and drop unwanted visits.

Compaction rebuilds the kept visits as a new chain: the oldest kept visit
becomes a full base, each later kept visit a delta layer against the one
before it.  Tails, patches and scattered pieces are rewritten as contiguous
data, so restores read fewer frames, and content only dropped visits used is
freed.  Visit numbers never change.

Nothing is deleted before the new head is durably committed.  Old objects are
then deleted at once when no reader holds the reader guard; otherwise they are
listed in the head as garbage and removed by the next writer, so a restore
that started before the compaction always finds the objects it was promised.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .append import tombstones_between, write_tombstones
from .content import ContentSource
from .delta import LayerBuilder
from .errors import NoSpace, UsageError
from .head import Head, VisitRecord, format_ranges
from .layer import LayerWriter
from .manifest import FILE, Entry, Manifest, StoredContent, departed_contents

logger = logging.getLogger(__name__)

SPACE_MARGIN = 1.1


def compact_store(
    store, keep_last: int | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Rebuild the kept visits as a new chain; see the module docstring."""
    if keep_last is not None and keep_last < 1:
        raise UsageError(f"--keep-last {keep_last}: must keep at least one visit")
    with store.writing("compact") as (head, token):
        kept = head.visits[-keep_last:] if keep_last else list(head.visits)
        dropped = head.visits[: len(head.visits) - len(kept)]
        report = _report(store, head, kept, dropped)
        if dry_run or not kept:
            return report
        _check_free_space(store, _to_rewrite(kept))
        before = head.referenced_objects()
        head.visits = _rebuild(store, kept)
        retired = before - head.referenced_objects()
        head.garbage = sorted(set(head.garbage) | retired)
        store.commit_head(head, token)
        store.collect_garbage(*store.read_head_with_token())
    report["store_bytes_after"] = store.disk_usage()
    logger.info(
        "compacted %s: kept visits %s, dropped %d",
        store.location,
        report["kept"],
        len(dropped),
    )
    return report


def _report(store, head: Head, kept: list[VisitRecord], dropped: list[VisitRecord]):
    return {
        "kept": format_ranges([record.visit for record in kept]),
        "dropped": [record.visit for record in dropped],
        "store_bytes_before": store.disk_usage(),
        "bytes_to_rewrite": sum(record.layer_bytes for record in _to_rewrite(kept)),
    }


def _to_rewrite(kept: list[VisitRecord]) -> list[VisitRecord]:
    """The kept visits whose objects compaction writes anew.

    A kept visit that is already a base stays as it is: its layer holds
    every byte of its visit, so rewriting it would cost I/O and free nothing.
    """
    return kept[1:] if kept and kept[0].kind == "base" else kept


def _check_free_space(store, rewritten: list[VisitRecord]) -> None:
    needed = int(SPACE_MARGIN * sum(r.bytes_stored for r in rewritten))
    free = store.backend.free_bytes()
    if free is not None and free < needed:
        raise NoSpace(
            f"{store.location}: no space for compaction: it needs about "
            f"{needed} bytes free and only {free} are; free some space or "
            "compact with --keep-last"
        )


# TODO: a new base stores every copy of a content in full so that tar extracts
# it; when a visit holds many copies, compaction can grow the store.
def _rebuild(store, kept: list[VisitRecord]) -> list[VisitRecord]:
    settings = store.settings()
    source = ContentSource(store.backend)
    index: dict[str, StoredContent] = {}
    previous: Manifest | None = None
    records = []
    rewritten = _to_rewrite(kept)
    if len(rewritten) < len(kept):
        records.append(kept[0])
        previous = store.load_manifest(kept[0])
        index.update(previous.content_index())
    for record in rewritten:
        manifest = store.load_manifest(record)
        layer_name = store.new_object_name("layers", record.visit, ".tar.zst")
        staging = store.backend.scratch_dir() / Path(layer_name).name
        writer = LayerWriter(
            staging, settings.level, settings.thread_count(), store.location
        )
        builder = LayerBuilder(
            writer, layer_name, previous is None, index, source, settings
        )
        try:
            entries = _rebuild_entries(manifest, previous, builder, source)
            write_tombstones(builder, tombstones_between(previous, entries))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        store.backend.put_file(layer_name, staging)
        rebuilt = Manifest(
            record.visit, entries, manifest.scan_started_ns, manifest.info
        )
        previous_record = records[-1] if records else None
        departed = departed_contents(previous, entries)
        names = store.save_visit(rebuilt, departed, previous_record)
        records.append(_rebuilt_record(store, record, layer_name, names, builder))
        previous = rebuilt
    return records


def _rebuild_entries(
    manifest: Manifest,
    previous: Manifest | None,
    builder: LayerBuilder,
    source: ContentSource,
) -> list[Entry]:
    before = previous.by_path() if previous else {}
    rebuilt: dict[str, Entry] = {}
    for old in manifest.entries:
        entry = dataclasses.replace(old)
        earlier = before.get(entry.path)
        if entry.type != FILE:
            if builder.is_base or earlier is None or earlier != entry:
                builder.add_metadata_member(entry)
        elif entry.hardlink_of is not None:
            leader = rebuilt[entry.hardlink_of]
            entry.recipe, entry.block_ids = leader.recipe, leader.block_ids
            builder.add_hardlink_member(entry)
        else:
            _rebuild_content(entry, old, earlier, builder, source)
        rebuilt[entry.path] = entry
    return list(rebuilt.values())


def _rebuild_content(
    entry: Entry,
    old: Entry,
    earlier: Entry | None,
    builder: LayerBuilder,
    source: ContentSource,
) -> None:
    usable = earlier if earlier is not None and earlier.type == FILE else None
    if usable is not None and usable.hardlink_of is not None:
        usable = None
    if not builder.is_base and old.content_id in builder.index:
        known = builder.index[old.content_id]
        entry.recipe, entry.block_ids = known.recipe, known.block_ids
        return
    if old.block_ids is not None:
        blocks = (_join(source.iter_pieces([piece])) for piece in old.recipe or [])
        builder.store_blocks(entry, blocks, usable)
        return
    data = source.read_verified(old.recipe or [], old.content_id, old.path)
    builder.store_small(entry, data, usable)


def _join(parts) -> bytes | int:
    collected = list(parts)
    if len(collected) == 1 and isinstance(collected[0], int):
        return collected[0]
    return b"".join(bytes(p) if isinstance(p, int) else p for p in collected)


def _rebuilt_record(
    store, record: VisitRecord, layer_name: str, names: tuple, builder: LayerBuilder
) -> VisitRecord:
    manifest_name, reference, contents_name, stored = names
    return dataclasses.replace(
        record,
        layer=layer_name,
        manifest=manifest_name,
        manifest_reference=reference,
        contents=contents_name,
        kind="base" if builder.is_base else "delta",
        layer_bytes=store.backend.size(layer_name),
        manifest_bytes=stored,
        stored=builder.tally.as_dict() | {"problems": record.stored.get("problems", 0)},
    )
