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
from typing import TYPE_CHECKING, Any

import pyzstd

from . import head as head_module
from . import manifest as manifest_module
from . import policy as policy_module
from .backend import Backend, LocalBackend
from .content import apply_patch, compress_chunks, prefix_of, validate
from .delta import Settings
from .errors import CorruptStore, StoreChanged, StoreNotFound, UsageError
from .formats import check_document
from .head import Head, VisitRecord
from .manifest import Manifest, StoredContent, gc_paused
from .memory import release_free_memory
from .policy import Policy

if TYPE_CHECKING:
    from .materialize import Materialized

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
        if is_url(location):
            _create_remote(_backend_for(location))
            return cls.open(location)
        path = Path(location)
        if path.is_symlink() and not path.exists():
            raise UsageError(
                f"{path}: is a symlink to {os.readlink(path)}, which does not "
                "exist; create the directory it names or choose another --store"
            )
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
    ) -> Materialized:
        """Rebuild the exact tree of ``visit`` (None: the latest) in ``dest``.

        Returns the visit's record with the number of entries and file bytes
        written, which ``paths=`` makes part of the visit.
        """
        from .materialize import materialize_visit

        with gc_paused():
            return materialize_visit(self, visit, Path(dest), **options)

    def compact(self, keep_last: int | None = None, **options: Any) -> dict[str, Any]:
        """Apply the compaction policy: drop, merge, rebase (see compact.py)."""
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
            self._check_headless()
            return Head(), None
        return head_module.decode(data, self.location), token

    def _check_headless(self) -> None:
        """Refuse a store whose head is gone but whose objects are not.

        Without this, the next writer would take every object for a crashed
        writer's leftovers and delete the whole history.
        """
        count = sum(len(self.backend.list(f"{kind}/")) for kind in OBJECT_DIRS)
        if count:
            raise CorruptStore(
                f"{self.location}: the head (HEAD) is missing but {count} objects "
                "exist under layers/, manifests/ and contents/; nothing was "
                "changed (the layers are plain tar.zst files: see "
                "docs/format.md to recover them by hand)"
            )

    def commit_head(self, head: Head, token: str | None) -> None:
        head.generation += 1
        head.stamp_garbage(time.time_ns())
        self.backend.swap_head(head_module.encode(head), token)

    @property
    def local_path(self) -> Path | None:
        """The store's directory, or None for a store that is not a directory."""
        return getattr(self.backend, "root", None)

    def load_manifest(
        self, record: VisitRecord, keep_reference: bool = True
    ) -> Manifest:
        """The manifest of ``record``'s visit, checked against the head.

        The full manifest a patched one was read against is kept for the
        next read; a caller that reads only one passes ``keep_reference``
        False, so the reference is gone before the entries are built.
        """
        data = self._manifest_bytes(record.manifest, record.manifest_reference)
        if not keep_reference:
            self.forget_manifest_prefix()
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

    def save_manifest(
        self, manifest: Manifest, reference: str, drop_entries: bool = False
    ) -> tuple[str, int, str]:
        """Store a manifest, as a patch against ``reference`` when that pays.

        Consecutive manifests differ in a few lines, so a zstd patch against
        the last full manifest costs bytes in proportion to what changed.
        The reference is always a full manifest: reading one never takes
        more than two objects.  Returns (name, stored bytes, reference used).

        With ``drop_entries`` the manifest lets its entries go once they are
        encoded: a caller done with them saves holding 200,000 entries as
        objects and as bytes at once.
        """
        name = self.new_object_name("manifests", manifest.visit, ".json.zst")
        chunks = manifest_module.encode_chunks(manifest, drop_entries)
        if drop_entries:
            release_free_memory()
        # Prepared once the entries are gone: preparing it briefly takes two
        # copies of a whole manifest.
        prefix = self._manifest_prefix(reference) if reference else None
        if prefix is not None:
            patch = compress_chunks(chunks, prefix)
            if len(patch) <= PATCHED_MANIFEST_SHARE * self.backend.size(reference):
                self.backend.put_bytes(name, patch)
                return name, len(patch), reference
            # Rare (the reference is the last full manifest), so the bytes
            # are rebuilt from the patch rather than kept through it.
            chunks = [bytearray(apply_patch(patch, prefix, None, name))]
        compressed = compress_chunks(chunks)
        self.backend.put_bytes(name, compressed)
        return name, len(compressed), ""

    def save_visit(
        self,
        manifest: Manifest,
        departed: bytes,
        previous_record,
        drop_entries: bool = False,
    ) -> tuple[str, str, str, int]:
        """Store a visit's manifest and the contents that left the tree at it.

        ``departed`` is the contents list as :func:`departed_document` encodes it.

        Returns (manifest name, manifest reference, contents name, bytes).
        """
        reference = ""
        if previous_record is not None:
            reference = previous_record.manifest_reference or previous_record.manifest
        manifest_name, manifest_bytes, used = self.save_manifest(
            manifest, reference, drop_entries
        )
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

    def save_departed(self, visit: int, departed: bytes) -> tuple[str, int]:
        """Store the contents that left the tree at ``visit`` (see content_index).

        ``departed`` is the list as :func:`departed_document` encodes it.
        """
        name = self.new_object_name("contents", visit, ".json.zst")
        return name, self.put_compressed(name, departed)

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
        index.update(manifest_module.content_index_of(latest.entries))
        return index

    def put_compressed(self, name: str, data: bytes) -> int:
        compressed = compress_checked(data)
        self.backend.put_bytes(name, compressed)
        return len(compressed)

    def _manifest_bytes(self, name: str, reference: str) -> bytes | bytearray:
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

    def _read_object(self, name: str) -> bytes | bytearray:
        compressed = self.backend.read(name)
        try:
            return decompress_whole(compressed)
        except pyzstd.ZstdError as error:
            raise CorruptStore(f"{self.location}: {name}: damaged ({error})") from None

    # -- configuration -----------------------------------------------------------

    def _config_document(self) -> dict[str, Any]:
        try:
            data = self.backend.read(CONFIG_NAME)
        except CorruptStore:
            return {}
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise CorruptStore(f"{self.location}: {CONFIG_NAME} does not parse")
        return document

    def settings(self) -> Settings:
        """The store's settings, each checked against the bounds it may take."""
        items = self._config_document().items()
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

    def policy(self) -> Policy:
        """The store's compaction policy (``policy`` in the config)."""
        where = f"{self.location}: {CONFIG_NAME}"
        try:
            return policy_module.from_document(
                self._config_document().get("policy"), where
            )
        except UsageError as error:
            raise CorruptStore(f"{where}: {error}") from None

    def save_settings(self, settings: Settings, policy: Policy | None = None) -> None:
        """Write the settings durably (callers hold the writer lock)."""
        chosen = self.policy() if policy is None else policy
        document = asdict(settings)
        if chosen.as_document():
            document["policy"] = chosen.as_document()
        document = json.dumps(document, indent=1).encode()
        staging = self.backend.scratch_dir() / f"config-{secrets.token_hex(4)}"
        staging.write_bytes(document)
        self.backend.replace_config(staging)

    def config_items(self) -> dict[str, int | str | None]:
        """The settings and the policy by the names ``deltatar config`` uses."""
        items = asdict(self.settings()) | asdict(self.policy())
        return {name.replace("_", "-"): value for name, value in items.items()}

    def configure(self, key: str, value: str) -> None:
        """Change one setting, checking the value first."""
        field_name = key.replace("-", "_")
        if key in policy_module.POLICY_KEYS:
            self._configure_policy(key, value)
            return
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

    def _configure_policy(self, key: str, value: str) -> None:
        parsed = policy_module.parse_value(key, value)
        with self.backend.writer_lock(self.lock_timeout, f"config {key}"):
            policy = self.policy()
            setattr(policy, key.replace("-", "_"), parsed)
            self.save_settings(self.settings(), policy)

    # -- writing -----------------------------------------------------------------

    @contextlib.contextmanager
    def writing(
        self, purpose: str, timeout: float | None = None
    ) -> Iterator[tuple[Head, str | None]]:
        """Hold the writer lock, tidy leftovers, and yield the current head."""
        wait = self.lock_timeout if timeout is None else timeout
        with self.backend.writer_lock(wait, purpose):
            head, token = self.read_head_with_token()
            self.collect_garbage(head, token)
            head, token = self.read_head_with_token()
            yield head, token

    def new_object_name(self, kind: str, visit: int, suffix: str) -> str:
        return f"{kind}/v{visit:06d}-{secrets.token_hex(6)}{suffix}"

    def collect_garbage(self, head: Head, token: str | None) -> None:
        """Delete leftovers of crashed writers, and old layers no reader needs.

        Objects that no head names (a crashed append's) are deleted once the
        backend says no live writer can still name them.  Objects a
        compaction retired stay until the backend says no reader needs them:
        a reader that opened the old head still reads them.

        Where a lock can expire under a writer that still runs, the new head
        is committed before anything is deleted: a writer that started from
        an older head then fails to commit instead of naming deleted objects.
        """
        _clear_scratch(self.backend)
        referenced = head.referenced_objects() | set(head.garbage)
        leftovers = [
            name
            for kind in OBJECT_DIRS
            for name in self.backend.list(f"{kind}/")
            if name not in referenced
        ]
        leftovers = self.backend.removable_leftovers(leftovers)
        expired = self.backend.expired_garbage(head.garbage_since())
        if expired:
            head.drop_garbage(expired)
        fence = self.backend.commit_before_delete and (leftovers or expired)
        if fence:
            self.commit_head(head, token)
        for name in leftovers + expired:
            logger.info(
                "removing %s %s", "retired" if name in expired else "leftover", name
            )
            self.backend.delete(name)
        if expired and not fence:
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


