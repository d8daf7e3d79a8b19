"""The writer lock of an object store: a lease object with an expiry.

An object store has no flock and no process that outlives a crashed writer,
so the lock is an object, ``lock``, created with a create-only put: of two
writers only one can create it.  It holds the owner's host, pid, purpose and
an expiry time.  While the lock is held a thread renews the expiry with a
conditional put (If-Match on the ETag of the holder's own last write), so a
lease that someone else took over is never renewed by its old holder.

A lease whose expiry has passed, or whose holder is a dead process on this
very host, is stale (the host counts only with the same boot and pid
namespace: containers sharing a hostname see each other's pids as gone) and may be taken over by a conditional put on the ETag
read, which again only one writer can win.  Correctness never rests on the
lease alone: the head is committed with If-Match, so a writer that lost its
lease (paused longer than the lease period) fails to commit instead of
overwriting another's visit.  See docs/guarantees.md.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

from .errors import StoreLocked

logger = logging.getLogger(__name__)

LEASE_NAME = "lock"
LEASE_SECONDS = 120.0
RENEW_SECONDS = 30.0
POLL_SECONDS = 0.5


class Lease:
    """One writer's claim on a store's ``lock`` object."""

    def __init__(self, store: Any, location: str) -> None:
        self.store = store
        self.location = location
        self.etag: str | None = None
        self.taken_at: datetime.datetime | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def held(self, timeout: float, purpose: str) -> Iterator[None]:
        """Hold the lease for a block, renewing it until the block ends."""
        holder = _holder(purpose)
        self._acquire(holder, timeout)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(holder, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            self._release()

    def _acquire(self, holder: dict[str, Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._try_create(holder) or self._try_take_over(holder):
                self.taken_at = obstore.head(self.store, LEASE_NAME)["last_modified"]
                return
            if time.monotonic() >= deadline:
                raise StoreLocked(
                    f"{self.location}: locked by {self._describe_holder()}; waited "
                    f"{timeout:g}s (use --lock-timeout to wait longer)"
                )
            time.sleep(POLL_SECONDS)

    def _try_create(self, holder: dict[str, Any]) -> bool:
        try:
            result = obstore.put(self.store, LEASE_NAME, _body(holder), mode="create")
        except AlreadyExistsError:
            return False
        self.etag = result["e_tag"]
        return True

    def _try_take_over(self, holder: dict[str, Any]) -> bool:
        current, etag = self._read()
        if etag is None or not _is_stale(current):
            return False
        try:
            result = obstore.put(
                self.store, LEASE_NAME, _body(holder), mode={"e_tag": etag}
            )
        except (PreconditionError, NotFoundError, FileNotFoundError):
            return False
        logger.warning(
            "%s: took over the stale lock of %s", self.location, _describe(current)
        )
        self.etag = result["e_tag"]
        return True

    def _renew(self, holder: dict[str, Any], stop: threading.Event) -> None:
        while not stop.wait(RENEW_SECONDS):
            try:
                with self._lock:
                    result = obstore.put(
                        self.store, LEASE_NAME, _body(holder), mode={"e_tag": self.etag}
                    )
                    self.etag = result["e_tag"]
            except (PreconditionError, NotFoundError, FileNotFoundError):
                logger.warning(
                    "%s: the writer lock was taken over; this command's commit "
                    "will fail if another writer committed meanwhile",
                    self.location,
                )
                return
            except Exception as error:  # a transient error; the next round retries
                logger.debug("renewing the lock failed: %s", error)

    def _release(self) -> None:
        # TODO: S3 has no conditional delete; between this check and the
        # delete another writer may take over an expired lease and lose it.
        with self._lock, contextlib.suppress(Exception):
            _, etag = self._read()
            if etag == self.etag:
                obstore.delete(self.store, LEASE_NAME)

    def _read(self) -> tuple[dict[str, Any], str | None]:
        try:
            result = obstore.get(self.store, LEASE_NAME)
            data = bytes(result.bytes())
        except (NotFoundError, FileNotFoundError):
            return {}, None
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        return holder if isinstance(holder, dict) else {}, result.meta["e_tag"]

    def _describe_holder(self) -> str:
        holder, etag = self._read()
        return _describe(holder) if etag else "another process"


def _holder(purpose: str) -> dict[str, Any]:
    return {
        "owner": secrets.token_hex(8),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "pid_space": _pid_space(),
        "purpose": purpose,
        "since": time.time(),
    }


def _body(holder: dict[str, Any]) -> bytes:
    return json.dumps(holder | {"expires": time.time() + LEASE_SECONDS}).encode()


def _is_stale(holder: dict[str, Any]) -> bool:
    """Expired, unreadable, or held by a process of this host that is gone."""
    try:
        if time.time() > float(holder["expires"]):
            return True
        if _same_pid_space(holder):
            return not _alive(int(holder["pid"]))
    except (KeyError, TypeError, ValueError):
        return True
    return False


def _pid_space() -> str:
    """This boot of this machine and our pid namespace, or "" when unknown.

    Pids mean the same process only within one pid namespace of one boot;
    a hostname alone is shared by containers and clones.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _same_pid_space(holder: dict[str, Any]) -> bool:
    """Whether the holder's pid can be looked up here; if unsure, it cannot.

    A lease from an older release carries no ``pid_space`` and waits for its
    expiry.
    """
    space = holder.get("pid_space", "")
    return (
        holder["host"] == socket.gethostname() and bool(space) and space == _pid_space()
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    try:
        return f"{holder['purpose']} (pid {holder['pid']} on {holder['host']})"
    except KeyError:
        return "another process"
