"""Parallel read-ahead for a remote layer that is being read front to back.

A restore asks for a layer's frames one at a time, in order; against an
object store each ask is a round trip.  Once two reads of a layer follow
each other without a gap, the next few chunks are fetched in parallel while
the caller decompresses and writes the current one.  A read that jumps (a
``cat`` of one file, a recipe piece elsewhere) fetches just its own range,
so looking at one file never pulls a whole layer, and memory stays bounded
by ``DEPTH`` chunks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

CHUNK = 4 * 1024 * 1024
DEPTH = 4

Fetch = Callable[[str, int, int], bytes]


class ReadAhead:
    """Ranges of one layer at a time, fetched ahead once reads are sequential."""

    def __init__(self, fetch: Fetch) -> None:
        self.fetch = fetch
        self.pool = ThreadPoolExecutor(DEPTH, thread_name_prefix="deltatar-read")
        self.name: str | None = None
        self.size = 0
        self.expected = -1
        self.chunks: dict[int, Future[bytes]] = {}
        self._lock = threading.Lock()

    def read(self, name: str, offset: int, length: int, size: int) -> bytes:
        """The bytes of ``[offset, offset + length)``, from chunks when possible."""
        with self._lock:
            return self._read(name, offset, length, size)

    def _read(self, name: str, offset: int, length: int, size: int) -> bytes:
        sequential = name == self.name and offset == self.expected
        if name != self.name:
            self._switch(name, size)
        self.expected = offset + length
        data = self._from_chunks(offset, length) if sequential else None
        if data is None:
            self._drop_all()
            data = self.fetch(name, offset, length)
        if sequential:
            self._schedule(offset + length)
        return data

    def _from_chunks(self, offset: int, length: int) -> bytes | None:
        starts = sorted(self.chunks)
        if not starts or starts[0] > offset:
            return None
        parts, position, end = [], offset, offset + length
        for start in starts:
            if start > position:
                return None
            data = self.chunks[start].result()
            if start + len(data) <= position:
                continue
            parts.append(data[position - start : end - start])
            position = min(end, start + len(data))
            if position == end:
                break
        if position != end:
            return None
        for start in starts:
            if start + CHUNK <= end:
                del self.chunks[start]
        return b"".join(parts)

    def _schedule(self, position: int) -> None:
        """Keep ``DEPTH`` chunks in flight from where the reader stands."""
        start = max(self.chunks) + CHUNK if self.chunks else position
        while len(self.chunks) < DEPTH and start < self.size:
            length = min(CHUNK, self.size - start)
            self.chunks[start] = self.pool.submit(self.fetch, self.name, start, length)
            start += CHUNK

    def _switch(self, name: str, size: int) -> None:
        self._drop_all()
        self.name, self.size = name, size

    def _drop_all(self) -> None:
        for future in self.chunks.values():
            future.cancel()
        self.chunks = {}