PIECE = 4 * 1024 * 1024
# A stated size beyond this many times the frame is not believed up front.
PLAUSIBLE_RATIO = 256


def compress_checked(data: bytes) -> bytes:
    """zstd with the frame checksum on, so a flipped byte cannot pass unseen."""
    return compress_chunks([data])


def decompress_whole(compressed: bytes) -> bytes | bytearray:
    """Decompress one object into a single buffer.

    ``pyzstd.decompress`` joins its output blocks at the end and so briefly
    holds two copies; a manifest is tens of MB at 200,000 files.  When the
    frame states its size, the output goes piece by piece into one buffer.
    """
    size = pyzstd.get_frame_info(compressed).decompressed_size
    if size is None or size > PLAUSIBLE_RATIO * len(compressed):
        return pyzstd.decompress(compressed)
    output = bytearray(size)
    decompressor = pyzstd.ZstdDecompressor()
    position, data = 0, compressed
    while position < size:
        piece = b"" if decompressor.eof else decompressor.decompress(data, PIECE)
        data = b""
        if not piece:
            raise pyzstd.ZstdError("the frame ends before its stated size")
        output[position : position + len(piece)] = piece
        position += len(piece)
    if not decompressor.eof or decompressor.unused_data:
        return pyzstd.decompress(compressed)
    return output


