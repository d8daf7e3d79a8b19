"""Spot archives inside the source that hold the source itself.

The failure deltatar exists to prevent is a directory whose earlier archives
live inside it: each new archive contains all the previous ones and sizes
double per visit.  deltatar never archives its own store, but a pipeline may
still write tar or zip files of the tree into the tree.  This module finds
such files cheaply (only new or changed archives are opened, and only their
first members are listed) so the user can be warned, or they can be skipped.
"""

from __future__ import annotations

import logging
import lzma
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyzstd

from .manifest import FILE, Entry
from .scan import Found, stat_matches

logger = logging.getLogger(__name__)

# What a damaged or merely misnamed archive may raise while its members are
# listed; such a file is simply not treated as an archive.
UNREADABLE_ARCHIVE = (
    OSError,
    EOFError,
    ValueError,
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    pyzstd.ZstdError,
)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.xz", ".zip")
MEMBERS_LOOKED_AT = 500
GROWTH_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class NestedArchive:
    path: str
    reason: str


def find_nested_archives(
    src: Path,
    found: list[Found],
    previous: dict[str, Entry],
    previous_tree_bytes: int,
    only_changed: bool = True,
) -> list[NestedArchive]:
    """Archives that contain paths of the tree, or grow by about the tree's size.

    With ``only_changed`` an archive already seen unchanged in the previous
    visit is not opened again: it was reported when it appeared.
    """
    tree_paths = {item.path for item in found}
    suspects = []
    for item in found:
        if item.type != FILE or not item.path.lower().endswith(ARCHIVE_SUFFIXES):
            continue
        old = previous.get(item.path)
        if only_changed and old is not None and stat_matches(old, item):
            continue
        reason = _reason(src / item.path, item, old, tree_paths, previous_tree_bytes)
        if reason:
            suspects.append(NestedArchive(item.path, reason))
    return suspects


def suggested_pattern(archive: NestedArchive) -> str:
    """The ``--exclude`` pattern that would leave this kind of file out."""
    name = archive.path.rpartition("/")[2]
    return name


def _reason(
    path: Path,
    item: Found,
    old: Entry | None,
    tree_paths: set[str],
    previous_tree_bytes: int,
) -> str | None:
    member = _member_of_tree(path, tree_paths)
    if member is not None:
        return f"contains {member!r}, a path of the tree"
    grown = item.stat.st_size - (old.size if old is not None else 0)
    if previous_tree_bytes and grown >= GROWTH_SHARE * previous_tree_bytes:
        return f"grew by {grown} bytes, about the size of the whole tree"
    return None


def _member_of_tree(path: Path, tree_paths: set[str]) -> str | None:
    """A member that is a path of the tree, if the archive looks like a copy of it.

    One shared nested path, or three shared top-level names, is taken as a sign;
    a single common name such as ``README`` is not.
    """
    try:
        names = _member_names(path)
    except UNREADABLE_ARCHIVE as error:
        logger.debug("%s: not inspected as an archive (%s)", path, error)
        return None
    shared = []
    for name in names:
        normal = name.lstrip("./").rstrip("/")
        for candidate in [normal] + _suffixes(normal):
            if candidate in tree_paths:
                if "/" in candidate:
                    return candidate
                shared.append(candidate)
                break
    return shared[0] if len(shared) >= 3 else None


def _suffixes(name: str) -> list[str]:
    """``run/worktree/a.py`` also matches a tree path ``worktree/a.py``."""
    parts = name.split("/")
    return ["/".join(parts[index:]) for index in range(1, len(parts))]


def _member_names(path: Path) -> list[str]:
    if path.name.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()[:MEMBERS_LOOKED_AT]
    with _open_tar(path) as archive:
        names = []
        for member in archive:
            names.append(member.name)
            if len(names) >= MEMBERS_LOOKED_AT:
                break
        return names


def _open_tar(path: Path) -> tarfile.TarFile:
    lower = path.name.lower()
    if lower.endswith((".tar.zst", ".tzst")):
        return tarfile.open(fileobj=pyzstd.ZstdFile(path), mode="r|")
    return tarfile.open(path, mode="r|*")
