"""Record one visit: scan the source, store what changed, commit the head.

The order of writes is what keeps every committed visit safe: the layer, the
manifest and the contents list are written and fsynced under fresh names
first, and only then does a new head name them.  A crash before that leaves
objects no head names, which the next writer deletes.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .content import ContentSource
from .delta import RESERVED_PREFIX, LayerBuilder, Settings
from .errors import UsageError
from .head import VisitRecord
from .layer import FrameCache, LayerWriter
from .manifest import (
    FILE,
    Entry,
    Manifest,
    StoredContent,
    departed_contents,
    departed_document,
    detach,
    shared_int,
)
from .memory import release_free_memory
from .nested import find_nested_archives, suggested_pattern
from .scan import (
    COARSE_RACY_WINDOW_NS,
    FINE_RACY_WINDOW_NS,
    Found,
    exclusion_spec,
    is_racy,
    racy_window,
    scan,
    stat_matches,
)

logger = logging.getLogger(__name__)

READ_ATTEMPTS = 3
# Old versions of changed files are read in path order, which is mostly the
# order their layers hold them in, so a few frames of cache serve them.
APPEND_FRAME_CACHE_BYTES = 16 * 1024 * 1024
# Called as (files done, files in all, bytes done, bytes in all).
Progress = Callable[[int, int, int, int], None]


@dataclass(slots=True)
class Counts:
    added: int = 0
    changed: int = 0
    metadata_only: int = 0
    problems: list[str] = field(default_factory=list)


def append_visit(
    store,
    src: Path,
    message: str = "",
    excludes: list[str] | tuple[str, ...] = (),
    checksum: bool = False,
    strict: bool = False,
    exclude_nested_archives: bool = False,
    progress: Progress | None = None,
    visit_time_ns: int | None = None,
) -> VisitRecord:
    """Append the state of ``src`` to ``store`` as its next visit.

    ``visit_time_ns`` records another time than now as the visit's time, for
    importing runs recorded elsewhere and for testing retention rules.
    """
    _check_source(src, store)
    with store.writing(f"append {src}") as (head, token):
        visit = head.next_visit
        # Loaded now, before the previous visit's entries fill memory: what
        # a first use allocates later would land among them and keep their
        # memory from going back to the system once they are let go.
        release_free_memory()
        previous = (
            store.load_manifest(head.latest(), keep_reference=False)
            if head.visits
            else None
        )
        scan_started = time.time_ns()
        own_store = store.local_path
        previous_entries = previous.by_path() if previous else {}
        spec = exclusion_spec(src, list(excludes))
        result = scan(src, own_store, spec, strict, previous_entries)
        guard_nested_archives(
            src, result, previous_entries, head, exclude_nested_archives
        )
        layer_name = store.new_object_name("layers", visit, ".tar.zst")
        builder = _builder(store, head, previous, layer_name)
        written = _write_layer(
            src, result, previous, previous_entries, builder, checksum, progress
        )
        store.backend.put_file(layer_name, builder.writer.path)
        root = src.stat()
        info = {
            "message": _printable(message),
            "racy_window_ns": written.racy_window,
            "root": {"mode": stat.S_IMODE(root.st_mode), "mtime_ns": root.st_mtime_ns},
        }
        manifest = Manifest(visit, written.entries, scan_started, info)
        written.entries = []
        record = _add_visit(store, head, manifest, written, layer_name, builder)
        if visit_time_ns is not None:
            record.time_ns = int(visit_time_ns)
        store.commit_head(head, token)
    logger.info(
        "visit %d appended: %d added, %d changed, %d deleted, %d bytes stored",
        visit,
        record.added,
        record.changed,
        record.deleted,
        record.bytes_stored,
    )
    return record


@dataclass(slots=True)
class _WrittenLayer:
    """What writing a visit's layer found out, for its manifest and record."""

    entries: list[Entry]
    counts: Counts
    tombstones: int
    departed: bytes
    racy_window: int


def _write_layer(
    src: Path,
    result,
    previous: Manifest | None,
    previous_entries: dict[str, Entry],
    builder: LayerBuilder,
    checksum: bool,
    progress: Progress | None,
) -> _WrittenLayer:
    """Record every entry into the builder's layer and finish the layer file."""
    window = racy_window(result.found)
    try:
        entries, counts = _record_entries(
            src, result.found, previous, previous_entries, builder, checksum, progress
        )
        tombstones = tombstones_between(previous, entries)
        write_tombstones(builder, tombstones)
        builder.writer.finish()
    except BaseException:
        builder.writer.abort()
        raise
    counts.problems = result.problems + counts.problems
    written = _WrittenLayer(
        entries,
        counts,
        len(tombstones),
        departed_document(_departed(previous, entries)),
        window,
    )
    # Release the walk, the previous visit's entries and the dedup index
    # before the manifest is encoded: at 200,000 files the walk and the
    # entries hold about 100 MiB each, the index about 25 MiB.
    result.found = []
    previous_entries.clear()
    builder.forget_index()
    if previous is not None:
        previous.entries = []
    release_free_memory()
    return written


