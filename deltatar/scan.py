"""Walk a source tree and tell which entries need their content read.

The walk never follows symlinks (a link is recorded as its target string), never
opens special files (a named pipe would block a reader), and never descends into
the store being written or into any other deltatar store it finds.  Problems
with single paths are collected and reported together, the way ``copytree``
collects its errors, instead of aborting the whole visit.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .errors import SourceError, UsageError
from .manifest import (
    BLOCK_DEVICE,
    CHAR_DEVICE,
    DIRECTORY,
    FIFO,
    FILE,
    SYMLINK,
    Entry,
    shared_int,
)

if TYPE_CHECKING:
    import pathspec

logger = logging.getLogger(__name__)

IGNORE_FILE = ".deltatarignore"
STORE_MARKER = "deltatar-store.json"
# Timestamps this close to the previous scan's start may hide a same-size edit
# made within the same clock tick, so such files are re-read.  Filesystems that
# keep whole seconds get the wide window; the narrow one covers the kernel's
# coarse clock on filesystems with nanosecond timestamps.
COARSE_RACY_WINDOW_NS = 2_000_000_000
FINE_RACY_WINDOW_NS = 100_000_000
TIMESTAMPS_SAMPLED = 256


class Stat(NamedTuple):
    """The lstat fields deltatar uses; a quarter of an ``os.stat_result``.

    A walk of 200,000 files holds one per path, so the size matters.
    """

    st_mode: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_ino: int
    st_dev: int
    st_nlink: int
    st_rdev: int
    st_uid: int
    st_gid: int

    @classmethod
    def of(cls, info: os.stat_result) -> Stat:
        mtime_ns, ctime_ns = info.st_mtime_ns, info.st_ctime_ns
        return cls(
            shared_int(info.st_mode),
            info.st_size,
            mtime_ns,
            # A file written once has equal times: one object serves both.
            mtime_ns if ctime_ns == mtime_ns else ctime_ns,
            info.st_ino,
            shared_int(info.st_dev),
            info.st_nlink,
            info.st_rdev,
            shared_int(info.st_uid),
            shared_int(info.st_gid),
        )


@dataclass(slots=True)
class Found:
    """One path seen by the walk, with the lstat taken then."""

    path: str
    type: str
    stat: Stat
    target: str | None = None


@dataclass(slots=True)
class ScanResult:
    found: list[Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped_stores: list[str] = field(default_factory=list)


def exclusion_spec(src: Path, patterns: list[str]) -> pathspec.PathSpec | None:
    """Combine ``--exclude`` patterns with the source's ``.deltatarignore``.

    None when there is nothing to exclude: the walk then matches no paths,
    and a small append does not pay for importing ``pathspec``.
    """
    origins = ["--exclude" for _ in patterns]
    lines = list(patterns)
    ignore_file = src / IGNORE_FILE
    if ignore_file.is_file():
        ignored = ignore_file.read_text(errors="surrogateescape").splitlines()
        origins += [f"{ignore_file} line {n}" for n in range(1, len(ignored) + 1)]
        lines += ignored
    if not lines:
        return None
    import pathspec

    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except ValueError:
        _refuse_bad_pattern(lines, origins)
        raise


def _refuse_bad_pattern(lines: list[str], origins: list[str]) -> None:
    """Name the pattern pathspec refused and where it came from."""
    import pathspec

    for line, origin in zip(lines, origins, strict=True):
        try:
            pathspec.GitIgnoreSpec.from_lines([line])
        except ValueError:
            hint = " (it may not end in a backslash)" if line.endswith("\\") else ""
            raise UsageError(
                f"{origin}: '{line}' is not a valid pattern{hint}"
            ) from None


def scan(
    src: Path,
    own_store: Path | None,
    excluded: pathspec.PathSpec | None,
    strict: bool = False,
    known: Mapping[str, Entry] | None = None,
) -> ScanResult:
    """Walk ``src`` and return every entry to record, sorted by path bytes.

    ``known`` is the previous visit's entries by path: a path found again
    takes the string its entry already holds, so a walk of 200,000 paths
    does not hold each of them twice.
    """
    result = ScanResult()
    own_identity = _identity(own_store)
    stack = [""]
    while stack:
        relative_dir = stack.pop()
        for found in _list_directory(src, relative_dir, result, strict):
            if excluded is not None and excluded.match_file(_pattern_path(found)):
                continue
            if found.type == DIRECTORY and _is_store(src, found, own_identity, result):
                continue
            if known:
                old = known.get(found.path)
                if old is not None:
                    found.path = old.path
            result.found.append(found)
            if found.type == DIRECTORY:
                stack.append(found.path)
    result.found.sort(key=lambda item: os.fsencode(item.path))
    return result


def racy_window(found: list[Found]) -> int:
    """The racy window for this tree, judged from the timestamps it shows."""
    sampled = [item.stat.st_mtime_ns for item in found[:TIMESTAMPS_SAMPLED]]
    if any(mtime % 1_000_000_000 for mtime in sampled):
        return FINE_RACY_WINDOW_NS
    return COARSE_RACY_WINDOW_NS


def is_racy(entry: Entry, previous_scan_ns: int, window_ns: int) -> bool:
    """True when an unchanged stat may still hide an edit (git's racy case)."""
    newest = max(entry.mtime_ns, entry.ctime_ns or 0)
    return newest >= previous_scan_ns - window_ns


def stat_matches(entry: Entry, found: Found) -> bool:
    """True when the stat data says the file has not changed since ``entry``."""
    info = found.stat
    return (
        entry.type == FILE
        and entry.size == info.st_size
        and entry.mtime_ns == info.st_mtime_ns
        and entry.ctime_ns == info.st_ctime_ns
        and entry.inode == info.st_ino
    )


# TODO: the walk uses whole path strings, so a path longer than PATH_MAX is
# reported and skipped; walking with directory descriptors would record it.
def _list_directory(
    src: Path, relative_dir: str, result: ScanResult, strict: bool
) -> list[Found]:
    directory = src / relative_dir if relative_dir else src
    try:
        with os.scandir(directory) as children:
            listing = sorted(children, key=lambda child: os.fsencode(child.name))
    except OSError as error:
        _problem(result, strict, f"{directory}: cannot list ({error.strerror})")
        return []
    found = []
    for child in listing:
        relative = f"{relative_dir}/{child.name}" if relative_dir else child.name
        item = _examine(child, relative, result, strict)
        if item is not None:
            found.append(item)
    return found


def _examine(
    child: os.DirEntry, relative: str, result: ScanResult, strict: bool
) -> Found | None:
    try:
        info = child.stat(follow_symlinks=False)
    except FileNotFoundError:
        logger.info("%s vanished during the walk", child.path)
        return None
    except OSError as error:
        _problem(result, strict, f"{child.path}: cannot stat ({error.strerror})")
        return None
    kind = _kind(info.st_mode)
    if kind is None:
        _problem(result, False, f"{child.path}: socket skipped")
        return None
    target = None
    if kind == SYMLINK:
        try:
            target = os.readlink(child.path)
        except OSError as error:
            _problem(
                result, strict, f"{child.path}: cannot read link ({error.strerror})"
            )
            return None
    return Found(relative, kind, Stat.of(info), target)


_KINDS = {
    stat.S_IFREG: FILE,
    stat.S_IFDIR: DIRECTORY,
    stat.S_IFLNK: SYMLINK,
    stat.S_IFIFO: FIFO,
    stat.S_IFCHR: CHAR_DEVICE,
    stat.S_IFBLK: BLOCK_DEVICE,
}


def _kind(mode: int) -> str | None:
    return _KINDS.get(stat.S_IFMT(mode))


def _pattern_path(found: Found) -> str:
    return found.path + "/" if found.type == DIRECTORY else found.path


def _identity(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _is_store(
    src: Path, found: Found, own_identity: tuple[int, int] | None, result: ScanResult
) -> bool:
    if (found.stat.st_dev, found.stat.st_ino) == own_identity:
        logger.debug("%s is the store itself; not recorded", found.path)
        return True
    if (src / found.path / STORE_MARKER).is_file():
        logger.warning("%s: another deltatar store; not recorded", src / found.path)
        result.skipped_stores.append(found.path)
        return True
    return False


def _problem(result: ScanResult, strict: bool, message: str) -> None:
    if strict:
        raise SourceError(f"{message}; --strict makes this fatal")
    logger.warning("%s", message)
    result.problems.append(message)
