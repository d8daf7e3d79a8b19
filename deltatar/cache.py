"""A local cache of a remote store's small immutable objects.

Manifests and contents lists are read by nearly every command, and a remote
store charges a round trip for each.  Their names are never reused for other
bytes (see docs/format.md), so a copy kept on local disk stays right for as
long as the object exists.  Each copy carries an xxh3-128 digest of its bytes
and is checked before use: a damaged or half-written copy is dropped and the
object fetched again, so the cache can make reads faster but never wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

import xxhash

logger = logging.getLogger(__name__)

DIGEST_SIZE = 16
CACHED_KINDS = ("manifests/", "contents/")


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/deltatar``, or ``~/.cache/deltatar`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "deltatar"


class ObjectCache:
    """Copies of one store's immutable objects, keyed by object name."""

    def __init__(self, store_key: str) -> None:
        self.root = cache_home() / store_key

    @staticmethod
    def holds(name: str) -> bool:
        """True for the kinds of object worth caching: small and read often."""
        return name.startswith(CACHED_KINDS)

    def get(self, name: str) -> bytes | None:
        path = self.root / name
        try:
            stored = path.read_bytes()
        except OSError:
            return None
        data, digest = stored[:-DIGEST_SIZE], stored[-DIGEST_SIZE:]
        if len(stored) < DIGEST_SIZE or xxhash.xxh3_128_digest(data) != digest:
            logger.warning("dropping damaged cached copy of %s", name)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data

    def put(self, name: str, data: bytes) -> None:
        """Keep a copy; a cache that cannot be written only costs speed."""
        path = self.root / name
        staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging.write_bytes(data + xxhash.xxh3_128_digest(data))
            os.replace(staging, path)
        except OSError as error:
            logger.debug("cannot cache %s: %s", name, error)
            with contextlib.suppress(OSError):
                staging.unlink()
