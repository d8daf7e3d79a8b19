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

import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import xxhash

from .errors import CorruptStore
from .formats import check_document

MANIFEST_VERSION = 1
ENCODED_CHUNK_BYTES = 8 * 1024 * 1024

FILE = "file"
DIRECTORY = "dir"
SYMLINK = "symlink"
FIFO = "fifo"
CHAR_DEVICE = "chardev"
BLOCK_DEVICE = "blockdev"
ENTRY_TYPES = (FILE, DIRECTORY, SYMLINK, FIFO, CHAR_DEVICE, BLOCK_DEVICE)

Recipe = list[list[Any]]


# TODO: an entry costs about 650 bytes in memory (a recipe as nested lists is
# a third of it), the largest share of an append's peak at 200,000 files:
# 278 MiB on a tree of small files, 351-416 MiB on the benchmark's large run,
# where new entries share allocator arenas with the temporaries of reading
# and so keep them resident.  Compact entries (a columnar manifest) would cut
# that severalfold.
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


@dataclass(slots=True)
class StoredContent:
    """A content the store can rebuild: its size, recipe and block ids."""

    size: int
    recipe: Recipe
    block_ids: list[str] | None = None


def content_index_of(
    entries: list[Entry], leave_out: set[str] | frozenset[str] = frozenset()
) -> dict[str, StoredContent]:
    """Every content (and block) the entries of one visit can rebuild, by id.

    Ids in ``leave_out`` are not indexed.
    """
    index: dict[str, StoredContent] = {}
    for entry in entries:
        if entry.type != FILE or entry.recipe is None or entry.content_id is None:
            continue
        if entry.content_id not in leave_out:
            index[entry.content_id] = StoredContent(
                entry.size, entry.recipe, entry.block_ids
            )
        for block_id, piece in zip(entry.block_ids or (), entry.recipe, strict=False):
            if block_id != "zero" and block_id not in index:
                if block_id not in leave_out:
                    index[block_id] = StoredContent(int(piece[3]), [piece])
    return index


def departed_contents(
    previous: Manifest | None, entries: list[Entry]
) -> dict[str, StoredContent]:
    """Contents of the previous visit that no entry of this visit holds.

    Built without the previous visit's whole index: at 200,000 files that
    index is tens of MiB, and only the few contents that left are kept.
    """
    if previous is None:
        return {}
    return content_index_of(previous.entries, leave_out=_held_ids(entries))


def departed_document(departed: dict[str, StoredContent]) -> bytes:
    """The contents list of a visit as it is stored, before compression.

    An append encodes it as soon as it is known: the few recipes it names
    belong to the previous visit's entries, and holding them as objects
    would keep the memory of all those entries from going back to the
    system while the new manifest is saved.
    """
    document = {
        content_id: [stored.size, stored.recipe, stored.block_ids]
        for content_id, stored in departed.items()
    }
    return orjson.dumps(document)


def _held_ids(entries: list[Entry]) -> set[str]:
    """The keys :func:`content_index_of` would give, without building it."""
    held: set[str] = set()
    for entry in entries:
        if entry.type != FILE or entry.recipe is None or entry.content_id is None:
            continue
        held.add(entry.content_id)
        held.update(entry.block_ids or ())
    held.discard("zero")
    return held


@dataclass(slots=True)
class Manifest:
    """Every entry of one visit, sorted by path, plus the visit's facts."""

    visit: int
    entries: list[Entry]
    scan_started_ns: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    _digest: str | None = field(default=None, repr=False, compare=False)

    def by_path(self) -> dict[str, Entry]:
        return {entry.path: entry for entry in self.entries}

    def tree_digest(self) -> str:
        """The tree digest, computed once: entries must not change after it."""
        if self._digest is None:
            self._digest = tree_digest(self.entries)
        return self._digest


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cycle collector while millions of acyclic objects are made.

    Manifests of large trees allocate several objects per entry; each
    allocation burst would otherwise trigger full collections that find
    nothing to free and cost seconds.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def tree_digest(entries: list[Entry]) -> str:
    """Digest of everything that makes a tree equal: one compare checks a tree."""
    digest = xxhash.xxh3_128()
    for entry in sorted(entries, key=path_sort_key):
        line = (
            f"{entry.path}\0{entry.type}\0{entry.mode:#o}\0{entry.size}\0"
            f"{entry.mtime_ns}\0{entry.content_id or ''}\0{entry.target or ''}\0"
            f"{entry.hardlink_of or ''}\n"
        )
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


_SHARED_INTS: dict[int, int] = {}
SHARED_INTS_LIMIT = 65536


def shared_int(value: int) -> int:
    """One object per value for numbers that repeat across a tree.

    Modes, owners and devices take few values, but every stat returns
    them as new objects; at 200,000 paths the copies cost megabytes.
    """
    shared = _SHARED_INTS.get(value)
    if shared is not None:
        return shared
    if len(_SHARED_INTS) < SHARED_INTS_LIMIT:
        _SHARED_INTS[value] = value
    return value


