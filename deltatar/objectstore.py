"""A store kept under a prefix of an S3-compatible bucket.

The store's layout is the one of a local store (docs/format.md): each file
of the store is an object under the prefix.  What the local backend gets
from rename and flock, this one gets from conditional writes:

* objects are written with create-only puts (If-None-Match), so a name is
  never overwritten; a large layer goes up as a parallel multipart upload
  under a fresh random name;
* the head is replaced with If-Match on the ETag read with it, or created
  with If-None-Match when there is none, so of two writers that read the
  same head only one can commit;
* the writer lock is a lease object (lease.py), and because a lease can
  expire while its holder still runs, a writer that deletes anything first
  commits a new head, which makes any older writer's commit fail.

Readers on other machines cannot be seen, so objects a compaction retired
are deleted only after a grace period (``GARBAGE_GRACE_SECONDS``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import xxhash

from .backend import HEAD_NAME, Backend
from .cache import ObjectCache
from .errors import (
    CorruptStore,
    StoreChanged,
    StoreNotFound,
    StoreNotWritable,
    StoreUnavailable,
    UsageError,
)
from .readahead import ReadAhead

try:
    import obstore
    from obstore.exceptions import (
        AlreadyExistsError,
        BaseError,
        NotFoundError,
        PermissionDeniedError,
        PreconditionError,
        UnauthenticatedError,
    )
    from obstore.store import S3Store

    # obstore raises Python's own exceptions for some of these.
    MISSING = (NotFoundError, FileNotFoundError)
    DENIED = (PermissionDeniedError, UnauthenticatedError, PermissionError)
    TAKEN = (AlreadyExistsError, PreconditionError, FileExistsError)
except ImportError:  # pragma: no cover - exercised only without the extra
    obstore = None

logger = logging.getLogger(__name__)

SCHEMES = ("s3",)
MULTIPART_SIZE = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
UPLOAD_CONCURRENCY = 4
UPLOAD_ATTEMPTS = 4
GARBAGE_GRACE_SECONDS = 6 * 3600.0
GRACE_VARIABLE = "DELTATAR_GARBAGE_GRACE"
# Transient errors are retried for long enough to ride out a server restart
# of 20 s or so: at least RETRIES waits of BACKOFF_SECONDS[0] each.
RETRIES = 20
RETRY_SECONDS = 60
BACKOFF_SECONDS = (1.0, 4.0)


def open_backend(url: str) -> ObjectStoreBackend:
    """The backend for an ``s3://bucket/prefix`` URL, configured from the environment."""
    if obstore is None:
        raise UsageError(
            f"{url}: s3:// stores need the obstore package; "
            "install it with: pip install 'deltatar[s3]'"
        )
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise UsageError(f"{url}: a store URL looks like s3://bucket/prefix")
    if parts.query or parts.fragment:
        raise UsageError(f"{url}: a store URL takes no query or fragment")
    prefix = parts.path.removeprefix("/").removesuffix("/")
    # Refused rather than normalized: s3://b//x and s3://b/x would otherwise
    # be two names of one store, and '..' has no meaning in a bucket.
    if prefix and {"", ".", ".."} & set(prefix.split("/")):
        raise UsageError(
            f"{url}: a store URL's prefix takes no empty, '.' or '..' parts"
        )
    try:
        return ObjectStoreBackend(parts.netloc, prefix)
    except ValueError as error:
        raise UsageError(
            f"{url}: not a valid store URL ({_first_line(error)})"
        ) from None


