"""The manifest: the full listing of one visit.

A manifest names every entry of a visit with its metadata, its content id and
the *recipe* that rebuilds its bytes from the store's layers.  Materializing a
visit therefore reads its manifest and then only the byte ranges the recipes
name; it never replays the chain.

Paths are kept in memory as ``str`` decoded with ``surrogateescape`` (what
``os`` returns for names that are not valid UTF-8).  On disk a path that is
valid UTF-8 is written as ``path``; any other is written as ``path_hex``, the
hex of its raw bytes, so that readers in any language see the exact name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .errors import CorruptStore, UnsupportedFormat

MANIFEST_VERSION = 1

FILE = "file"
DIRECTORY = "dir"
SYMLINK = "symlink"
FIFO = "fifo"
CHAR_DEVICE = "chardev"
BLOCK_DEVICE = "blockdev"
ENTRY_TYPES = (FILE, DIRECTORY, SYMLINK, FIFO, CHAR_DEVICE, BLOCK_DEVICE)

Recipe = list[list[Any]]


@dataclass(slots=True)
class Entry:
    """One path of a visit and everything needed to rebuild it exactly."""

    path: str
    type: str
    mode: int
    mtime_ns: int
    size: int = 0
    content_id: str | None = None
    recipe: Recipe | None = None
    block_ids: list[str] | None = None
    target: str | None = None
    hardlink_of: str | None = None
    uid: int | None = None
    gid: int | None = None
    rdev: int | None = None
    inode: int | None = None
    ctime_ns: int | None = None

    def same_content_as(self, other: Entry) -> bool:
        return self.type == other.type and self.content_id == other.content_id


@dataclass(slots=True)
class Manifest:
    """Every entry of one visit, sorted by path, plus the visit's facts."""

    visit: int
    entries: list[Entry]
    scan_started_ns: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def by_path(self) -> dict[str, Entry]:
        return {entry.path: entry for entry in self.entries}

    def tree_digest(self) -> str:
        return tree_digest(self.entries)


def tree_digest(entries: list[Entry]) -> str:
    """Digest of everything that makes a tree equal: one compare checks a tree."""
    digest = xxhash.xxh3_128()
    for entry in sorted(entries, key=path_sort_key):
        fields = (
            entry.path,
            entry.type,
            oct(entry.mode),
            str(entry.size),
            str(entry.mtime_ns),
            entry.content_id or "",
            entry.target or "",
            entry.hardlink_of or "",
        )
        digest.update(os.fsencode("\0".join(fields)) + b"\n")
    return digest.hexdigest()


def path_sort_key(entry: Entry) -> bytes:
    return os.fsencode(entry.path)


def encode(manifest: Manifest) -> bytes:
    """Serialise a manifest to the JSON document described in docs/format.md."""
    document = {
        "format": "deltatar-manifest",
        "version": MANIFEST_VERSION,
        "visit": manifest.visit,
        "scan_started_ns": manifest.scan_started_ns,
        "tree_digest": manifest.tree_digest(),
        "info": manifest.info,
        "entries": [_entry_to_json(entry) for entry in manifest.entries],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def decode(data: bytes, source: str) -> Manifest:
    """Parse a manifest, refusing anything malformed with :class:`CorruptStore`."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptStore(f"{source}: manifest does not parse ({error})") from None
    if not isinstance(document, dict) or document.get("format") != "deltatar-manifest":
        raise CorruptStore(f"{source}: not a deltatar manifest")
    version = document.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise UnsupportedFormat(
            f"{source}: manifest format version {version} is newer than the "
            f"{MANIFEST_VERSION} this deltatar reads; upgrade deltatar"
        )
    try:
        entries = [_entry_from_json(item) for item in document["entries"]]
        manifest = Manifest(
            visit=int(document["visit"]),
            entries=entries,
            scan_started_ns=int(document.get("scan_started_ns", 0)),
            info=dict(document.get("info", {})),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CorruptStore(f"{source}: manifest is malformed ({error!r})") from None
    return manifest


_OPTIONAL_FIELDS = ("uid", "gid", "rdev", "inode", "ctime_ns")


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    item: dict[str, Any] = _name_field("path", entry.path)
    item.update(type=entry.type, mode=entry.mode, mtime_ns=entry.mtime_ns)
    if entry.type == FILE:
        item.update(size=entry.size, content_id=entry.content_id)
        if entry.hardlink_of is not None:
            item.update(_name_field("hardlink_of", entry.hardlink_of))
        else:
            item["recipe"] = entry.recipe
        if entry.block_ids is not None:
            item["block_ids"] = entry.block_ids
    if entry.target is not None:
        item.update(_name_field("target", entry.target))
    for name in _OPTIONAL_FIELDS:
        value = getattr(entry, name)
        if value is not None:
            item[name] = value
    return item


def _entry_from_json(item: dict[str, Any]) -> Entry:
    entry_type = item["type"]
    if entry_type not in ENTRY_TYPES:
        raise ValueError(f"unknown entry type {entry_type!r}")
    entry = Entry(
        path=_read_name(item, "path"),
        type=entry_type,
        mode=int(item["mode"]),
        mtime_ns=int(item["mtime_ns"]),
        size=int(item.get("size", 0)),
        content_id=item.get("content_id"),
        recipe=item.get("recipe"),
        block_ids=item.get("block_ids"),
        target=_read_name(item, "target", required=False),
        hardlink_of=_read_name(item, "hardlink_of", required=False),
    )
    for name in _OPTIONAL_FIELDS:
        if name in item:
            setattr(entry, name, int(item[name]))
    return entry


def _name_field(key: str, name: str) -> dict[str, str]:
    raw = os.fsencode(name)
    try:
        return {key: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{key}_hex": raw.hex()}


def _read_name(item: dict[str, Any], key: str, required: bool = True) -> str | None:
    if key in item:
        return str(item[key])
    if f"{key}_hex" in item:
        return os.fsdecode(bytes.fromhex(item[f"{key}_hex"]))
    if required:
        raise KeyError(key)
    return None
