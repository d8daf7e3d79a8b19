"""Rebuild the exact tree of one visit from its manifest.

Materializing reads the visit's manifest and then only the byte ranges its
recipes name, so the cost follows the size of the visit, not its position in
the chain.  A manifest is treated as untrusted input: every path is checked
before anything is written, parents must be directories the manifest itself
creates, and symlinks are made last, so no entry can write outside DEST or
through a link.  Every file is checked against its content id as it is
written.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .backend import no_space_guard
from .content import ContentSource, hash_zeros, validate
from .decodeahead import DecodeAhead
from .errors import CorruptStore, UsageError
from .filewriter import CREATE_FLAGS, FileWriter, set_metadata, write_all
from .head import VisitRecord
from .manifest import (
    BLOCK_DEVICE,
    CHAR_DEVICE,
    DIRECTORY,
    FIFO,
    FILE,
    SYMLINK,
    Entry,
    Manifest,
    visit_path,
)
from .scan import STORE_MARKER

logger = logging.getLogger(__name__)

MAX_FILE_SIZE = 1 << 50
# Files up to this size are held whole in memory and queued for the writer.
QUEUED_FILE_LIMIT = 8 * 1024 * 1024
WRITER_THREADS = 2
IS_ROOT = os.geteuid() == 0
# Called as (files done, files in all, bytes done, bytes in all).
Progress = Callable[[int, int, int, int], None]


@dataclass(frozen=True, slots=True)
class Materialized:
    """What one materialize wrote: with ``--path`` only part of the visit."""

    record: VisitRecord
    entries: int
    tree_bytes: int

    @property
    def visit(self) -> int:
        return self.record.visit


def materialize_visit(
    store,
    visit: int | str | None,
    dest: Path,
    force: bool = False,
    devices: bool = False,
    paths: list[str] | None = None,
    progress: Progress | None = None,
) -> Materialized:
    """Write the tree of ``visit`` into ``dest`` (see :meth:`Store.materialize`)."""
    with store.backend.reader_guard():
        head = store.read_head()
        record = head.resolve(visit, store.location)
        manifest = store.load_manifest(record, keep_reference=False)
        if manifest.tree_digest() != record.tree_digest:
            raise CorruptStore(
                f"visit {record.visit}: manifest {record.manifest} does not match "
                "the tree digest in the head; the store is damaged "
                "(run 'deltatar verify')"
            )
        entries = _select(manifest, paths, record)
        check_entries(entries, record, devices)
        created, keep = _prepare_destination(dest, force, store, entries, record)
        try:
            with no_space_guard(str(dest)):
                _write_tree(store, dest, entries, record, progress)
            _apply_root_metadata(dest, manifest, paths)
        except BaseException:
            _remove_partial_tree(dest, created, keep)
            raise
    logger.info("visit %d materialized into %s", record.visit, dest)
    tree_bytes = sum(entry.size for entry in entries if entry.type == FILE)
    return Materialized(record, len(entries), tree_bytes)


def check_entries(entries: list[Entry], record: VisitRecord, devices: bool) -> None:
    """Refuse a manifest that names unsafe paths, types or sizes."""
    where = f"visit {record.visit}"
    kinds = {entry.path: entry.type for entry in entries}
    if len(kinds) != len(entries):
        raise CorruptStore(f"{where}: manifest lists a path twice")
    for entry in entries:
        _check_path(entry.path, where)
        parent = entry.path.rpartition("/")[0]
        if parent and kinds.get(parent) != DIRECTORY:
            raise CorruptStore(
                f"{where}: {entry.path!r} has no directory {parent!r} above it"
            )
        _check_entry(entry, kinds, where, devices)


def _check_path(path: str, where: str) -> None:
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\0" in path
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise CorruptStore(f"{where}: unsafe path {path!r} in the manifest")


def _check_entry(
    entry: Entry, kinds: dict[str, str], where: str, devices: bool
) -> None:
    if entry.type in (CHAR_DEVICE, BLOCK_DEVICE) and not (
        devices and os.geteuid() == 0
    ):
        raise CorruptStore(
            f"{where}: {entry.path!r} is a device node; only root with --devices "
            "may recreate devices"
        )
    if entry.type != FILE:
        return
    if not 0 <= entry.size <= MAX_FILE_SIZE:
        raise CorruptStore(f"{where}: {entry.path!r} has an impossible size")
    if entry.hardlink_of is not None:
        if kinds.get(entry.hardlink_of) != FILE:
            raise CorruptStore(f"{where}: {entry.path!r} links to a missing file")
        return
    validate(entry.recipe, entry.size, f"{where}: {entry.path!r}")


def _select(
    manifest: Manifest, paths: list[str] | None, record: VisitRecord
) -> list[Entry]:
    if not paths:
        return manifest.entries
    wanted = [visit_path(path) for path in paths]
    by_path = manifest.by_path()
    for path, given in zip(wanted, paths, strict=True):
        if path not in by_path:
            raise UsageError(f"--path {given!r}: not in visit {record.visit}")
    chosen = {
        entry.path
        for entry in manifest.entries
        if any(entry.path == w or entry.path.startswith(w + "/") for w in wanted)
    }
    leaders = {by_path[path].hardlink_of for path in chosen} - {None}
    chosen |= leaders
    for path in list(chosen):
        while "/" in path:
            path = path.rpartition("/")[0]
            chosen.add(path)
    return [entry for entry in manifest.entries if entry.path in chosen]


def _prepare_destination(
    dest: Path, force: bool, store, entries: list[Entry], record: VisitRecord
) -> tuple[bool, list[Path]]:
    """Check and ready DEST; nothing in it is deleted until every check passed.

    Returns whether this call created DEST, and the stores that lie inside
    DEST: restoring a visit into the directory it was recorded from, store
    and all, is how a run is resumed, so the store in use, and any other
    store an append left out of its visits, is kept while everything else
    in DEST is replaced.
    """
    resolved = dest.resolve()
    if store.local_path is not None:
        store_path = store.local_path.resolve()
        if resolved == store_path or store_path in resolved.parents:
            raise UsageError(
                f"{dest}: destination lies inside the store {store.location}"
            )
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise UsageError(f"{dest}: destination exists and is not a directory")
    if not dest.exists():
        _make_destination(dest)
        return True, []
    if not any(dest.iterdir()):
        return False, []
    if not force:
        raise UsageError(
            f"{dest}: destination is not empty; use --force to replace its contents"
        )
    keep = _stores_inside(resolved)
    for store_path in keep:
        _refuse_entries_at(store_path.relative_to(resolved), entries, record)
    _empty_directory(resolved, keep)
    return False, keep


def _make_destination(dest: Path) -> None:
    try:
        dest.mkdir(parents=True)
    except OSError as error:
        raise UsageError(
            f"{dest}: cannot create the destination ({error.strerror})"
        ) from None


def _stores_inside(dest: Path) -> list[Path]:
    """Every deltatar store below ``dest``; symlinks are not followed."""
    if (dest / STORE_MARKER).is_file():
        raise UsageError(f"{dest}: destination is a deltatar store")
    found = []
    for parent, names, files in os.walk(dest):
        if STORE_MARKER in files and parent != os.fspath(dest):
            found.append(Path(parent))
            names.clear()
    return found


def _empty_directory(dest: Path, keep: list[Path]) -> None:
    """Remove everything in ``dest`` except ``keep`` and the folders above them."""
    for child in dest.iterdir():
        if child in keep:
            continue
        if any(child in path.parents for path in keep):
            _empty_directory(child, keep)
        elif child.is_dir() and not child.is_symlink():
            _make_removable(child)
            shutil.rmtree(child)
        else:
            child.unlink()


def _make_removable(directory: Path) -> None:
    """Materialized folders may be read-only; removing their content needs w."""
    for parent, names, _ in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
    os.chmod(directory, 0o700)


def _refuse_entries_at(store_path: Path, entries: list[Entry], record) -> None:
    """A visit holding a path where a store now lies cannot be written there.

    Neither can a visit with a file (or link) at a folder above the store:
    writing it would need the folder, and so the store, gone.
    """
    taken = store_path.as_posix()
    above = {parent.as_posix() for parent in store_path.parents} - {"."}
    for entry in entries:
        if entry.path == taken or entry.path.startswith(taken + "/"):
            raise UsageError(
                f"visit {record.visit} holds {entry.path!r} where the store lies "
                f"({taken}); materialize it into another directory"
            )
        if entry.path in above and entry.type != DIRECTORY:
            raise UsageError(
                f"visit {record.visit} holds a {entry.type} {entry.path!r} where "
                f"a folder holds the store {taken}; materialize it into another "
                "directory"
            )


def _remove_partial_tree(dest: Path, created: bool, keep: list[Path]) -> None:
    """Leave no half-written tree behind a failed materialize."""
    _empty_directory(dest.resolve(), keep)
    if created:
        dest.rmdir()
    logger.info("%s: materialize failed; the partial tree was removed", dest)


def _apply_root_metadata(dest: Path, manifest: Manifest, paths) -> None:
    root = manifest.info.get("root")
    if paths or not isinstance(root, dict):
        return
    os.chmod(dest, int(root["mode"]) & 0o7777)
    os.utime(dest, ns=(int(root["mtime_ns"]), int(root["mtime_ns"])))


def _write_tree(
    store,
    dest: Path,
    entries: list[Entry],
    record: VisitRecord,
    progress: Progress | None,
) -> None:
    source = ContentSource(store.backend)
    root = os.fspath(dest) + "/"
    directories = [entry for entry in entries if entry.type == DIRECTORY]
    for entry in directories:
        _make_directory(root + entry.path)
    files = [e for e in entries if e.type == FILE and e.hardlink_of is None]
    files.sort(key=_read_order)
    _write_files(source, root, files, record, progress)
    for entry in entries:
        if entry.type != DIRECTORY and (entry.type != FILE or entry.hardlink_of):
            _write_other(root, entry)
    for entry in reversed(directories):
        _apply_metadata(root + entry.path, entry)


def _write_files(
    source: ContentSource,
    root: str,
    files: list[Entry],
    record: VisitRecord,
    progress: Progress | None,
) -> None:
    """Check each file's content in this thread; create files on the writer's.

    Frames are decompressed ahead on their own threads, so this thread
    mostly hashes and hands over.  Large files are streamed here instead,
    so memory stays bounded by the writer's queue whatever the file sizes.
    """
    decoder = DecodeAhead(source, [entry.recipe for entry in files])
    writer = FileWriter(WRITER_THREADS)
    total_bytes = sum(entry.size for entry in files)
    done_bytes = 0
    try:
        for number, entry in enumerate(files, 1):
            decoder.ready(number)
            _write_file(source, writer, root, entry, record)
            done_bytes += entry.size
            if progress is not None:
                progress(number, len(files), done_bytes, total_bytes)
    except BaseException:
        decoder.close()
        writer.close()
        raise
    decoder.close()
    writer.finish()


def _write_file(
    source: ContentSource,
    writer: FileWriter,
    root: str,
    entry: Entry,
    record: VisitRecord,
) -> None:
    if entry.size > QUEUED_FILE_LIMIT:
        _stream_file(source, root + entry.path, entry, record)
        return
    parts = list(source.iter_pieces(entry.recipe or []))
    _check_content(parts, entry, record)
    writer.submit(
        root + entry.path,
        parts,
        entry.size,
        entry.mode,
        entry.mtime_ns,
        _owner(entry),
    )


def _make_directory(path: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        # Only a folder above a kept store exists already; anything else is not
        # a directory this materialize may reuse.
        if os.path.islink(path) or not os.path.isdir(path):
            raise


def _read_order(entry: Entry) -> tuple[str, int]:
    """Files in the order their bytes lie in the layers, to reuse frames."""
    for piece in entry.recipe or []:
        if piece[0] in ("raw", "patch"):
            return piece[1], piece[2]
    return "", 0


def _check_content(parts: list[bytes | int], entry: Entry, record) -> None:
    digest = xxhash.xxh3_128()
    for part in parts:
        if isinstance(part, int):
            hash_zeros(digest, part)
        else:
            digest.update(part)
    if digest.hexdigest() != entry.content_id:
        raise _content_mismatch(entry, record)


def _content_mismatch(entry: Entry, record: VisitRecord) -> CorruptStore:
    return CorruptStore(
        f"visit {record.visit}: {entry.path!r} does not match its content id; "
        "the store is damaged (run 'deltatar verify')"
    )


def _stream_file(
    source: ContentSource, path: str, entry: Entry, record: VisitRecord
) -> None:
    """Write a large file piece by piece, checking it as it goes."""
    fd = os.open(path, CREATE_FLAGS, 0o600)
    digest = xxhash.xxh3_128()
    try:
        for part in source.iter_pieces(entry.recipe or []):
            if isinstance(part, int):
                hash_zeros(digest, part)
                os.lseek(fd, part, os.SEEK_CUR)
            else:
                digest.update(part)
                write_all(fd, part)
        os.ftruncate(fd, entry.size)
        if digest.hexdigest() == entry.content_id:
            set_metadata(fd, entry.mode, entry.mtime_ns, _owner(entry))
    finally:
        os.close(fd)
    if digest.hexdigest() != entry.content_id:
        os.unlink(path)
        raise _content_mismatch(entry, record)


def _owner(entry: Entry) -> tuple[int, int] | None:
    if entry.uid is None or entry.gid is None or not IS_ROOT:
        return None
    return entry.uid, entry.gid


def _write_other(root: str, entry: Entry) -> None:
    """Hard links, FIFOs, devices and symlinks, once every file exists."""
    path = root + entry.path
    if entry.type == FILE and entry.hardlink_of is not None:
        os.link(root + entry.hardlink_of, path, follow_symlinks=False)
    elif entry.type == FIFO:
        os.mkfifo(path, 0o600)
        _apply_metadata(path, entry)
    elif entry.type in (CHAR_DEVICE, BLOCK_DEVICE):
        kind = stat.S_IFCHR if entry.type == CHAR_DEVICE else stat.S_IFBLK
        os.mknod(path, kind | 0o600, entry.rdev or 0)
        _apply_metadata(path, entry)
    elif entry.type == SYMLINK:
        os.symlink(entry.target or "", path)
        _apply_metadata(path, entry)


def _apply_metadata(path: str, entry: Entry) -> None:
    is_link = entry.type == SYMLINK
    if entry.uid is not None and entry.gid is not None and os.geteuid() == 0:
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
    if not is_link:
        os.chmod(path, entry.mode)
    os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
