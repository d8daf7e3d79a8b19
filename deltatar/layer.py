"""Layers: a tar stream cut into independent zstd frames, plus a seek table.

A layer is a POSIX (pax) tar stream compressed as a series of independent
zstd frames, followed by a seek table in the zstd *seekable format* (a
skippable frame that ordinary decompressors ignore).  This gives two
properties at once:

* ``zstd -dc layer | tar -x`` works with stock tools, so a base layer alone
  yields the tree of its visit and users are never locked in;
* any byte range of the tar stream can be read by decompressing only the few
  frames that hold it, so one file of a large layer is cheap to get back.

Small members share frames (zstd needs context to compress small files well);
large members are cut across several frames.  Frames are compressed on a
thread pool because zstd releases the GIL.
"""

from __future__ import annotations

import bisect
import collections
import struct
import tarfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyzstd

from .backend import Backend, no_space_guard
from .errors import CorruptStore

FRAME_SIZE = 2 * 1024 * 1024
# Frames smaller than this are compressed on the calling thread.
INLINE_FRAME_SIZE = 128 * 1024
FAST_LEVEL = -3
BLOCK = tarfile.BLOCKSIZE

SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
FOOTER = struct.Struct("<IBI")
ENTRY = struct.Struct("<II")
MAX_FRAMES = 1 << 27


@dataclass(frozen=True, slots=True)
class LayerSummary:
    """What the store needs to know about a finished layer."""

    raw_bytes: int
    stored_bytes: int
    frames: int


class LayerWriter:
    """Write one layer file; members go in order and are never revisited."""

    def __init__(
        self, path: Path, level: int = 3, threads: int = 1, location: str = ""
    ) -> None:
        self.path = path
        self.level = level
        self.location = location or str(path)
        self._file = open(path, "wb")
        self._buffer = bytearray()
        self._buffer_level = level
        self._raw_offset = 0
        self._frames: list[tuple[int, int]] = []
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads))
        self._pending: collections.deque[tuple[Future[bytes], int]] = (
            collections.deque()
        )
        self._max_pending = 2 * max(1, threads)
        self._member_start = 0

    @property
    def offset(self) -> int:
        """Offset in the uncompressed tar stream where the next byte lands."""
        return self._raw_offset

    def add_member(
        self,
        info: tarfile.TarInfo,
        chunks: Iterable[bytes] = (),
        compressible: bool = True,
    ) -> int:
        """Append a whole tar member and return the offset where its data starts."""
        data_offset = self.begin_member(info, compressible)
        for chunk in chunks:
            self.write_data(chunk)
        self.end_member(info.size)
        return data_offset

    def begin_member(self, info: tarfile.TarInfo, compressible: bool = True) -> int:
        """Write a member's header; its data follows through :meth:`write_data`."""
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        level = self.level if compressible else FAST_LEVEL
        if level != self._buffer_level:
            self._end_frame()
            self._buffer_level = level
        self._member_start = self._raw_offset
        return self._member_start

    def write_data(self, data: bytes) -> None:
        self._write(data)

    def end_member(self, size: int) -> None:
        """Pad the member to the tar block size after checking its length."""
        written = self._raw_offset - self._member_start
        if written != size:
            raise ValueError(f"member data is {written} bytes, its header says {size}")
        self._write(bytes(-written % BLOCK))
        if self._buffer_level != self.level:
            self._end_frame()
            self._buffer_level = self.level

    def copy_members(self, chunks: Iterable[bytes]) -> int:
        """Append tar bytes that already form whole members; return their offset.

        Compaction uses this to carry another layer's members over unchanged,
        so every offset inside them moves by the same amount.
        """
        start = self._raw_offset
        for chunk in chunks:
            self._write(chunk)
        if (self._raw_offset - start) % BLOCK:
            raise ValueError("copied tar bytes do not end on a block boundary")
        return start

    def finish(self) -> LayerSummary:
        """Close the tar stream, write the seek table and fsync the file."""
        self._write(bytes(2 * BLOCK))
        self._end_frame()
        self._drain(0)
        self._pool.shutdown()
        with no_space_guard(self.location):
            self._file.write(_seek_table(self._frames))
            self._file.flush()
            self._file.close()
        summary = LayerSummary(
            self._raw_offset, self.path.stat().st_size, len(self._frames)
        )
        return summary

    def abort(self) -> None:
        """Drop the unfinished layer; closing may fail again on a full disk."""
        self._pool.shutdown(cancel_futures=True)
        try:
            self._file.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)

    def _write(self, data: bytes) -> None:
        self._buffer += data
        self._raw_offset += len(data)
        if len(self._buffer) >= FRAME_SIZE:
            self._end_frame()

    def _end_frame(self) -> None:
        if not self._buffer:
            return
        raw = bytes(self._buffer)
        self._buffer.clear()
        options = {
            pyzstd.CParameter.compressionLevel: self._buffer_level,
            pyzstd.CParameter.checksumFlag: 1,
        }
        if len(raw) < INLINE_FRAME_SIZE:
            # A small frame compresses faster than a worker thread wakes up;
            # a layer of a few changed files then starts no thread at all.
            future: Future[bytes] = Future()
            future.set_result(pyzstd.compress(raw, options))
        else:
            future = self._pool.submit(pyzstd.compress, raw, options)
        self._pending.append((future, len(raw)))
        self._drain(self._max_pending)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            future, raw_size = self._pending.popleft()
            frame = future.result()
            with no_space_guard(self.location):
                self._file.write(frame)
            self._frames.append((len(frame), raw_size))