def _departed(
    previous: Manifest | None, entries: list[Entry]
) -> dict[str, StoredContent]:
    """Contents that left the tree at this visit.

    A visit that changed nothing shares every entry with the previous one, so
    nothing left and the previous visit's content index need not be built.
    """
    if previous is not None and len(entries) == len(previous.entries):
        if all(new is old for new, old in zip(entries, previous.entries, strict=True)):
            return {}
    return departed_contents(previous, entries)


def _printable(message: str) -> str:
    """Messages are stored as UTF-8; undecodable bytes become escapes."""
    return message.encode("utf-8", "surrogateescape").decode(
        "utf-8", "backslashreplace"
    )


def check_source(src: Path) -> None:
    """Refuse a source that is missing or not a directory."""
    if not src.exists():
        raise UsageError(f"{src}: source directory does not exist")
    if not src.is_dir():
        raise UsageError(f"{src}: source is not a directory")


def _check_source(src: Path, store) -> None:
    check_source(src)
    if store.local_path is None:
        return
    store_path = store.local_path.resolve()
    if src.resolve() == store_path or store_path in src.resolve().parents:
        raise UsageError(f"{src}: source lies inside the store {store.location}")


def guard_nested_archives(
    src: Path, result, previous_entries: dict[str, Entry], head, skip: bool
) -> None:
    """Warn about archives of the tree inside the tree, or drop them with ``skip``.

    Shared with ``append --dry-run`` so that a preview leaves out what the
    real append would leave out.
    """
    tree_bytes = head.latest().tree_bytes if head.visits else 0
    nested = find_nested_archives(
        src, result.found, previous_entries, tree_bytes, only_changed=not skip
    )
    if not nested:
        return
    if skip:
        names = {archive.path for archive in nested}
        result.found = [item for item in result.found if item.path not in names]
        for archive in nested:
            logger.info(
                "%s: nested archive not recorded (%s)", archive.path, archive.reason
            )
        return
    listing = "; ".join(f"{archive.path} ({archive.reason})" for archive in nested)
    patterns = " ".join(
        f"--exclude '{pattern}'"
        for pattern in sorted({suggested_pattern(a) for a in nested})
    )
    logger.warning(
        "archives of this tree inside the tree will make every visit larger: %s. "
        "Skip them with %s, or with --exclude-nested-archives",
        listing,
        patterns,
    )


def _builder(store, head, previous: Manifest | None, layer_name: str) -> LayerBuilder:
    settings: Settings = store.settings()
    staging = store.backend.scratch_dir() / Path(layer_name).name
    writer = LayerWriter(
        staging, settings.level, settings.thread_count(), store.location
    )
    is_base = previous is None
    index = {} if is_base else (lambda: store.content_index(head, previous))
    source = ContentSource(store.backend, FrameCache(APPEND_FRAME_CACHE_BYTES))
    return LayerBuilder(writer, layer_name, is_base, index, source, settings)


def _record_entries(
    src: Path,
    found: list[Found],
    previous: Manifest | None,
    previous_entries: dict[str, Entry],
    builder: LayerBuilder,
    checksum: bool,
    progress: Progress | None,
) -> tuple[list[Entry], Counts]:
    previous_scan = previous.scan_started_ns if previous else 0
    window = (
        int(previous.info.get("racy_window_ns", COARSE_RACY_WINDOW_NS))
        if previous
        else 0
    )
    leaders: dict[tuple[int, int], Entry] = {}
    counts = Counts()
    entries: list[Entry] = []
    total_bytes = sum(item.stat.st_size for item in found if item.type == FILE)
    done_bytes = 0
    for number, item in enumerate(found, 1):
        old = previous_entries.get(item.path)
        entry = _entry_for(item)
        if item.type == FILE:
            done_bytes += item.stat.st_size
            stored = _record_file(
                src,
                item,
                entry,
                old,
                leaders,
                builder,
                checksum,
                (previous_scan, window),
                counts,
            )
            if not stored:
                continue
        elif builder.is_base or old is None or _differs(old, entry):
            builder.add_metadata_member(entry)
        if old is not None and entry == old:
            # Share the previous visit's entry: a large tree then holds one
            # set of entries, not two, while the new manifest is written.
            entry = old
        elif not builder.is_base:
            detach(entry)
        entries.append(entry)
        _count(counts, old, entry)
        if progress is not None:
            progress(number, len(found), done_bytes, total_bytes)
    return entries, counts


