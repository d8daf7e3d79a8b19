"""Write restored files on a few threads.

Materializing a tree of small files costs mostly system calls: creating a
file, writing it, setting its owner, mode and times.  Those calls release the
GIL, so a handful of threads doing them overlaps the kernel's work with the
decompression and hashing the main thread does.  Each file is written with as
few calls as its content allows (one ``writev`` for data without holes) and
its metadata is set through the open descriptor, never by path again.

Callers hand over a file's content already checked against its content id,
so nothing unverified is ever written.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_PENDING_BYTES = 32 * 1024 * 1024
MAX_PENDING_BATCHES = 16
# Files are handed to the pool in batches: one task per file costs a few
# lock handoffs each, which on a tree of small files cost more system time
# than creating the files themselves.
BATCH_FILES = 64
BATCH_BYTES = 1024 * 1024
# writev takes at most IOV_MAX buffers (1024 on Linux).
MAX_BUFFERS = 1024

Owner = tuple[int, int] | None
FileJob = tuple[str, Sequence[bytes | int], int, int, int, Owner]


class FileWriter:
    """A bounded queue of files to create, written by a small thread pool.

    At most :data:`MAX_PENDING_BYTES` of content waits at any time; an error
    of any write is raised by the next :meth:`submit` or by :meth:`finish`.
    """

    def __init__(self, threads: int = 2) -> None:
        """``threads`` 0 writes each batch in the caller's thread."""
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads else None
        self._pending: collections.deque[tuple[Future[None], int]] = collections.deque()
        self._pending_bytes = 0
        self._batch: list[FileJob] = []
        self._batch_bytes = 0

    def submit(
        self,
        path: str,
        parts: Sequence[bytes | int],
        size: int,
        mode: int,
        mtime_ns: int,
        owner: Owner,
    ) -> None:
        """Queue one file; ``parts`` are data and hole lengths, in order."""
        self._batch.append((path, parts, size, mode, mtime_ns, owner))
        self._batch_bytes += size
        if len(self._batch) >= BATCH_FILES or self._batch_bytes >= BATCH_BYTES:
            self._send_batch()

    def finish(self) -> None:
        """Wait for every queued file; raise the first error any write met."""
        try:
            self._send_batch()
            while self._pending:
                self._wait_oldest()
        finally:
            self.close()

    def close(self) -> None:
        """Stop without waiting for queued files (after an error elsewhere)."""
        for future, _ in self._pending:
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pending.clear()
        self._batch.clear()

    def _send_batch(self) -> None:
        if not self._batch:
            return
        if self._pool is None:
            _write_batch(self._batch)
            self._batch = []
            self._batch_bytes = 0
            return
        future = self._pool.submit(_write_batch, self._batch)
        self._pending.append((future, self._batch_bytes))
        self._pending_bytes += self._batch_bytes
        self._batch = []
        self._batch_bytes = 0
        while (
            self._pending_bytes > MAX_PENDING_BYTES
            or len(self._pending) > MAX_PENDING_BATCHES
        ):
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, size = self._pending.popleft()
        self._pending_bytes -= size
        future.result()


def _write_batch(jobs: list[FileJob]) -> None:
    for job in jobs:
        write_file(*job)


def write_file(
    path: str,
    parts: Sequence[bytes | int],
    size: int,
    mode: int,
    mtime_ns: int,
    owner: Owner,
) -> None:
    """Create ``path`` holding ``parts`` and give it its metadata."""
    fd = os.open(path, CREATE_FLAGS, 0o600)
    try:
        write_parts(fd, parts, size)
        set_metadata(fd, mode, mtime_ns, owner)
    finally:
        os.close(fd)


def write_parts(fd: int, parts: Sequence[bytes | int], size: int) -> None:
    """Write data and leave holes, then fix the length (a file may end in one)."""
    if not any(isinstance(part, int) for part in parts):
        _write_buffers(fd, parts, size)
        return
    for part in parts:
        if isinstance(part, int):
            os.lseek(fd, part, os.SEEK_CUR)
        else:
            write_all(fd, part)
    os.ftruncate(fd, size)


def set_metadata(fd: int, mode: int, mtime_ns: int, owner: Owner) -> None:
    """Owner first (it clears set-id bits), then mode, then times."""
    if owner is not None:
        os.fchown(fd, *owner)
    os.fchmod(fd, mode)
    os.utime(fd, ns=(mtime_ns, mtime_ns))


def _write_buffers(fd: int, buffers: Sequence[bytes], total: int) -> None:
    """Write ``buffers`` with as few calls as the kernel lets us."""
    if len(buffers) <= 1 or len(buffers) > MAX_BUFFERS:
        for buffer in buffers:
            write_all(fd, buffer)
        return
    written = os.writev(fd, buffers)
    if written < total:
        write_all(fd, b"".join(buffers)[written:])


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``; a write may take less than it was given."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
