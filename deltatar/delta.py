"""Write the content of one visit into its layer, storing only what is new.

The :class:`LayerBuilder` decides, file by file, the cheapest way to make the
bytes available again:

1. content whose id the store already holds costs nothing (dedup covers
   renames, copies, and files deleted and re-created);
2. a file that grew and whose old bytes are an unchanged prefix stores only
   the tail (checked by hashing the prefix, never by trusting sizes);
3. an edited file stores a zstd patch-from delta against its previous version
   when that is clearly smaller than the compressed file, as long as the
   chain of patches stays within ``max_patch_depth``;
4. files larger than ``block_mode_size`` are cut into fixed blocks; only
   blocks whose id is new are stored, and all-zero blocks are holes.  This
   keeps memory bounded for multi-gigabyte files (see docs/format.md).

A base layer is written so that ``tar -x`` yields the whole tree: every entry
gets a member at its own path with all of its bytes.  A delta layer holds
members only for what changed; tails, patches and blocks go under the
reserved ``.deltatar/`` prefix.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyzstd
import xxhash

from .content import (
    PATCH,
    RAW,
    ZERO,
    ContentSource,
    content_id,
    hash_zeros,
    make_patch,
    patch_depth,
)
from .layer import LayerWriter
from .manifest import (
    BLOCK_DEVICE,
    CHAR_DEVICE,
    DIRECTORY,
    FIFO,
    FILE,
    SYMLINK,
    Entry,
    Recipe,
    StoredContent,
)

logger = logging.getLogger(__name__)

RESERVED_PREFIX = ".deltatar"
SAMPLE_SIZE = 64 * 1024
MIN_PATCH_SIZE = 4096
MAX_PIECES = 64
CLEARLY_SMALL_PATCH_SHARE = 16


@dataclass(slots=True)
class Settings:
    """Per-store tuning of how content is encoded (kept in the store config)."""

    level: int = 3
    threads: int = 0
    block_mode_size: int = 32 * 1024 * 1024
    block_size: int = 4 * 1024 * 1024
    max_patch_depth: int = 4

    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass(slots=True)
class Tally:
    """How many bytes this layer stored, and how it saved the rest."""

    full_bytes: int = 0
    tail_bytes: int = 0
    patch_bytes: int = 0
    block_bytes: int = 0
    deduplicated_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        # Patched files are counted apart: their new bytes are the edits,
        # which only the stored patch size tells.
        return {
            "new_bytes": self.full_bytes + self.tail_bytes + self.block_bytes,
            "full_bytes": self.full_bytes,
            "tail_bytes": self.tail_bytes,
            "patch_source_bytes": self.patch_bytes,
            "block_bytes": self.block_bytes,
            "deduplicated_bytes": self.deduplicated_bytes,
        }


class LayerBuilder:
    """Encode the entries of one visit into one layer."""

    def __init__(
        self,
        writer: LayerWriter,
        layer_name: str,
        is_base: bool,
        index: dict[str, StoredContent] | Callable[[], dict[str, StoredContent]],
        source: ContentSource,
        settings: Settings,
    ) -> None:
        self.writer = writer
        self.layer_name = layer_name
        self.is_base = is_base
        self._index = index if isinstance(index, dict) else None
        self._load_index = None if isinstance(index, dict) else index
        self.source = source
        self.settings = settings
        self.tally = Tally()

    @property
    def index(self) -> dict[str, StoredContent]:
        """Every content the store holds, loaded when first needed.

        Reading it means reading the contents list of every visit, which a
        visit that stores no content (nothing changed) can skip.
        """
        if self._index is None:
            self._index = self._load_index()
        return self._index

    def forget_index(self) -> None:
        """Drop the index once nothing more is stored, to free its memory."""
        self._index = {}

    # -- entries without content -------------------------------------------

    def add_metadata_member(self, entry: Entry) -> None:
        """Record a directory, link, pipe or device as a tar member."""
        self.writer.add_member(tar_info(entry))

    def add_hardlink_member(self, entry: Entry) -> None:
        if self.is_base:
            self.writer.add_member(tar_info(entry))

    # -- whole files held in memory ----------------------------------------

    def store_small(self, entry: Entry, data: bytes, previous: Entry | None) -> None:
        """Fill in ``entry``'s content id and recipe for ``data``."""
        entry.content_id = content_id(data)
        entry.block_ids = None
        known = self.index.get(entry.content_id)
        if self.is_base:
            entry.recipe = self._store_full(entry, data)
        elif known is not None:
            entry.recipe = known.recipe
            self.tally.deduplicated_bytes += len(data)
        else:
            entry.recipe = (
                self._try_tail(entry, data, previous)
                or self._try_patch(entry, data, previous)
                or self._store_full(entry, data)
            )
        self._remember(entry)

    def _store_full(self, entry: Entry, data: bytes) -> Recipe:
        info = tar_info(entry, size=len(data))
        offset = self.writer.add_member(info, [data], _compressible(data))
        self.tally.full_bytes += len(data)
        return [[RAW, self.layer_name, offset, len(data)]] if data else []

    def _try_tail(
        self, entry: Entry, data: bytes, previous: Entry | None
    ) -> Recipe | None:
        if previous is None or previous.recipe is None or previous.block_ids:
            return None
        old_size = previous.size
        if not 0 < old_size < len(data) or len(previous.recipe) >= MAX_PIECES:
            return None
        if content_id(data[:old_size]) != previous.content_id:
            return None
        tail = data[old_size:]
        name = f"{RESERVED_PREFIX}/tail/{entry.content_id}"
        offset = self.writer.add_member(_blob_info(name, len(tail)), [tail])
        self.tally.tail_bytes += len(tail)
        logger.debug("%s: stored a %d byte tail", entry.path, len(tail))
        return previous.recipe + [[RAW, self.layer_name, offset, len(tail)]]

    # TODO: patches are made only against the previous version at the same
    # path, so a file renamed and edited in one visit is stored whole.
    def _try_patch(
        self, entry: Entry, data: bytes, previous: Entry | None
    ) -> Recipe | None:
        if previous is None or previous.recipe is None or previous.block_ids:
            return None
        if len(data) < MIN_PATCH_SIZE or previous.size < MIN_PATCH_SIZE:
            return None
        reference_recipe = self._patch_reference(previous.recipe)
        if reference_recipe is None:
            return None
        if reference_recipe is previous.recipe:
            reference = self.source.read_verified(
                previous.recipe, previous.content_id, previous.path
            )
        else:
            reference = self.source.read_all(reference_recipe)
        patch = make_patch(data, reference, self.settings.level)
        if not _patch_pays(patch, data, self.settings.level):
            return None
        name = f"{RESERVED_PREFIX}/patch/{entry.content_id}"
        offset = self.writer.add_member(_blob_info(name, len(patch)), [patch], False)
        self.tally.patch_bytes += len(data)
        logger.debug("%s: stored a %d byte patch", entry.path, len(patch))
        return [
            [PATCH, self.layer_name, offset, len(patch), len(data), reference_recipe]
        ]

    def _patch_reference(self, recipe: Recipe) -> Recipe | None:
        """The version to patch against: the previous one, or its chain's root.

        Patching against the previous version gives the smallest patch, but
        each patch deepens the chain a restore must walk.  Past the depth
        limit the new patch goes against the root of the chain instead, which
        keeps the depth at one while the file keeps most of its bytes.
        """
        if patch_depth(recipe) < self.settings.max_patch_depth:
            return recipe
        if len(recipe) != 1 or recipe[0][0] != PATCH:
            return None
        root = recipe[0][5]
        while len(root) == 1 and root[0][0] == PATCH:
            root = root[0][5]
        if patch_depth(root) != 0 or self.settings.max_patch_depth < 1:
            return None
        return root

    # -- large files, block by block ---------------------------------------

    # TODO: blocks have fixed offsets, so an insertion near the start of a large
    # file stores every block after it again; content-defined chunks would not.
    def store_blocks(
        self, entry: Entry, blocks: Iterator[bytes | int], previous: Entry | None
    ) -> None:
        """Store a large file given as blocks (bytes) and holes (int lengths)."""
        known_blocks = _blocks_of(previous)
        whole = xxhash.xxh3_128()
        recipe: Recipe = []
        block_ids: list[str] = []
        member = (
            _StreamingMember(self.writer, tar_info(entry)) if self.is_base else None
        )
        for block in blocks:
            piece, block_id = self._store_block(block, known_blocks, whole, member)
            recipe.append(piece)
            block_ids.append(block_id)
        if member is not None:
            member.close(entry.size)
        entry.content_id = whole.hexdigest()
        entry.recipe, entry.block_ids = recipe, block_ids
        self._remember(entry)

    def _store_block(
        self,
        block: bytes | int,
        known_blocks: dict[str, list[Any]],
        whole: Any,
        member: _StreamingMember | None,
    ) -> tuple[list[Any], str]:
        """One block's piece; in a base it lands in the file's own tar member."""
        length = _block_length(block)
        if _is_hole(block):
            hash_zeros(whole, length)
            if member is not None:
                member.write_zeros(length)
            return [ZERO, length], "zero"
        whole.update(block)
        block_id = xxhash.xxh3_128_hexdigest(block)
        if member is not None:
            offset = member.write(block)
            self.tally.block_bytes += length
            return [RAW, self.layer_name, offset, length], block_id
        reused = known_blocks.get(block_id) or self._index_block(block_id)
        if reused is not None:
            self.tally.deduplicated_bytes += length
            return reused, block_id
        name = f"{RESERVED_PREFIX}/block/{block_id}"
        offset = self.writer.add_member(
            _blob_info(name, length), [block], _compressible(block)
        )
        self.tally.block_bytes += length
        piece = [RAW, self.layer_name, offset, length]
        self.index.setdefault(block_id, StoredContent(length, [piece]))
        return piece, block_id

    def _index_block(self, block_id: str) -> list[Any] | None:
        known = self.index.get(block_id)
        if known is None or len(known.recipe) != 1:
            return None
        return known.recipe[0]

    def _remember(self, entry: Entry) -> None:
        assert entry.content_id is not None and entry.recipe is not None
        if entry.content_id not in self.index:
            stored = StoredContent(entry.size, entry.recipe, entry.block_ids)
            self.index[entry.content_id] = stored


