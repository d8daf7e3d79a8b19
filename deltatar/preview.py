"""Tell what an append would record, without writing anything to the store.

``append --dry-run`` answers "what will this visit cost?" before paying it.
It walks the source as append does and compares each entry with the latest
visit by the same rules, so it names the paths the real append would count as
added, changed and deleted.  Files whose stat data changed are read and hashed
(nothing else is), which tells a touched file from an edited one and finds
content the store already holds.  It takes no lock and creates no store: a
preview never changes anything on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from .append import (
    Progress,
    _differs,
    _entry_for,
    guard_nested_archives,
    metadata_only,
)
from .errors import UsageError
from .head import Head
from .manifest import FILE, Entry, Manifest
from .scan import (
    COARSE_RACY_WINDOW_NS,
    Found,
    exclusion_spec,
    is_racy,
    scan,
    stat_matches,
)

READ_SIZE = 1 << 20


@dataclass(slots=True)
class Preview:
    """What appending the source now would record.

    ``new_bytes`` counts the content the store does not hold yet, in full;
    the real append stores only tails and patches of edited files, so it is
    an upper bound.  ``estimate_bytes`` scales it by the store's compression
    ratio so far.
    """

    visit: int
    entries: int = 0
    tree_bytes: int = 0
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    metadata_only: list[str] = field(default_factory=list)
    new_bytes: int = 0
    deduplicated_bytes: int = 0
    estimate_bytes: int = 0
    problems: list[str] = field(default_factory=list)


def preview_append(
    store,
    store_path: Path,
    src: Path,
    excludes: list[str] | tuple[str, ...] = (),
    checksum: bool = False,
    exclude_nested_archives: bool = False,
    progress: Progress | None = None,
) -> Preview:
    """Compare ``src`` with the latest visit of ``store`` (None: no store yet)."""
    _check_source(src, store_path)
    head, previous, known = _latest(store)
    result = scan(src, store_path, exclusion_spec(src, list(excludes)), False)
    old_entries = previous.by_path() if previous else {}
    guard_nested_archives(src, result, old_entries, head, exclude_nested_archives)
    preview = Preview(head.next_visit, problems=list(result.problems))
    entries = _compare(
        src, result.found, previous, old_entries, known, checksum, preview, progress
    )
    preview.deleted = _deleted(previous, entries)
    preview.entries = len(entries)
    preview.tree_bytes = sum(entry.size for entry in entries if entry.type == FILE)
    preview.estimate_bytes = int(preview.new_bytes * _compression_ratio(head))
    return preview


def _check_source(src: Path, store_path: Path) -> None:
    if not src.is_dir():
        what = "does not exist" if not src.exists() else "is not a directory"
        raise UsageError(f"{src}: source {what}")
    resolved = store_path.resolve()
    if src.resolve() == resolved or resolved in src.resolve().parents:
        raise UsageError(f"{src}: source lies inside the store {store_path}")


def _latest(store) -> tuple[Head, Manifest | None, set[str]]:
    """The head, the latest manifest and every content id the store holds."""
    if store is None:
        return Head(), None, set()
    with store.backend.reader_guard():
        head = store.read_head()
        if not head.visits:
            return head, None, set()
        previous = store.load_manifest(head.latest())
        known = set(store.content_index(head, previous))
    return head, previous, known


def _compare(
    src: Path,
    found: list[Found],
    previous: Manifest | None,
    old_entries: dict[str, Entry],
    known: set[str],
    checksum: bool,
    preview: Preview,
    progress: Progress | None,
) -> list[Entry]:
    since = _racy_check(previous)
    total_bytes = sum(item.stat.st_size for item in found if item.type == FILE)
    done_bytes = 0
    leaders: dict[tuple[int, int], Entry] = {}
    entries: list[Entry] = []
    for number, item in enumerate(found, 1):
        old = old_entries.get(item.path)
        entry = _entry_for(item)
        if item.type == FILE:
            done_bytes += item.stat.st_size
            found_content = _content(
                src, item, entry, old, checksum, since, known, leaders, preview
            )
            if not found_content:
                continue
        entries.append(entry)
        _classify(preview, old, entry)
        if progress is not None:
            progress(number, len(found), done_bytes, total_bytes)
    return entries


def _racy_check(previous: Manifest | None) -> tuple[int, int]:
    if previous is None:
        return 0, 0
    window = int(previous.info.get("racy_window_ns", COARSE_RACY_WINDOW_NS))
    return previous.scan_started_ns, window


def _content(
    src: Path,
    item: Found,
    entry: Entry,
    old: Entry | None,
    checksum: bool,
    since: tuple[int, int],
    known: set[str],
    leaders: dict[tuple[int, int], Entry],
    preview: Preview,
) -> bool:
    """Find the file's content id; count its bytes as new or already held."""
    key = (item.stat.st_dev, item.stat.st_ino)
    leader = leaders.get(key) if item.stat.st_nlink > 1 else None
    if leader is not None:
        entry.hardlink_of, entry.content_id = leader.path, leader.content_id
        return True
    leaders[key] = entry
    trusted = old is not None and old.hardlink_of is None and not checksum
    if trusted and stat_matches(old, item) and not is_racy(old, *since):
        entry.content_id = old.content_id
        return True
    try:
        entry.content_id = _hash_file(src / item.path)
    except OSError as error:
        del leaders[key]
        preview.problems.append(f"{item.path}: cannot read ({error.strerror})")
        return False
    if entry.content_id in known:
        preview.deduplicated_bytes += item.stat.st_size
    else:
        known.add(entry.content_id)
        preview.new_bytes += item.stat.st_size
    return True


def _hash_file(path: Path) -> str:
    """Hash a file's bytes without following a link swapped in since the walk."""
    digest = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with open(fd, "rb") as handle:
        while chunk := handle.read(READ_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _classify(preview: Preview, old: Entry | None, entry: Entry) -> None:
    """Count the entry as append's ``_count`` does."""
    if old is None:
        preview.added.append(entry.path)
    elif old.type != entry.type:
        preview.changed.append(entry.path)
    elif _differs(old, entry):
        preview.changed.append(entry.path)
        if metadata_only(old, entry):
            preview.metadata_only.append(entry.path)


def _deleted(previous: Manifest | None, entries: list[Entry]) -> list[str]:
    if previous is None:
        return []
    present = {entry.path for entry in entries}
    gone = (entry.path for entry in previous.entries if entry.path not in present)
    return sorted(gone, key=os.fsencode)


def _compression_ratio(head: Head) -> float:
    """Layer bytes per file byte over the kept visits; 1 before any visit."""
    stored = sum(record.layer_bytes for record in head.visits)
    read = sum(record.stored.get("new_bytes", 0) for record in head.visits)
    if not stored or not read:
        return 1.0
    return min(1.0, stored / read)