def _client_config() -> tuple[dict[str, Any], dict[str, Any]]:
    """Endpoint and region as the AWS tools read them, plus client options."""
    config: dict[str, Any] = {}
    options: dict[str, Any] = {"connect_timeout": "5s", "timeout": "120s"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    if endpoint:
        config["endpoint"] = endpoint
        options["allow_http"] = endpoint.startswith("http://")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        config["region"] = region
    return config, options


def _retry_config() -> dict[str, Any]:
    return {
        "max_retries": RETRIES,
        "retry_timeout": datetime.timedelta(seconds=RETRY_SECONDS),
        "backoff": {
            "init_backoff": datetime.timedelta(seconds=BACKOFF_SECONDS[0]),
            "max_backoff": datetime.timedelta(seconds=BACKOFF_SECONDS[1]),
            "base": 2,
        },
    }


class ObjectStoreBackend(Backend):
    """A store kept under ``prefix`` in ``bucket`` of an S3-compatible service."""

    commit_before_delete = True

    def __init__(self, bucket: str, prefix: str) -> None:
        config, options = _client_config()
        self.bucket = bucket
        self.location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.store = S3Store(
            bucket,
            prefix=prefix or None,
            config=config,
            client_options=options,
            retry_config=_retry_config(),
        )
        key = f"{config.get('endpoint', 'aws')}|{self.location}"
        self.cache = ObjectCache(xxhash.xxh3_64_hexdigest(key.encode()))
        self.use_cache = True
        self._sizes: dict[str, int] = {}
        self._modified: dict[str, datetime.datetime] = {}
        self._scratch: Path | None = None
        self._lease = None
        self._read_ahead = ReadAhead(self._fetch)

    # -- immutable objects ---------------------------------------------------

    # TODO: uploads report no progress; a large base on a slow link shows a
    # finished progress bar while its layer is still going up.
    def put_file(self, name: str, local_path: Path) -> None:
        size = local_path.stat().st_size
        data = local_path.read_bytes() if size < MULTIPART_SIZE else None
        with self._errors(name):
            if data is not None:
                obstore.put(self.store, name, data, mode="create")
            else:
                self._put_multipart(name, local_path)
        self._sizes[name] = size
        local_path.unlink()

    def _put_multipart(self, name: str, local_path: Path) -> None:
        """Upload parts in parallel, holding a few parts in memory at a time.

        S3 offers no create-only multipart upload through obstore, so the
        name is checked first; the random part of every object name makes a
        clash with another writer's upload impossible in practice.
        """
        # TODO: a writer killed mid-upload leaves its parts on the server,
        # unlisted; only a bucket lifecycle rule removes them.
        checked = False
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                # The check is retried with the upload: a restarting server
                # fails it as readily as a part.
                checked = checked or self._refuse_existing(name)
                self._upload_parts(name, local_path)
                return
            except (BaseError, ConnectionError, TimeoutError) as error:
                # A failed part aborts the whole upload (a server restart can
                # also forget it); the next attempt starts afresh.
                if attempt + 1 == UPLOAD_ATTEMPTS:
                    raise
                logger.warning("upload of %s failed (%s); retrying", name, error)
                time.sleep(2.0 * 2**attempt)

    def _refuse_existing(self, name: str) -> bool:
        with contextlib.suppress(*MISSING):
            obstore.head(self.store, name)
            raise StoreChanged(f"{self.location}: object {name} already exists")
        return True

    def _upload_parts(self, name: str, local_path: Path) -> None:
        with open(local_path, "rb") as handle:
            obstore.put(
                self.store,
                name,
                handle,
                use_multipart=True,
                chunk_size=PART_SIZE,
                max_concurrency=UPLOAD_CONCURRENCY,
            )

    def put_bytes(self, name: str, data: bytes) -> None:
        with self._errors(name):
            obstore.put(self.store, name, data, mode="create")
        self._sizes[name] = len(data)

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        whole = offset == 0 and length is None
        if whole and self.use_cache and self.cache.holds(name):
            cached = self.cache.get(name)
            if cached is not None:
                return cached
        with self._errors(name):
            if length is None:
                data = bytes(obstore.get(self.store, name).bytes())[offset:]
            else:
                data = self._read_range(name, offset, length)
        if whole and self.cache.holds(name):
            self.cache.put(name, data)
        return data

    def _read_range(self, name: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        size = self.size(name)
        if offset + length > size:
            raise CorruptStore(
                f"{self.location}: object {name} is truncated "
                f"(wanted {length} bytes at offset {offset}, got "
                f"{max(0, size - offset)})"
            )
        if name.startswith("layers/"):
            return self._read_ahead.read(name, offset, length, size)
        return self._fetch(name, offset, length)

    def _fetch(self, name: str, offset: int, length: int) -> bytes:
        with self._errors(name):
            return bytes(
                obstore.get_range(self.store, name, start=offset, length=length)
            )

    def size(self, name: str) -> int:
        size = self._sizes.get(name)
        if size is None:
            with self._errors(name):
                size = obstore.head(self.store, name)["size"]
            if name.startswith(("layers/", "manifests/", "contents/")):
                self._sizes[name] = size
        return size

    def list(self, prefix: str) -> list[str]:
        names = []
        with self._errors(prefix or "the listing of the store"):
            try:
                for batch in obstore.list(self.store, prefix):
                    for meta in batch:
                        names.append(meta["path"])
                        self._sizes[meta["path"]] = meta["size"]
                        self._modified[meta["path"]] = meta["last_modified"]
            except BaseError as error:
                self._refuse_missing_bucket(error)
                raise
        return sorted(names)

    def _refuse_missing_bucket(self, error: Exception) -> None:
        """A listing of a missing bucket fails with a bare 404 (not NotFound)."""
        if "404 Not Found" in str(error):
            raise StoreNotFound(
                f"{self.location}: bucket {self.bucket} does not exist "
                "(the object store answered 404 to a listing); create it first"
            ) from None

    def delete(self, name: str) -> None:
        with self._errors(name), contextlib.suppress(*MISSING):
            obstore.delete(self.store, name)
        self._sizes.pop(name, None)

    def replace_config(self, local_path: Path) -> None:
        # The config is the one mutable object besides the head and the
        # lease; it is written only under the writer lock.
        data = local_path.read_bytes()
        with self._errors("config.json"):
            obstore.put(self.store, "config.json", data)
        local_path.unlink()

    # -- the head ------------------------------------------------------------

    def read_head(self) -> tuple[bytes | None, str | None]:
        with self._errors(HEAD_NAME):
            try:
                result = obstore.get(self.store, HEAD_NAME)
                return bytes(result.bytes()), result.meta["e_tag"]
            except MISSING:
                return None, None

    def swap_head(self, data: bytes, expected_token: str | None) -> None:
        mode = "create" if expected_token is None else {"e_tag": expected_token}
        with self._errors(HEAD_NAME):
            obstore.put(self.store, HEAD_NAME, data, mode=mode)

    # -- locks, garbage and local space ---------------------------------------

    @contextlib.contextmanager
    def writer_lock(self, timeout: float, purpose: str) -> Iterator[None]:
        from .lease import Lease

        lease = Lease(self.store, self.location)
        with self._errors("lock"), lease.held(timeout, purpose):
            self._lease = lease
            try:
                yield
            finally:
                self._lease = None
        self._read_ahead = ReadAhead(self._fetch)

    def reader_guard(self) -> contextlib.AbstractContextManager:
        # Readers on other machines cannot be seen; retired objects outlive
        # them by the garbage grace period instead.
        # TODO: a reader running longer than the grace period beside a
        # compaction fails with "missing"; a reader lease would close that.
        return contextlib.nullcontext()

    def readers_active(self) -> bool:
        return False

    def removable_leftovers(self, names: list[str]) -> list[str]:
        """Leftovers written before this writer took the lease.

        Anything older was written by a writer that no longer holds the
        lease; anything newer may be the upload of a writer that lost it
        and still runs, whose commit will fail once ours lands.
        """
        taken_at = self._lease.taken_at if self._lease else None
        if taken_at is None:
            return []
        return [
            name
            for name in names
            if name in self._modified and self._modified[name] < taken_at
        ]

    def expired_garbage(self, retired: dict[str, int]) -> list[str]:
        grace = float(os.environ.get(GRACE_VARIABLE, GARBAGE_GRACE_SECONDS))
        cutoff = time.time_ns() - int(grace * 1e9)
        return [name for name, retired_ns in retired.items() if retired_ns <= cutoff]

    @contextlib.contextmanager
    def uncached(self) -> Iterator[None]:
        self.use_cache = False
        try:
            yield
        finally:
            self.use_cache = True

    def scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="deltatar-"))
            atexit.register(shutil.rmtree, self._scratch, True)
        return self._scratch

    def free_bytes(self) -> int | None:
        return None

    # -- errors ----------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        """Turn obstore's errors into deltatar's, naming the object at fault."""
        try:
            yield
        except MISSING:
            raise CorruptStore(
                f"{self.location}: object {name} is missing; "
                "run 'deltatar verify' to see which visits are affected"
            ) from None
        except TAKEN:
            raise StoreChanged(
                f"{self.location}: the store changed while this command ran "
                f"({name} was written by another writer); run it again"
            ) from None
        except DENIED as error:
            raise StoreNotWritable(
                f"{self.location}: access to {name} denied ({_first_line(error)}); "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except (BaseError, ConnectionError, TimeoutError) as error:
            raise StoreUnavailable(
                f"{self.location}: the object store failed on {name} "
                f"({_first_line(error)}); check --endpoint-url and run the "
                "command again"
            ) from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
