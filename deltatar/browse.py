"""Read-only views of visits: list entries, read one file, compare, count.

These answer the questions a person asks while examining a run (what was in
visit 7, what changed between 7 and 9, how much did each visit cost) without
materializing anything.  Each function takes the reader guard so that a
concurrent compaction keeps the objects it reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from .content import ContentSource
from .errors import CorruptStore, UsageError
from .head import VisitRecord
from .manifest import FILE, Entry, visit_path


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two visits at one path."""

    kind: str
    path: str
    old: Entry | None
    new: Entry | None


def list_entries(
    store, visit, path: str | None = None
) -> tuple[VisitRecord, list[Entry]]:
    """The entries of ``visit`` at or below ``path`` (all when None)."""
    with store.backend.reader_guard():
        record = store.read_head().resolve(visit, store.location)
        entries = store.load_manifest(record).entries
    return record, _below(entries, path, record)


def read_file(store, visit, path: str) -> Iterator[bytes]:
    """Yield the bytes of one file of a visit, checked against its content id."""
    with store.backend.reader_guard():
        record = store.read_head().resolve(visit, store.location)
        by_path = store.load_manifest(record).by_path()
        entry = by_path.get(visit_path(path))
        if entry is None:
            raise UsageError(f"{path}: not in visit {record.visit}")
        if entry.type != FILE:
            raise UsageError(
                f"{path}: is a {entry.type} in visit {record.visit}, not a file"
            )
        if entry.hardlink_of is not None:
            entry = by_path[entry.hardlink_of]
        yield from _checked_bytes(ContentSource(store.backend), entry, record)


def _checked_bytes(source: ContentSource, entry: Entry, record) -> Iterator[bytes]:
    digest = xxhash.xxh3_128()
    for part in source.iter_pieces(entry.recipe or []):
        data = bytes(part) if isinstance(part, int) else part
        digest.update(data)
        yield data
    if digest.hexdigest() != entry.content_id:
        raise CorruptStore(
            f"visit {record.visit}: {entry.path!r} does not match its content id"
        )


def diff_visits(
    store, first, second, path: str | None = None
) -> tuple[int, int, list[Change]]:
    """What changed from visit ``first`` to visit ``second``, path by path.

    Returns the two visit numbers the specs named and the changes.
    """
    with store.backend.reader_guard():
        head = store.read_head()
        old_record = head.resolve(first, store.location)
        new_record = head.resolve(second, store.location)
        old_entries = store.load_manifest(old_record).entries
        new_entries = store.load_manifest(new_record).entries
    old_part = _below(old_entries, path, None)
    new_part = _below(new_entries, path, None)
    if path and not old_part and not new_part:
        raise UsageError(
            f"{path}: in neither visit {old_record.visit} nor {new_record.visit}"
        )
    return old_record.visit, new_record.visit, compare_entries(old_part, new_part)


def compare_entries(old_entries: list[Entry], new_entries: list[Entry]) -> list[Change]:
    """The changes from one list of entries to another, in path byte order."""
    old = {entry.path: entry for entry in old_entries}
    new = {entry.path: entry for entry in new_entries}
    changes = []
    for name in sorted(
        old.keys() | new.keys(), key=lambda text: text.encode(errors="surrogateescape")
    ):
        kind = _change_kind(old.get(name), new.get(name))
        if kind is not None:
            changes.append(Change(kind, name, old.get(name), new.get(name)))
    return changes


@dataclass(frozen=True, slots=True)
class VisitDetail:
    """One visit, the base its chain starts from, and its changes.

    ``changes`` are those since ``previous``, the visit kept before it; the
    oldest kept visit has no previous visit and no changes.
    """

    record: VisitRecord
    base: int
    previous: int | None
    changes: list[Change]


def describe_visit(store, visit) -> VisitDetail:
    """Everything ``show`` tells about one visit."""
    with store.backend.reader_guard():
        head = store.read_head()
        record = head.resolve(visit, store.location)
        earlier = [r for r in head.visits if r.visit < record.visit]
        # After compaction dropped the base, the oldest kept visit (a delta
        # that retains the old layers) is where the chain starts.
        base = next(
            (r.visit for r in reversed(earlier + [record]) if r.kind == "base"),
            head.visits[0].visit,
        )
        if not earlier:
            return VisitDetail(record, base, None, [])
        old = store.load_manifest(earlier[-1]).entries
        new = store.load_manifest(record).entries
    return VisitDetail(record, base, earlier[-1].visit, compare_entries(old, new))


def _change_kind(old: Entry | None, new: Entry | None) -> str | None:
    if old is None:
        return "added"
    if new is None:
        return "deleted"
    if old.type != new.type:
        return "type"
    if old.content_id != new.content_id or old.target != new.target:
        return "changed"
    if old.mode != new.mode:
        return "mode"
    # Directories count too: append records a directory whose mtime moved,
    # so diff shows it rather than hide a change the store holds.
    if old.mtime_ns != new.mtime_ns:
        return "touched"
    return None


def _below(entries: list[Entry], path: str | None, record) -> list[Entry]:
    prefix = visit_path(path or "")
    if not prefix:
        return entries
    chosen = [e for e in entries if e.path == prefix or e.path.startswith(prefix + "/")]
    if not chosen and record is not None:
        raise UsageError(f"{path}: not in visit {record.visit}")
    return chosen


def store_stats(store) -> dict[str, Any]:
    """Per visit and in total: logical size, bytes stored, and how they were saved.

    ``naive_full_bytes`` is what one uncompressed tar of the whole tree per
    visit would take; ``naive_compressed_estimate`` scales it by the base's
    compression ratio, a fair stand-in for per-visit ``tar | zstd`` archives.
    """
    records = store.visits()
    rows = [_stats_row(record) for record in records]
    ratio = _base_ratio(records)
    store_bytes = store.disk_usage()
    naive = sum(row["tree_bytes"] for row in rows)
    naive_compressed = int(naive * ratio)
    return {
        "visits": rows,
        "total": {
            "visits": len(rows),
            "store_bytes": store_bytes,
            "tree_bytes_latest": rows[-1]["tree_bytes"] if rows else 0,
            "new_bytes": sum(row["new_bytes"] for row in rows),
            "deduplicated_bytes": sum(row["deduplicated_bytes"] for row in rows),
            "naive_full_bytes": naive,
            "naive_compressed_estimate": naive_compressed,
            "store_to_naive_compressed": store_bytes / naive_compressed
            if naive_compressed
            else None,
        },
    }


def _stats_row(record: VisitRecord) -> dict[str, Any]:
    stored = record.stored
    return {
        "visit": record.visit,
        "kind": record.kind,
        "tree_bytes": record.tree_bytes,
        "bytes_stored": record.bytes_stored,
        "new_bytes": stored.get("new_bytes", 0),
        "full_bytes": stored.get("full_bytes", 0),
        "tail_bytes": stored.get("tail_bytes", 0),
        "patch_source_bytes": stored.get("patch_source_bytes", 0),
        "block_bytes": stored.get("block_bytes", 0),
        "deduplicated_bytes": stored.get("deduplicated_bytes", 0),
    }


def _base_ratio(records: list[VisitRecord]) -> float:
    """The base's compression ratio; never above 1, as tar | zstd would not be."""
    for record in records:
        if record.kind == "base" and record.tree_bytes:
            return min(1.0, record.layer_bytes / record.tree_bytes)
    return 1.0
