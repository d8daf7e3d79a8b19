"""The store: its layout, its head, and the verbs users call.

A store is a directory (or, through another backend, a bucket prefix) that
holds an immutable store header, a config, the head, and immutable objects
under ``layers/``, ``manifests/`` and ``contents/``.  See docs/format.md.

:class:`Store` is the public Python API; the command line is a thin layer on
it::

    from deltatar import Store

    store = Store.open_or_create("run/.deltatar")
    record = store.append("run", message="after verify")
    store.materialize(record.visit, "/tmp/visit")
    store.compact(keep_last=10)
    for record in store.visits():
        print(record.visit, record.message, record.bytes_stored)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pyzstd

from . import head as head_module
from . import manifest as manifest_module
from .backend import Backend, LocalBackend
from .content import apply_patch, make_patch, prefix_of, validate
from .delta import Settings
from .errors import CorruptStore, StoreNotFound, UsageError
from .formats import check_document
from .head import Head, VisitRecord
from .manifest import Manifest, StoredContent, gc_paused

logger = logging.getLogger(__name__)

STORE_VERSION = 1
HEADER_NAME = "deltatar-store.json"
CONFIG_NAME = "config.json"
LOCK_TIMEOUT = 60.0
PATCHED_MANIFEST_SHARE = 0.25
OBJECT_DIRS = ("layers", "manifests", "contents")
SETTING_BOUNDS = {
    "level": (-7, 22),
    "threads": (0, 256),
    "block_mode_size": (64 * 1024, 1 << 40),
    "block_size": (4096, 256 * 1024 * 1024),
    "max_patch_depth": (0, 32),
}


class Store:
    """A deltatar store; open it with :meth:`open` or :meth:`open_or_create`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.location = backend.location
        self.lock_timeout = LOCK_TIMEOUT
        self._prefix_cache: dict[str, pyzstd.ZstdDict] = {}

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, location: str | os.PathLike[str]) -> Store:
        """Open an existing store; :class:`StoreNotFound` if there is none."""
        store = cls(_backend_for(location))
        store._check_header()
        return store

    @classmethod
    def open_or_create(cls, location: str | os.PathLike[str]) -> Store:
        """Open a store, creating an empty one when the location has none."""
        path = Path(location)
        if path.exists() and not path.is_dir():
            raise UsageError(f"{path}: exists and is not a directory, so not a store")
        if not (path / HEADER_NAME).exists():
            leftovers = _foreign_names(path)
            if leftovers:
                raise UsageError(
                    f"{path}: is a non-empty directory without a deltatar store; "
                    "choose an empty or new directory for --store"
                )
            _create_local(path)
        return cls.open(path)

    def _check_header(self) -> None:
        root = getattr(self.backend, "root", None)
        if root is not None and root.exists() and not root.is_dir():
            raise StoreNotFound(f"{self.location}: is a file, not a deltatar store")
        try:
            data = self.backend.read(HEADER_NAME)
        except CorruptStore:
            raise StoreNotFound(
                f"{self.location}: not a deltatar store (no {HEADER_NAME}); "
                "'deltatar append' creates one"
            ) from None
        try:
            header = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise CorruptStore(f"{self.location}: {HEADER_NAME} is damaged") from None
        where = f"{self.location}: {HEADER_NAME}"
        check_document(header, "deltatar-store", STORE_VERSION, where)

    # -- the verbs -------------------------------------------------------------

    def append(self, src: str | os.PathLike[str], **options: Any) -> VisitRecord:
        """Record the current state of ``src`` as the next visit."""
        from .append import append_visit

        with gc_paused():
            return append_visit(self, Path(src), **options)

    def materialize(
        self, visit: int | str | None, dest: str | os.PathLike[str], **options: Any
    ) -> VisitRecord:
        """Rebuild the exact tree of ``visit`` (None: the latest) in ``dest``."""
        from .materialize import materialize_visit

        with gc_paused():
            return materialize_visit(self, visit, Path(dest), **options)

    def compact(self, keep_last: int | None = None, **options: Any) -> dict[str, Any]:
        """Squash the chain into a new base, dropping visits older than kept."""
        from .compact import compact_store

        with gc_paused():
            return compact_store(self, keep_last=keep_last, **options)

    def verify(self, visit: int | str | None = None, quick: bool = False) -> list[str]:
        """Check layers and manifests; return one line per problem found."""
        from .verify import verify_store

        return verify_store(self, visit, quick)

    def visits(self) -> list[VisitRecord]:
        """The visits the store holds, oldest first."""
        with self.backend.reader_guard():
            return self.read_head().visits

    # -- head, manifests, contents ---------------------------------------------

    def read_head(self) -> Head:
        return self.read_head_with_token()[0]

    def read_head_with_token(self) -> tuple[Head, str | None]:
        data, token = self.backend.read_head()
        if data is None:
            return Head(), None
        return head_module.decode(data, self.location), token

    def commit_head(self, head: Head, token: str | None) -> None:
        head.generation += 1
        self.backend.swap_head(head_module.encode(head), token)

    def load_manifest(self, record: VisitRecord) -> Manifest:
        data = self._manifest_bytes(record.manifest, record.manifest_reference)
        manifest = manifest_module.decode(data, record.manifest)
        if manifest.visit != record.visit:
            raise CorruptStore(
                f"{record.manifest}: manifest is for visit {manifest.visit}, "
                f"the head says visit {record.visit}"
            )
        return manifest

    def forget_manifest_prefix(self) -> None:
        """Drop the cached patch reference: a whole manifest's bytes.

        Callers that load one manifest and then hold its entries call this,
        so the entries and the raw bytes they came from are not held at once.
        """
        self._prefix_cache = {}

    def save_manifest(self, manifest: Manifest, reference: str) -> tuple[str, int, str]:
        """Store a manifest, as a patch against ``reference`` when that pays.

        Consecutive manifests differ in a few lines, so a zstd patch against
        the last full manifest costs bytes in proportion to what changed.
        The reference is always a full manifest: reading one never takes
        more than two objects.  Returns (name, stored bytes, reference used).
        """
        name = self.new_object_name("manifests", manifest.visit, ".json.zst")
        # The reference is prepared first: preparing it briefly takes two
        # copies of it, and the encoded manifest need not exist by then.
        # TODO: the encoded manifest and its reference are still whole copies
        # at once (about 55 MB each at 200,000 files); streaming would not be.
        prefix = self._manifest_prefix(reference) if reference else None
        raw = manifest_module.encode(manifest)
        if prefix is not None:
            patch = make_patch(raw, prefix, 3)
            if len(patch) <= PATCHED_MANIFEST_SHARE * self.backend.size(reference):
                self.backend.put_bytes(name, patch)
                return name, len(patch), reference
        return name, self.put_compressed(name, raw), ""

    def save_visit(
        self, manifest: Manifest, departed: dict[str, StoredContent], previous_record
    ) -> tuple[str, str, str, int]:
        """Store a visit's manifest and the contents that left the tree at it.

        Returns (manifest name, manifest reference, contents name, bytes).
        """
        reference = ""
        if previous_record is not None:
            reference = previous_record.manifest_reference or previous_record.manifest
        manifest_name, manifest_bytes, used = self.save_manifest(manifest, reference)
        contents_name, contents_bytes = self.save_departed(manifest.visit, departed)
        return manifest_name, used, contents_name, manifest_bytes + contents_bytes

    def load_departed(self, record: VisitRecord) -> dict[str, StoredContent]:
        """The contents that left the tree at ``record``'s visit, checked."""
        try:
            document = json.loads(self._read_object(record.contents))
            departed = {
                content_id: StoredContent(size, recipe, block_ids)
                for content_id, (size, recipe, block_ids) in document.items()
            }
            for content_id, stored in departed.items():
                validate(stored.recipe, stored.size, f"{record.contents}: {content_id}")
        except (ValueError, TypeError, AttributeError):
            raise CorruptStore(
                f"{record.contents}: contents list is malformed"
            ) from None
        return departed

    def save_departed(
        self, visit: int, departed: dict[str, StoredContent]
    ) -> tuple[str, int]:
        """Store the contents that left the tree at ``visit`` (see content_index)."""
        document = {
            content_id: [stored.size, stored.recipe, stored.block_ids]
            for content_id, stored in departed.items()
        }
        name = self.new_object_name("contents", visit, ".json.zst")
        size = self.put_compressed(
            name, json.dumps(document, separators=(",", ":")).encode()
        )
        return name, size

    def content_index(self, head: Head, latest: Manifest) -> dict[str, StoredContent]:
        """Every content any kept visit holds: the dedup index of an append.

        A content is either in the latest visit or left the tree at some
        visit, where that visit's contents list recorded it; so the latest
        manifest plus all contents lists cover every kept visit while each
        list stays as small as what changed.
        """
        index: dict[str, StoredContent] = {}
        for record in head.visits:
            index.update(self.load_departed(record))
        index.update(latest.content_index())
        return index

    def put_compressed(self, name: str, data: bytes) -> int:
        compressed = compress_checked(data)
        self.backend.put_bytes(name, compressed)
        return len(compressed)

    def _manifest_bytes(self, name: str, reference: str) -> bytes:
        if not reference:
            return self._read_object(name)
        patch = self.backend.read(name)
        return apply_patch(patch, self._manifest_prefix(reference), None, name)

    def _manifest_prefix(self, name: str) -> pyzstd.ZstdDict:
        """A full manifest prepared as a patch reference; the last one is kept."""
        cached = self._prefix_cache.get(name)
        if cached is None:
            cached = prefix_of(self._read_object(name))
            self._prefix_cache = {name: cached}
        return cached

    def _read_object(self, name: str) -> bytes:
        compressed = self.backend.read(name)
        try:
            return pyzstd.decompress(compressed)
        except pyzstd.ZstdError as error:
            raise CorruptStore(f"{name}: damaged ({error})") from None

    # -- configuration -----------------------------------------------------------

    def settings(self) -> Settings:
        """The store's settings, each checked against the bounds it may take."""
        try:
            data = self.backend.read(CONFIG_NAME)
        except CorruptStore:
            return Settings()
        try:
            document = json.loads(data)
            items = document.items()
        except (ValueError, AttributeError):
            raise CorruptStore(
                f"{self.location}: {CONFIG_NAME} does not parse"
            ) from None
        known = {item.name for item in fields(Settings)}
        values = {key: value for key, value in items if key in known}
        for key, value in values.items():
            low, high = SETTING_BOUNDS[key]
            if type(value) is not int or not low <= value <= high:
                raise CorruptStore(
                    f"{self.location}: {CONFIG_NAME}: {key} = {value!r} is not a "
                    f"whole number in {low}..{high}; fix it with 'deltatar config'"
                )
        return Settings(**values)

    def save_settings(self, settings: Settings) -> None:
        """Write the settings durably (callers hold the writer lock)."""
        document = json.dumps(asdict(settings), indent=1).encode()
        staging = self.backend.scratch_dir() / f"config-{secrets.token_hex(4)}"
        staging.write_bytes(document)
        self.backend.replace_config(staging)

    def config_items(self) -> dict[str, int]:
        """The settings by the names ``deltatar config`` uses."""
        settings = asdict(self.settings())
        return {name.replace("_", "-"): value for name, value in settings.items()}

    def configure(self, key: str, value: str) -> None:
        """Change one setting, checking the value first."""
        field_name = key.replace("-", "_")
        bounds = SETTING_BOUNDS.get(field_name)
        if bounds is None:
            known = ", ".join(self.config_items())
            raise UsageError(f"{key}: unknown setting; known: {known}")
        try:
            number = int(value)
        except ValueError:
            raise UsageError(
                f"{key} {value}: the value must be a whole number"
            ) from None
        low, high = bounds
        if not low <= number <= high:
            raise UsageError(f"{key} {value}: the value must lie in {low}..{high}")
        with self.backend.writer_lock(self.lock_timeout, f"config {key}"):
            settings = self.settings()
            setattr(settings, field_name, number)
            self.save_settings(settings)

    # -- writing -----------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, purpose: str) -> Iterator[tuple[Head, str | None]]:
        """Hold the writer lock, tidy leftovers, and yield the current head."""
        with self.backend.writer_lock(self.lock_timeout, purpose):
            head, token = self.read_head_with_token()
            self.collect_garbage(head, token)
            head, token = self.read_head_with_token()
            yield head, token

    def new_object_name(self, kind: str, visit: int, suffix: str) -> str:
        return f"{kind}/v{visit:06d}-{secrets.token_hex(6)}{suffix}"

    def collect_garbage(self, head: Head, token: str | None) -> None:
        """Delete leftovers of crashed writers, and old layers no reader needs.

        Objects that no head ever named (a crashed append's) are deleted at
        once.  Objects a compaction retired stay until no reader holds the
        reader guard, because a reader that opened the old head needs them.
        """
        _clear_scratch(self.backend)
        referenced = head.referenced_objects() | set(head.garbage)
        for kind in OBJECT_DIRS:
            for name in self.backend.list(f"{kind}/"):
                if name not in referenced:
                    logger.info("removing leftover %s", name)
                    self.backend.delete(name)
        if head.garbage and not self.backend.readers_active():
            for name in head.garbage:
                self.backend.delete(name)
            head.garbage = []
            self.commit_head(head, token)

    def disk_usage(self) -> int:
        """Bytes of every object the store holds (what ``du`` would count)."""
        total = 0
        for name in [HEADER_NAME, CONFIG_NAME, "HEAD"]:
            with contextlib.suppress(CorruptStore):
                total += self.backend.size(name)
        for kind in OBJECT_DIRS:
            for name in self.backend.list(f"{kind}/"):
                total += self.backend.size(name)
        return total