def detach(entry: Entry) -> None:
    """Give a new entry its own copies of everything it shares with others.

    A walk or a manifest of 200,000 paths fills hundreds of allocator
    arenas, and an arena goes back to the system only once every object in
    it is gone.  The few entries a later visit adds or changes take their
    path and numbers from the walk and, for a patch, a recipe from the
    previous visit; kept as they are, they would hold nearly all of those
    arenas, some 100 MiB, long after the walk and the previous visit's
    entries were let go.
    """
    entry.path = _copy_text(entry.path)
    entry.mtime_ns += 0
    entry.size += 0
    if entry.ctime_ns is not None:
        entry.ctime_ns += 0
    if entry.inode is not None:
        entry.inode += 0
    if entry.recipe is not None:
        entry.recipe = _interned(orjson.loads(orjson.dumps(entry.recipe)))
    if entry.block_ids is not None:
        entry.block_ids = orjson.loads(orjson.dumps(entry.block_ids))
    if entry.target is not None:
        entry.target = _copy_text(entry.target)
    if entry.hardlink_of is not None:
        entry.hardlink_of = _copy_text(entry.hardlink_of)


def _copy_text(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")


def visit_path(text: str) -> str:
    """A path as the user typed it, as the manifest spells it.

    ``./d/f``, ``d//f`` and ``d/f/`` all name ``d/f``; the root is ``""``.
    """
    return "/".join(part for part in text.split("/") if part not in ("", "."))


def path_sort_key(entry: Entry) -> bytes:
    return entry.path.encode("utf-8", "surrogateescape")


def encode(manifest: Manifest) -> bytearray:
    """Serialise a manifest as JSON lines: a header, then one line per entry."""
    document = bytearray()
    for chunk in encode_chunks(manifest):
        document += chunk
    return document


def encode_chunks(manifest: Manifest, drop_entries: bool = False) -> list[bytearray]:
    """The bytes of :func:`encode` as a list of buffers of about 8 MiB each.

    A compressor fed one buffer at a time can let each go as it passes, so
    a manifest of 200,000 files is never held twice as bytes.  One line per
    entry keeps encoding free of a second, whole copy as Python objects.
    With ``drop_entries`` each entry is let go once it is encoded, so the
    entries shrink as the bytes grow, and the manifest is left empty.
    """
    header = {
        "format": "deltatar-manifest",
        "version": MANIFEST_VERSION,
        "visit": manifest.visit,
        "scan_started_ns": manifest.scan_started_ns,
        "tree_digest": manifest.tree_digest(),
        "info": manifest.info,
        "entries": len(manifest.entries),
    }
    # Growing buffers: orjson's output objects keep spare capacity, so a list
    # of one object per line would cost several KiB per entry.
    chunks = [bytearray(orjson.dumps(header))]
    entries = manifest.entries
    if drop_entries:
        manifest.entries = []
    with gc_paused():
        for number, entry in enumerate(entries):
            if len(chunks[-1]) >= ENCODED_CHUNK_BYTES:
                chunks.append(bytearray())
            chunk = chunks[-1]
            chunk += b"\n"
            chunk += orjson.dumps(_entry_to_json(entry))
            if drop_entries:
                entries[number] = None  # type: ignore[call-overload]
    chunks[-1] += b"\n"
    return chunks


def decode(data: bytes, source: str) -> Manifest:
    """Parse a manifest, refusing anything malformed with :class:`CorruptStore`."""
    lines = _lines(data)
    header = _parse_header(next(lines, b""), source)
    try:
        with gc_paused():
            entries = [_entry_from_json(orjson.loads(line)) for line in lines]
        if len(entries) != int(header["entries"]):
            raise ValueError(f"{len(entries)} entries, header says {header['entries']}")
        return Manifest(
            visit=int(header["visit"]),
            entries=entries,
            scan_started_ns=int(header.get("scan_started_ns", 0)),
            info=dict(header.get("info", {})),
        )
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        UnicodeDecodeError,
    ) as error:
        raise CorruptStore(f"{source}: manifest is malformed ({error!r})") from None


def _lines(data: bytes) -> Iterator[memoryview]:
    """The non-empty lines of ``data`` as views, without a list of copies."""
    view = memoryview(data)
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        if end > start:
            yield view[start:end]
        start = end + 1


def _parse_header(line: bytes, source: str) -> dict[str, Any]:
    try:
        header = orjson.loads(line)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptStore(f"{source}: manifest does not parse ({error})") from None
    return check_document(header, "deltatar-manifest", MANIFEST_VERSION, source)


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
        type=ENTRY_TYPES[ENTRY_TYPES.index(entry_type)],
        mode=int(item["mode"]),
        mtime_ns=int(item["mtime_ns"]),
        size=int(item.get("size", 0)),
        content_id=item.get("content_id"),
        recipe=_interned(item.get("recipe")),
        block_ids=item.get("block_ids"),
        target=_read_name(item, "target", required=False),
        hardlink_of=_read_name(item, "hardlink_of", required=False),
    )
    for name in _OPTIONAL_FIELDS:
        if name in item:
            setattr(entry, name, int(item[name]))
    entry.mode = shared_int(entry.mode)
    if entry.ctime_ns == entry.mtime_ns:
        entry.ctime_ns = entry.mtime_ns
    if entry.uid is not None and entry.gid is not None:
        entry.uid, entry.gid = shared_int(entry.uid), shared_int(entry.gid)
    return entry


def _interned(recipe: Any) -> Any:
    """Share one string per layer name across all pieces (memory at scale)."""
    if isinstance(recipe, list):
        for piece in recipe:
            if isinstance(piece, list) and piece and isinstance(piece[0], str):
                piece[0] = sys.intern(piece[0])
            if isinstance(piece, list) and len(piece) > 1 and isinstance(piece[1], str):
                piece[1] = sys.intern(piece[1])
            if isinstance(piece, list) and len(piece) == 6:
                _interned(piece[5])
    return recipe


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