def _entry_for(item: Found) -> Entry:
    info = item.stat
    entry = Entry(
        path=item.path,
        type=item.type,
        mode=shared_int(stat.S_IMODE(info.st_mode)),
        mtime_ns=info.st_mtime_ns,
        target=item.target,
    )
    if item.type == FILE:
        entry.size, entry.inode, entry.ctime_ns = (
            info.st_size,
            info.st_ino,
            info.st_ctime_ns,
        )
    if item.type in ("chardev", "blockdev"):
        entry.rdev = info.st_rdev
    if os.geteuid() == 0:
        entry.uid, entry.gid = info.st_uid, info.st_gid
    return entry


def _record_file(
    src: Path,
    item: Found,
    entry: Entry,
    old: Entry | None,
    leaders: dict[tuple[int, int], Entry],
    builder: LayerBuilder,
    checksum: bool,
    racy_check: tuple[int, int],
    counts: Counts,
) -> bool:
    """Fill in a file entry's content; False when the file cannot be recorded."""
    key = (item.stat.st_dev, item.stat.st_ino)
    leader = leaders.get(key) if item.stat.st_nlink > 1 else None
    if leader is not None:
        entry.hardlink_of = leader.path
        _copy_content(entry, leader)
        builder.add_hardlink_member(entry)
        return True
    reusable = old is not None and old.hardlink_of is None and not builder.is_base
    if reusable and not checksum and stat_matches(old, item):
        if not is_racy(old, *racy_check):
            _copy_content(entry, old)
            _register_leader(leaders, item, entry)
            return True
    if not _read_and_store(src, item, entry, old, builder, counts):
        return False
    _register_leader(leaders, item, entry)
    return True


def _register_leader(leaders: dict, item: Found, entry: Entry) -> None:
    if item.stat.st_nlink > 1:
        leaders[(item.stat.st_dev, item.stat.st_ino)] = entry


def _copy_content(entry: Entry, source: Entry) -> None:
    entry.size = source.size
    entry.content_id = source.content_id
    entry.recipe = source.recipe
    entry.block_ids = source.block_ids


def _read_and_store(
    src: Path,
    item: Found,
    entry: Entry,
    old: Entry | None,
    builder: LayerBuilder,
    counts: Counts,
) -> bool:
    """Read a file until a stable copy is had; never store a torn one."""
    path = src / item.path
    for attempt in range(READ_ATTEMPTS):
        try:
            if _store_stable_copy(path, entry, old, builder):
                return True
        except FileNotFoundError:
            logger.info("%s vanished before it could be read", path)
            return False
        except OSError as error:
            counts.problems.append(f"{path}: cannot read ({error.strerror})")
            logger.warning("%s: cannot read (%s); skipped", path, error.strerror)
            return False
        logger.debug("%s changed while being read (attempt %d)", path, attempt + 1)
    return _keep_previous_version(path, entry, old, counts)


def _keep_previous_version(
    path: Path, entry: Entry, old: Entry | None, counts: Counts
) -> bool:
    if old is not None and old.type == FILE and old.recipe is not None:
        counts.problems.append(
            f"{path}: kept changing while read; previous version kept"
        )
        logger.warning(
            "%s kept changing while read; keeping its previous version", path
        )
        _copy_content(entry, old)
        entry.mtime_ns, entry.mode = old.mtime_ns, old.mode
        return True
    counts.problems.append(f"{path}: kept changing while read; not recorded")
    logger.warning("%s kept changing while read; not recorded in this visit", path)
    return False


def _store_stable_copy(
    path: Path, entry: Entry, old: Entry | None, builder: LayerBuilder
) -> bool:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        fd = os.open(path, flags & ~getattr(os, "O_NOATIME", 0))
    try:
        read_started = time.time_ns()
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise FileNotFoundError(path)
        _take_stat(entry, before)
        if before.st_size > builder.settings.block_mode_size:
            blocks = _iter_blocks(fd, before.st_size, builder.settings.block_size)
            builder.store_blocks(entry, blocks, old)
            return _unchanged(before, os.fstat(fd))
        data = _read_all(fd, before.st_size)
        if len(data) != before.st_size or not _unchanged(before, os.fstat(fd)):
            return False
        if _written_lately(before, read_started) and (
            _read_all(fd, before.st_size, 0) != data
        ):
            return False
        builder.store_small(entry, data, old)
        return True
    finally:
        os.close(fd)


def _take_stat(entry: Entry, info: os.stat_result) -> None:
    entry.size = info.st_size
    entry.mode = stat.S_IMODE(info.st_mode)
    entry.mtime_ns = info.st_mtime_ns
    entry.ctime_ns = info.st_ctime_ns
    entry.inode = info.st_ino


def _unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )


