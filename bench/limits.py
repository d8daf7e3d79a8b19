"""The floors: what any archiver must at least spend on a visit.

An incremental append has to notice what changed, which at the very least
means one ``lstat`` of every entry, and then read and compress the bytes
that changed.  Those costs are measured here on the same tree, right after
the visit, so that deltatar's append time can be judged against them:

- ``stat_seconds``: GNU find stats every entry of the tree (``-printf %s``
  makes it call lstat on each), the floor of change detection;
- ``read_seconds``: reading every new or changed file once, in order;
- ``compress_seconds``: zstd level 3 of those same bytes, in one stream.

A file counts as changed when its path is new or its size or mtime
differs from the previous visit, which is what a stat-based archiver must
read again.  The bytes are streamed file by file, so the floor never holds
more than one file in memory.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pyzstd

from .measure import run

LEVEL = 3
CHUNK = 4 * 2**20


class FloorTracker:
    """Remembers the previous visit's stats and measures each next visit."""

    def __init__(self) -> None:
        self.previous: dict[str, tuple[int, int]] = {}

    def measure(self, tree: Path) -> dict[str, Any]:
        stat_run = run(["find", tree, "-printf", "%s\\n"])
        current, entries = _file_stats(tree)
        changed = [
            path for path, key in current.items() if self.previous.get(path) != key
        ]
        self.previous = current

        read_seconds, compress_seconds, raw, packed = _read_and_compress(tree, changed)
        return {
            "entries": entries,
            "files": len(current),
            "new_files": len(changed),
            "new_bytes": raw,
            "new_bytes_compressed": packed,
            "stat_seconds": round(stat_run.wall_seconds, 4),
            "read_seconds": round(read_seconds, 4),
            "compress_seconds": round(compress_seconds, 4),
            "floor_seconds": round(
                stat_run.wall_seconds + read_seconds + compress_seconds, 4
            ),
        }


def _file_stats(tree: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """(size, mtime) of every regular file by relative path, and all entries."""
    files, entries = {}, 0
    for directory, dirnames, names in os.walk(tree):
        entries += len(dirnames) + len(names)
        for name in names:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                files[os.path.relpath(path, tree)] = (info.st_size, info.st_mtime_ns)
    return files, entries


def _read_and_compress(tree: Path, paths: list[str]) -> tuple[float, float, int, int]:
    """Seconds spent reading and compressing ``paths``, timed apart."""
    compressor = pyzstd.ZstdCompressor(LEVEL)
    reading = compressing = 0.0
    raw = packed = 0
    for path in sorted(paths):
        with open(tree / path, "rb") as file:
            while True:
                started = time.perf_counter()
                chunk = file.read(CHUNK)
                reading += time.perf_counter() - started
                if not chunk:
                    break
                raw += len(chunk)
                started = time.perf_counter()
                packed += len(compressor.compress(chunk))
                compressing += time.perf_counter() - started
    started = time.perf_counter()
    packed += len(compressor.flush())
    compressing += time.perf_counter() - started
    return reading, compressing, raw, packed