class _StreamingMember:
    """A base-layer tar member whose data arrives block by block."""

    def __init__(self, writer: LayerWriter, info: tarfile.TarInfo) -> None:
        self.writer = writer
        self.info = info
        self.data_offset = writer.begin_member(info)
        self.written = 0

    def write(self, data: bytes) -> int:
        """Append data; return its offset in the layer's tar stream."""
        offset = self.data_offset + self.written
        self.writer.write_data(data)
        self.written += len(data)
        return offset

    def write_zeros(self, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        remaining = length
        while remaining:
            part = chunk[: min(remaining, len(chunk))]
            self.write(part)
            remaining -= len(part)

    def close(self, size: int) -> None:
        if self.written != size:
            raise ValueError(f"{self.info.name}: wrote {self.written} of {size} bytes")
        self.writer.end_member(size)


def tar_info(entry: Entry, size: int | None = None) -> tarfile.TarInfo:
    """A pax tar header that GNU tar extracts to exactly this entry."""
    info = tarfile.TarInfo(entry.path + ("/" if entry.type == DIRECTORY else ""))
    info.mode = entry.mode & 0o7777
    seconds, nanoseconds = divmod(entry.mtime_ns, 1_000_000_000)
    info.mtime = seconds
    info.pax_headers = {"mtime": f"{seconds}.{nanoseconds:09d}"}
    info.uid = entry.uid or 0
    info.gid = entry.gid or 0
    info.uname = info.gname = ""
    info.type = _TAR_TYPES[entry.type]
    if entry.type == FILE and entry.hardlink_of is not None:
        info.type = tarfile.LNKTYPE
        info.linkname = entry.hardlink_of
    elif entry.type == FILE:
        info.size = entry.size if size is None else size
    elif entry.type == SYMLINK:
        info.linkname = entry.target or ""
    elif entry.type in (CHAR_DEVICE, BLOCK_DEVICE):
        info.devmajor = os.major(entry.rdev or 0)
        info.devminor = os.minor(entry.rdev or 0)
    return info


_TAR_TYPES = {
    FILE: tarfile.REGTYPE,
    DIRECTORY: tarfile.DIRTYPE,
    SYMLINK: tarfile.SYMTYPE,
    FIFO: tarfile.FIFOTYPE,
    CHAR_DEVICE: tarfile.CHRTYPE,
    BLOCK_DEVICE: tarfile.BLKTYPE,
}


def _blob_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    return info


def _blocks_of(previous: Entry | None) -> dict[str, list[Any]]:
    if previous is None or not previous.block_ids or previous.recipe is None:
        return {}
    return {
        block_id: piece
        for block_id, piece in zip(previous.block_ids, previous.recipe, strict=False)
        if block_id != "zero"
    }


def _block_length(block: bytes | int) -> int:
    return block if isinstance(block, int) else len(block)


def _is_hole(block: bytes | int) -> bool:
    """Holes come as ints from the reader; all-zero blocks count as holes too."""
    if isinstance(block, int):
        return True
    return not any(block[:64]) and block.count(0) == len(block)


def _compressible(data: bytes) -> bool:
    """Cheap test: does a fast zstd pass shrink a sample noticeably?"""
    if len(data) < 4096:
        return True
    sample = data[:SAMPLE_SIZE]
    return len(pyzstd.compress(sample, 1)) < 0.9 * len(sample)


def _patch_pays(patch: bytes, data: bytes, level: int) -> bool:
    """True when the patch is clearly smaller than the data compressed alone.

    A patch under a sixteenth of the data wins without compressing the data
    to compare (real text and code seldom compress below a tenth), which
    spares the small edits most appends store a second compression.
    """
    if len(patch) * CLEARLY_SMALL_PATCH_SHARE <= len(data):
        return True
    return len(patch) < 0.8 * _compressed_estimate(data, level)


def _compressed_estimate(data: bytes, level: int) -> int:
    if not _compressible(data):
        return len(data)
    return len(pyzstd.compress(data, level))