def is_url(location: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(location)


def _backend_for(location: str | os.PathLike[str]) -> Backend:
    """The backend a location names: a directory, or a URL's object store."""
    text = os.fspath(location)
    if not is_url(text):
        return LocalBackend(Path(text))
    scheme = text.partition("://")[0].lower()
    if scheme != "s3":
        raise UsageError(
            f"{text}: {scheme}:// stores are not supported; "
            "use a directory or an s3://bucket/prefix URL"
        )
    from .objectstore import open_backend

    return open_backend(text)


# How long creating a store waits for a writer that found it first.
CREATE_LOCK_TIMEOUT = 60.0


def _create_remote(backend: Backend) -> None:
    """Write a store header under an empty prefix, unless a store is there.

    The header is put create-only, so of two writers creating the same store
    at once one writes it and both then open the same store.
    """
    with contextlib.suppress(CorruptStore):
        backend.read(HEADER_NAME)
        return
    if backend.list(""):
        raise UsageError(
            f"{backend.location}: holds objects but no deltatar store; "
            "choose an empty or new prefix for --store"
        )
    with contextlib.suppress(StoreChanged):
        backend.put_bytes(HEADER_NAME, _header_document())
        logger.info("created store %s", backend.location)
    _write_empty_head(backend)


def _write_empty_head(backend: Backend) -> None:
    """Give a new store a head with no visits.

    From then on a missing head always means damage: objects left by an
    interrupted first append are leftovers named by no head, which the next
    writer tidies, while a store that lost its head is refused.  A second
    creator racing this one, or a writer that already committed a visit,
    finds the head written and leaves it; the writer lock keeps that check
    and the write together.
    """
    with backend.writer_lock(CREATE_LOCK_TIMEOUT, "create store"):
        with contextlib.suppress(StoreChanged):
            backend.swap_head(head_module.encode(Head()), None)


def _header_document() -> bytes:
    header = {
        "format": "deltatar-store",
        "version": STORE_VERSION,
        "created_ns": time.time_ns(),
        "store_id": secrets.token_hex(16),
    }
    return json.dumps(header, indent=1).encode()


def _create_local(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for kind in OBJECT_DIRS:
        (path / kind).mkdir(exist_ok=True)
    backend = LocalBackend(path)
    backend.put_bytes(HEADER_NAME, _header_document())
    _write_empty_head(backend)
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
