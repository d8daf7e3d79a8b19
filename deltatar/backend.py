"""Where a store's bytes live: immutable objects plus one atomic head.

Everything above this module sees a store as a flat namespace of objects that
are written once and never changed, and a single small *head* object that is
replaced atomically (compare-and-swap).  That is all a store needs, and it is
what both a local directory and an S3-compatible bucket can offer, so a second
backend is a second class here rather than a rewrite of the store.

The local backend makes an object durable before its name appears: bytes go
to ``tmp/``, are fsynced, renamed into place, and the directory is fsynced.
Locks use ``flock`` so that the kernel drops them when their holder dies; a
lock can never go stale.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import CorruptStore, NoSpace, StoreChanged, StoreLocked, StoreNotWritable

logger = logging.getLogger(__name__)

HEAD_NAME = "HEAD"
TMP_DIR = "tmp"
WRITER_LOCK = "lock"
READER_LOCK = "readers.lock"


class Backend(abc.ABC):
    """The storage operations a store is built from."""

    location: str

    @abc.abstractmethod
    def put_file(self, name: str, local_path: Path) -> None:
        """Publish the finished local file as the immutable object ``name``."""

    @abc.abstractmethod
    def put_bytes(self, name: str, data: bytes) -> None:
        """Publish ``data`` as the immutable object ``name``."""

    @abc.abstractmethod
    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes of object ``name`` from ``offset``."""

    @abc.abstractmethod
    def size(self, name: str) -> int:
        """Return the size of object ``name`` in bytes."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Return the names of all objects whose name starts with ``prefix``."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove object ``name``; a missing object is not an error."""

    @abc.abstractmethod
    def replace_config(self, local_path: Path) -> None:
        """Make the finished local file the store's config, atomically."""

    @abc.abstractmethod
    def read_head(self) -> tuple[bytes | None, str | None]:
        """Return the head's bytes and a token naming that version of it."""

    @abc.abstractmethod
    def swap_head(self, data: bytes, expected_token: str | None) -> None:
        """Replace the head with ``data`` if it is still at ``expected_token``."""

    @abc.abstractmethod
    def writer_lock(
        self, timeout: float, purpose: str
    ) -> contextlib.AbstractContextManager:
        """Hold the store's single writer lock for the duration of a block."""

    @abc.abstractmethod
    def reader_guard(self) -> contextlib.AbstractContextManager:
        """Mark this process as reading, so garbage it may need is kept."""

    @abc.abstractmethod
    def readers_active(self) -> bool:
        """True when some process holds a reader guard right now."""

    @abc.abstractmethod
    def scratch_dir(self) -> Path:
        """A local directory for temporary files of the running operation."""

    @abc.abstractmethod
    def free_bytes(self) -> int | None:
        """Free space where new objects go, or None when it is not knowable."""

    # Writers on other machines: whether another writer could be at work
    # while this one holds the writer lock decides how leftovers are removed.
    commit_before_delete = False

    def removable_leftovers(self, names: list[str]) -> list[str]:
        """Of the objects no head names, those no live writer can still name.

        Under an flock no other writer runs, so every leftover is a dead
        writer's; a backend whose lock can expire narrows this down.
        """
        return names

    def expired_garbage(self, retired: dict[str, int]) -> list[str]:
        """Of the objects a compaction retired (name: time_ns), those no reader needs."""
        return [] if self.readers_active() else list(retired)

    def uncached(self) -> contextlib.AbstractContextManager:
        """Read from the store itself, not from a local cache, within a block."""
        return contextlib.nullcontext()


