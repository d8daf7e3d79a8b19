"""The ideal store size: what only the genuinely new bytes of each visit cost.

deltatar's size target is "no more than 1.25 times the ideal", so the ideal is
computed here, independently of deltatar, from the trees alone:

- visit 1 costs a zstd-3 stream of a tar of the whole tree;
- a later visit costs one zstd-3 stream of the concatenated new bytes of its
  files, where a file whose content appeared anywhere before (in any earlier
  visit, or earlier in this one) adds nothing, a file that only grew at its
  end adds its tail, and a file not seen before at its path adds everything;
- an edited file (same path, different bytes, not a mere append) is priced
  as a zstd patch-from of the new bytes against the old ones, unless that is
  no better than compressing it plainly, in which case its bytes join the
  stream.  Patches are already compressed, so they are added on top.

Metadata (paths, modes, listings) is deliberately free: the ideal is a floor
no real store can reach, and the 1.25 factor leaves room for it.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pyzstd
import xxhash

LEVEL = 3
# The decoder of a patch-from frame needs a window covering the old bytes;
# 2 GiB is the largest zstd allows on 64-bit machines.
MAX_WINDOW_LOG = 31
MIN_WINDOW_LOG = 20
# zstd refuses a raw prefix shorter than eight bytes; nothing to gain anyway.
MIN_PREFIX = 8


@dataclass
class IdealVisit:
    """The ideal price of one visit, with the pieces it is made of."""

    visit: int
    ideal_bytes: int
    stream_raw_bytes: int = 0
    stream_bytes: int = 0
    patch_bytes: int = 0
    known_files: int = 0
    tail_files: int = 0
    patched_files: int = 0
    whole_files: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class IdealTracker:
    """Remembers every earlier visit's content and prices each next visit.

    Memory grows with the distinct content of the whole history: the newest
    bytes of every path ever seen are kept to price tails and patches.
    """

    def __init__(self) -> None:
        self.known: set[bytes] = set()
        self.latest: dict[str, bytes] = {}
        self.visits = 0

    def add_visit(self, root: Path) -> IdealVisit:
        self.visits += 1
        files = dict(_regular_files(root))
        if self.visits == 1:
            priced = IdealVisit(1, len(pyzstd.compress(_tar_stream(root), LEVEL)))
            priced.whole_files = len(files)
        else:
            priced = self._price_changes(files)
        self.known.update(content_id(data) for data in files.values())
        self.latest.update(files)
        return priced

    def _price_changes(self, files: dict[str, bytes]) -> IdealVisit:
        priced = IdealVisit(self.visits, 0)
        stream: list[bytes] = []
        seen = set(self.known)

        for path, data in files.items():
            identity = content_id(data)
            if identity in seen:
                priced.known_files += 1
            else:
                self._price_file(priced, stream, data, self.latest.get(path))
            seen.add(identity)

        joined = b"".join(stream)
        priced.stream_raw_bytes = len(joined)
        priced.stream_bytes = len(pyzstd.compress(joined, LEVEL)) if joined else 0
        priced.ideal_bytes = priced.stream_bytes + priced.patch_bytes
        return priced

    def _price_file(
        self, priced: IdealVisit, stream: list[bytes], data: bytes, old: bytes | None
    ) -> None:
        if old is None:
            priced.whole_files += 1
            stream.append(data)
        elif old and data.startswith(old):
            priced.tail_files += 1
            stream.append(data[len(old) :])
        else:
            patch = patch_size(data, old)
            if patch < len(pyzstd.compress(data, LEVEL)):
                priced.patched_files += 1
                priced.patch_bytes += patch
            else:
                priced.whole_files += 1
                stream.append(data)


def content_id(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def patch_size(data: bytes, old: bytes) -> int:
    """Size of a zstd-3 patch-from frame of ``data`` with ``old`` as raw prefix."""
    if len(old) < MIN_PREFIX:
        return len(pyzstd.compress(data, LEVEL))
    window = (len(old) + len(data)).bit_length()
    options = {
        pyzstd.CParameter.compressionLevel: LEVEL,
        pyzstd.CParameter.windowLog: max(MIN_WINDOW_LOG, min(MAX_WINDOW_LOG, window)),
    }
    prefix = pyzstd.ZstdDict(old, is_raw=True).as_prefix
    return len(pyzstd.compress(data, options, prefix))


def _regular_files(root: Path):
    """(relative path, bytes) of every regular file below ``root``, sorted."""
    for directory, dirnames, names in os.walk(root):
        dirnames.sort()
        for name in sorted(names):
            path = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as file:
                    yield os.path.relpath(path, root), file.read()


def _tar_stream(root: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".")
    return buffer.getvalue()
