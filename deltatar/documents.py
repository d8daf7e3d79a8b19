"""The JSON documents the command line prints with ``--json``.

Scripts rely on these shapes, so they live in one place beside the page that
describes them field by field (docs/json.md): a field may be added within a
schema version, never renamed, removed or given another meaning.
"""

from __future__ import annotations

import os
from typing import Any

SCHEMA_VERSION = 1


def preview(found) -> dict[str, Any]:
    """``append --dry-run``: what a :class:`~deltatar.preview.Preview` found."""
    return {
        "dry_run": True,
        "visit": found.visit,
        "entries": found.entries,
        "tree_bytes": found.tree_bytes,
        "added": len(found.added),
        "changed": len(found.changed),
        "deleted": len(found.deleted),
        "metadata_only": len(found.metadata_only),
        "new_bytes": found.new_bytes,
        "deduplicated_bytes": found.deduplicated_bytes,
        "estimate_bytes": found.estimate_bytes,
        "problems": found.problems,
        "paths": {
            "added": [path_text(path) for path in found.added],
            "changed": [path_text(path) for path in found.changed],
            "metadata_only": [path_text(path) for path in found.metadata_only],
            "deleted": [path_text(path) for path in found.deleted],
        },
    }


def change(item) -> dict[str, Any]:
    """One path of ``diff``, with its metadata in each visit that has it."""
    present = item.new or item.old
    document = {"change": item.kind, **path_fields(item.path), "type": present.type}
    for side, value in (("old", item.old), ("new", item.new)):
        if value is not None:
            document[side] = {
                "type": value.type,
                "mode": value.mode,
                "size": value.size,
                "mtime_ns": value.mtime_ns,
                "content_id": value.content_id,
            }
    return document


def path_fields(path: str) -> dict[str, str]:
    """``path``, plus ``path_hex`` with the exact bytes when they are not UTF-8."""
    raw = os.fsencode(path)
    try:
        return {"path": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path_hex": raw.hex(), "path": raw.decode("utf-8", "backslashreplace")}


def entry(item) -> dict[str, Any]:
    """One entry of ``ls``."""
    document = path_fields(item.path) | {
        "type": item.type,
        "mode": item.mode,
        "size": item.size,
        "mtime_ns": item.mtime_ns,
        "content_id": item.content_id,
    }
    if item.target is not None:
        document["target"] = path_text(item.target)
    if item.hardlink_of is not None:
        document["hardlink_of"] = path_text(item.hardlink_of)
    return document


def visit_record(record) -> dict[str, Any]:
    """The fields ``append``, ``log`` and ``show`` give for every visit."""
    return {
        "visit": record.visit,
        "time": iso_time(record.time_ns),
        "time_ns": record.time_ns,
        "message": record.message,
        "kind": record.kind,
        "entries": record.entries,
        "tree_bytes": record.tree_bytes,
        "added": record.added,
        "changed": record.changed,
        "deleted": record.deleted,
        "metadata_only": record.metadata_only,
        "bytes_stored": record.bytes_stored,
        "layer_bytes": record.layer_bytes,
        "stored": record.stored,
    }


def iso_time(time_ns: int) -> str:
    """ISO 8601 local time with its UTC offset, to the second."""
    import datetime

    moment = datetime.datetime.fromtimestamp(time_ns / 1e9).astimezone()
    return moment.isoformat(timespec="seconds")


def path_text(path: str) -> str:
    """A path as text; bytes that are not UTF-8 become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