def _written_lately(info: os.stat_result, read_started_ns: int) -> bool:
    """True when a write may have landed in the same clock tick as our read.

    Timestamps come from the kernel's coarse clock, so writes during the read
    can leave mtime and ctime unchanged; such a file is read twice and kept
    only if both reads agree.  A write after the tick of the file's newest
    timestamp would show in the stat after the read, so only files written
    within the racy window are at risk: its narrow width (many clock ticks)
    where the file has sub-second timestamps, its wide one where they are
    whole seconds.  A file written just before an append is then read once
    as soon as the window has passed, not for a whole second after.  The
    window is counted back from before the read began, so a slow read cannot
    hide a write made in its first moments.
    """
    newest = max(info.st_mtime_ns, info.st_ctime_ns)
    fine = info.st_mtime_ns % 1_000_000_000 or info.st_ctime_ns % 1_000_000_000
    window = FINE_RACY_WINDOW_NS if fine else COARSE_RACY_WINDOW_NS
    return newest >= read_started_ns - window


def _read_all(fd: int, size: int, offset: int | None = None) -> bytes:
    if offset is not None:
        os.lseek(fd, offset, os.SEEK_SET)
    chunks = []
    remaining = size + 1
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 8 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _iter_blocks(fd: int, size: int, block_size: int) -> Iterator[bytes | int]:
    """Yield blocks of the file, and the lengths of blocks that are all hole."""
    offset = 0
    while offset < size:
        length = min(block_size, size - offset)
        if _is_hole(fd, offset, length):
            yield length
        else:
            data = os.pread(fd, length, offset)
            # A file that shrank mid-read still yields whole blocks; the stat
            # check after the read then rejects this copy and reads again.
            yield data + bytes(length - len(data))
        offset += length


def _is_hole(fd: int, offset: int, length: int) -> bool:
    try:
        next_data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:
        return True
    return next_data >= offset + length


def _differs(old: Entry, new: Entry) -> bool:
    return (
        old.type != new.type
        or old.mode != new.mode
        or old.mtime_ns != new.mtime_ns
        or old.content_id != new.content_id
        or old.target != new.target
        or old.hardlink_of != new.hardlink_of
        or old.uid != new.uid
        or old.gid != new.gid
        or old.rdev != new.rdev
    )


def _count(counts: Counts, old: Entry | None, new: Entry) -> None:
    if old is None or old.type != new.type:
        counts.added += old is None
        counts.changed += old is not None
        return
    if not _differs(old, new):
        return
    counts.changed += 1
    counts.metadata_only += metadata_only(old, new)


def metadata_only(old: Entry, new: Entry) -> bool:
    """A change that keeps the content, the link target and the hard link.

    Becoming a hard link to another file with the same bytes is not counted:
    the entry now names another file, which is what a reader sees change.
    """
    return (
        old.content_id == new.content_id
        and old.target == new.target
        and old.hardlink_of == new.hardlink_of
    )


def tombstones_between(previous: Manifest | None, entries: list[Entry]) -> list[str]:
    if previous is None:
        return []
    present = {entry.path for entry in entries}
    return sorted(
        (entry.path for entry in previous.entries if entry.path not in present),
        key=os.fsencode,
    )


def write_tombstones(builder: LayerBuilder, tombstones: list[str]) -> None:
    if not tombstones:
        return
    data = b"\0".join(os.fsencode(path) for path in tombstones)
    info = tarfile.TarInfo(f"{RESERVED_PREFIX}/tombstones")
    info.size, info.mode = len(data), 0o600
    builder.writer.add_member(info, [data])


def _add_visit(
    store,
    head,
    manifest: Manifest,
    written: _WrittenLayer,
    layer_name: str,
    builder: LayerBuilder,
) -> VisitRecord:
    """Write the manifest and contents list and add the visit to ``head``.

    The caller commits the head; until then the new objects are invisible.
    """
    entries = manifest.entries
    entry_count = len(entries)
    tree_bytes = sum(e.size for e in entries if e.type == FILE)
    tree_digest = manifest.tree_digest()
    del entries
    manifest_name, reference, contents_name, stored = store.save_visit(
        manifest, written.departed, head.latest(), drop_entries=True
    )
    counts = written.counts
    record = VisitRecord(
        visit=manifest.visit,
        time_ns=time.time_ns(),
        message=manifest.info["message"],
        layer=layer_name,
        manifest=manifest_name,
        manifest_reference=reference,
        contents=contents_name,
        kind="base" if builder.is_base else "delta",
        tree_digest=tree_digest,
        entries=entry_count,
        tree_bytes=tree_bytes,
        added=counts.added,
        changed=counts.changed,
        deleted=written.tombstones,
        metadata_only=counts.metadata_only,
        layer_bytes=store.backend.size(layer_name),
        manifest_bytes=stored,
        stored=builder.tally.as_dict() | {"problems": len(counts.problems)},
    )
    head.visits.append(record)
    head.next_visit = manifest.visit + 1
    return record