class LocalBackend(Backend):
    """A store kept in a directory of the local filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def put_file(self, name: str, local_path: Path) -> None:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        _fsync_file(local_path)
        with no_space_guard(self.location):
            os.replace(local_path, target)
            _fsync_dir(target.parent)

    def put_bytes(self, name: str, data: bytes) -> None:
        staging = self.scratch_dir() / f"put-{secrets.token_hex(6)}"
        with no_space_guard(self.location):
            staging.write_bytes(data)
        self.put_file(name, staging)

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(name), "rb") as handle:
                handle.seek(offset)
                data = handle.read() if length is None else handle.read(length)
        except (FileNotFoundError, NotADirectoryError):
            raise CorruptStore(
                f"{self.location}: object {name} is missing; "
                "run 'deltatar verify' to see which visits are affected"
            ) from None
        if length is not None and len(data) != length:
            raise CorruptStore(
                f"{self.location}: object {name} is truncated "
                f"(wanted {length} bytes at offset {offset}, got {len(data)})"
            )
        return data

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise CorruptStore(f"{self.location}: object {name} is missing") from None

    def list(self, prefix: str) -> list[str]:
        directory, _, stem = prefix.rpartition("/")
        base = self.root / directory if directory else self.root
        if not base.is_dir():
            return []
        names = []
        for child in base.iterdir():
            if child.name.startswith(stem) and child.is_file():
                names.append(f"{directory}/{child.name}" if directory else child.name)
        return sorted(names)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def replace_config(self, local_path: Path) -> None:
        _fsync_file(local_path)
        with no_space_guard(self.location):
            os.replace(local_path, self._path("config.json"))
            _fsync_dir(self.root)

    def read_head(self) -> tuple[bytes | None, str | None]:
        try:
            data = self._path(HEAD_NAME).read_bytes()
        except FileNotFoundError:
            return None, None
        return data, _token_of(data)

    def swap_head(self, data: bytes, expected_token: str | None) -> None:
        # Callers hold the writer lock, so comparing and renaming cannot race
        # with another deltatar process on this filesystem.
        _, current = self.read_head()
        if current != expected_token:
            raise StoreChanged(
                f"{self.location}: the store changed while this command ran; "
                "run it again"
            )
        staging = self.scratch_dir() / f"head-{secrets.token_hex(6)}"
        with no_space_guard(self.location):
            staging.write_bytes(data)
            _fsync_file(staging)
            os.replace(staging, self._path(HEAD_NAME))
            _fsync_dir(self.root)

    @contextlib.contextmanager
    def writer_lock(self, timeout: float, purpose: str) -> Iterator[None]:
        path = self._path(WRITER_LOCK)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise StoreNotWritable(
                f"{self.location}: cannot write to the store (permission denied); "
                "run as a user that may write it"
            ) from None
        try:
            _acquire(fd, path, timeout, self.location)
            _write_holder(fd, purpose)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def reader_guard(self) -> Iterator[None]:
        path = self._path(READER_LOCK)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            # A read-only store cannot be compacted either; nothing to guard.
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def readers_active(self) -> bool:
        fd = os.open(self._path(READER_LOCK), os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def scratch_dir(self) -> Path:
        path = self.root / TMP_DIR
        path.mkdir(exist_ok=True)
        return path

    def free_bytes(self) -> int | None:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def _path(self, name: str) -> Path:
        return self.root / name


def _token_of(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def _acquire(fd: int, path: Path, timeout: float, location: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StoreLocked(
                    f"{location}: locked by {_read_holder(path)}; waited "
                    f"{timeout:g}s (use --lock-timeout to wait longer)"
                ) from None
            time.sleep(0.05)


def _write_holder(fd: int, purpose: str) -> None:
    holder = {
        "pid": os.getpid(),
        "host": os.uname().nodename,  # gethostname(), without importing socket
        "purpose": purpose,
        "since": time.time(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _read_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"{holder['purpose']} (pid {holder['pid']} on {holder['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def no_space_guard(location: str) -> Iterator[None]:
    """Turn ENOSPC and EDQUOT into :class:`NoSpace` naming the location."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(
                f"{location}: no space left on device; "
                "free some space and run the command again"
            ) from error
        raise


if sys.platform == "win32":  # pragma: no cover - flock is POSIX only
    raise ImportError("deltatar needs a POSIX system")