def compress_checked(data: bytes) -> bytes:
    """zstd with the frame checksum on, so a flipped byte cannot pass unseen."""
    options = {
        pyzstd.CParameter.compressionLevel: 3,
        pyzstd.CParameter.checksumFlag: 1,
    }
    return pyzstd.compress(data, options)


def _backend_for(location: str | os.PathLike[str]) -> Backend:
    text = os.fspath(location)
    if "://" in text:
        raise UsageError(f"{text}: store URLs are not supported by this version")
    return LocalBackend(Path(text))


def _create_local(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for kind in OBJECT_DIRS:
        (path / kind).mkdir(exist_ok=True)
    header = {
        "format": "deltatar-store",
        "version": STORE_VERSION,
        "created_ns": time.time_ns(),
        "store_id": secrets.token_hex(16),
    }
    LocalBackend(path).put_bytes(HEADER_NAME, json.dumps(header, indent=1).encode())
    logger.info("created store %s", path)


def _foreign_names(path: Path) -> list[str]:
    """Names in ``path`` that a half-finished store creation would not leave."""
    if not path.is_dir():
        return []
    ours = set(OBJECT_DIRS) | {"tmp", "lock", "readers.lock"}
    return [child.name for child in path.iterdir() if child.name not in ours]


def _clear_scratch(backend: Backend) -> None:
    scratch = backend.scratch_dir()
    for leftover in scratch.iterdir():
        with contextlib.suppress(OSError):
            leftover.unlink()