def _seek_table(frames: list[tuple[int, int]]) -> bytes:
    body = b"".join(ENTRY.pack(stored, raw) for stored, raw in frames)
    body += FOOTER.pack(len(frames), 0, SEEKABLE_MAGIC)
    return struct.pack("<II", SKIPPABLE_MAGIC, len(body)) + body


class FrameCache:
    """A bounded LRU of decompressed frames shared by the readers of one run."""

    def __init__(self, limit_bytes: int = 64 * 1024 * 1024) -> None:
        self.limit = limit_bytes
        self._frames: collections.OrderedDict[tuple[str, int], bytes] = (
            collections.OrderedDict()
        )
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            frame = self._frames.get(key)
            if frame is not None:
                self._frames.move_to_end(key)
            return frame

    def put(self, key: tuple[str, int], frame: bytes) -> None:
        with self._lock:
            self._frames[key] = frame
            self._size += len(frame)
            while self._size > self.limit and len(self._frames) > 1:
                _, dropped = self._frames.popitem(last=False)
                self._size -= len(dropped)


class LayerReader:
    """Random access to the uncompressed tar stream of one layer."""

    def __init__(self, backend: Backend, name: str, cache: FrameCache) -> None:
        self.backend = backend
        # Damage is reported with the store's location: the object name alone
        # does not say which store (or bucket) holds it.
        self.where = f"{backend.location}: {name}"
        self.name = name
        self.cache = cache
        self._stored_offsets: list[int] = []
        self._raw_offsets: list[int] = []
        self._load_seek_table()

    @property
    def raw_size(self) -> int:
        return self._raw_offsets[-1]

    @property
    def frame_count(self) -> int:
        return len(self._raw_offsets) - 1

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(self.iter_range(offset, length))

    def iter_range(self, offset: int, length: int) -> Iterator[bytes]:
        """Yield the bytes of ``[offset, offset + length)`` frame by frame."""
        if offset < 0 or length < 0 or offset + length > self.raw_size:
            raise CorruptStore(
                f"{self.where}: range {offset}+{length} lies outside the layer "
                f"({self.raw_size} bytes)"
            )
        end = offset + length
        index = bisect.bisect_right(self._raw_offsets, offset) - 1
        while offset < end:
            frame = self.frame(index)
            start = offset - self._raw_offsets[index]
            piece = frame[start : start + (end - offset)]
            yield piece
            offset += len(piece)
            index += 1

    def frames_of(self, offset: int, length: int) -> range:
        """The indexes of the frames that hold ``[offset, offset + length)``.

        A range outside the layer yields what lies inside it; reading it
        is what reports the damage.
        """
        if length <= 0:
            return range(0)
        first = max(0, bisect.bisect_right(self._raw_offsets, offset) - 1)
        last = bisect.bisect_left(self._raw_offsets, offset + length)
        return range(min(first, self.frame_count), min(last, self.frame_count))

    def check_all_frames(self) -> None:
        """Decompress every frame once, so damage anywhere is found."""
        for index in range(self.frame_count):
            self.frame(index, keep=False)

    def frame(self, index: int, keep: bool = True) -> bytes:
        key = (self.name, index)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        stored_start = self._stored_offsets[index]
        stored_size = self._stored_offsets[index + 1] - stored_start
        compressed = self.backend.read(self.name, stored_start, stored_size)
        raw_size = self._raw_offsets[index + 1] - self._raw_offsets[index]
        try:
            frame = pyzstd.decompress(compressed)
        except pyzstd.ZstdError as error:
            raise CorruptStore(
                f"{self.where}: frame {index} is damaged ({error})"
            ) from None
        if len(frame) != raw_size:
            raise CorruptStore(
                f"{self.where}: frame {index} holds {len(frame)} bytes, "
                f"the seek table says {raw_size}"
            )
        if keep:
            self.cache.put(key, frame)
        return frame

    def _load_seek_table(self) -> None:
        total = self.backend.size(self.name)
        if total < FOOTER.size + 8:
            raise CorruptStore(f"{self.where}: too short to be a layer ({total} bytes)")
        count, descriptor, magic = FOOTER.unpack(
            self.backend.read(self.name, total - FOOTER.size, FOOTER.size)
        )
        entry_size = ENTRY.size + (4 if descriptor & 0x80 else 0)
        table_size = 8 + count * entry_size + FOOTER.size
        if magic != SEEKABLE_MAGIC or count > MAX_FRAMES or table_size > total:
            raise CorruptStore(f"{self.where}: seek table is missing or damaged")
        table = self.backend.read(self.name, total - table_size, table_size)
        skippable, body_size = struct.unpack_from("<II", table)
        if skippable != SKIPPABLE_MAGIC or body_size != table_size - 8:
            raise CorruptStore(f"{self.where}: seek table header is damaged")
        self._index_frames(table, count, entry_size, total - table_size)

    def _index_frames(
        self, table: bytes, count: int, entry_size: int, limit: int
    ) -> None:
        stored, raw = 0, 0
        self._stored_offsets.append(0)
        self._raw_offsets.append(0)
        for number in range(count):
            stored_size, raw_size = ENTRY.unpack_from(table, 8 + number * entry_size)
            stored += stored_size
            raw += raw_size
            self._stored_offsets.append(stored)
            self._raw_offsets.append(raw)
        if stored != limit:
            raise CorruptStore(
                f"{self.where}: seek table covers {stored} bytes of frames, "
                f"the layer has {limit}"
            )
