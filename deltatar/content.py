"""Recipes: how a file's bytes are rebuilt from pieces stored in layers.

A recipe is a list of pieces whose outputs, concatenated, are the file:

``["raw", layer, offset, length]``
    ``length`` bytes of the layer's uncompressed tar stream at ``offset``.
``["zero", length]``
    a run of zero bytes that is not stored at all (a hole in a sparse file).
``["patch", layer, offset, length, out_length, reference]``
    a zstd frame at that range, decompressed with the bytes that the nested
    ``reference`` recipe rebuilds as a raw prefix dictionary; it yields
    ``out_length`` bytes.

A file that grew by an append is the old recipe plus one raw piece for the
tail, and a file whose content was stored before reuses that recipe whole,
so recipes are how deltatar stores only what is new.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyzstd
import xxhash
from backports import zstd

from .backend import Backend
from .errors import CorruptStore
from .layer import FrameCache, LayerReader
from .manifest import Recipe

RAW = "raw"
ZERO = "zero"
PATCH = "patch"
PATCH_WINDOW_LOG = 27
MAX_PATCH_REFERENCE = 1 << PATCH_WINDOW_LOG
EMPTY = b""
# zstd's smallest window, and the window from which long-distance matching
# finds matches the regular match finder would miss.
MIN_WINDOW_LOG = 10
LONG_DISTANCE_WINDOW_LOG = 24


def content_id(data: bytes) -> str:
    """The content id of a whole byte string."""
    return xxhash.xxh3_128_hexdigest(data)


_ZEROS = bytes(1 << 20)


def hash_zeros(digest: Any, length: int) -> None:
    """Feed ``length`` zero bytes to a digest without allocating them all."""
    zeros = memoryview(_ZEROS)
    while length:
        part = min(length, len(_ZEROS))
        digest.update(zeros[:part])
        length -= part


def recipe_length(recipe: Recipe) -> int:
    return sum(piece_length(piece) for piece in recipe)


def piece_length(piece: list[Any]) -> int:
    kind = piece[0]
    if kind == RAW:
        return int(piece[3])
    if kind == ZERO:
        return int(piece[1])
    if kind == PATCH:
        return int(piece[4])
    raise CorruptStore(f"unknown recipe piece kind {kind!r}")


def patch_depth(recipe: Recipe) -> int:
    """How many patches deep the reconstruction of this recipe goes."""
    depths = [1 + patch_depth(piece[5]) for piece in recipe if piece[0] == PATCH]
    return max(depths, default=0)


def layers_of(recipe: Recipe) -> set[str]:
    """Every layer a recipe reads from, nested references included."""
    names: set[str] = set()
    for piece in recipe:
        if piece[0] in (RAW, PATCH):
            names.add(piece[1])
        if piece[0] == PATCH:
            names |= layers_of(piece[5])
    return names


def validate(recipe: Any, size: int, where: str, depth: int = 0) -> None:
    """Refuse recipes that are malformed or claim absurd sizes."""
    if not isinstance(recipe, list) or depth > 64:
        raise CorruptStore(f"{where}: recipe is malformed")
    total = 0
    for piece in recipe:
        if not isinstance(piece, list) or not piece:
            raise CorruptStore(f"{where}: recipe piece is malformed")
        _validate_piece(piece, where, depth)
        total += piece_length(piece)
    if total != size:
        raise CorruptStore(f"{where}: recipe rebuilds {total} bytes, entry says {size}")


def _validate_piece(piece: list[Any], where: str, depth: int) -> None:
    shapes = {RAW: (str, int, int), ZERO: (int,), PATCH: (str, int, int, int, list)}
    shape = shapes.get(piece[0])
    if shape is None or len(piece) != len(shape) + 1:
        raise CorruptStore(f"{where}: recipe piece {piece[0]!r} is malformed")
    for value, kind in zip(piece[1:], shape, strict=True):
        if not isinstance(value, kind) or (kind is int and value < 0):
            raise CorruptStore(f"{where}: recipe piece {piece[0]!r} is malformed")
    if piece[0] == PATCH:
        validate(piece[5], recipe_length(piece[5]), where, depth + 1)


class ContentSource:
    """Reads recipes back from a store's layers, sharing one frame cache."""

    def __init__(self, backend: Backend, cache: FrameCache | None = None) -> None:
        self.backend = backend
        self.cache = cache or FrameCache()
        self._readers: dict[str, LayerReader] = {}

    def reader(self, layer: str) -> LayerReader:
        reader = self._readers.get(layer)
        if reader is None:
            reader = LayerReader(self.backend, layer, self.cache)
            self._readers[layer] = reader
        return reader

    def iter_pieces(self, recipe: Recipe) -> Iterator[bytes | int]:
        """Yield data as bytes, and holes as their length in an int."""
        for piece in recipe:
            kind = piece[0]
            if kind == ZERO:
                yield int(piece[1])
            elif kind == RAW:
                yield from self.reader(piece[1]).iter_range(piece[2], piece[3])
            else:
                yield self._apply_patch(piece)

    def read_all(self, recipe: Recipe) -> bytes:
        parts = [
            bytes(part) if isinstance(part, int) else part
            for part in self.iter_pieces(recipe)
        ]
        return b"".join(parts)

    def read_verified(
        self, recipe: Recipe, expected_id: str | None, where: str
    ) -> bytes:
        data = self.read_all(recipe)
        if expected_id is not None and content_id(data) != expected_id:
            raise CorruptStore(f"{where}: content does not match its content id")
        return data

    def _apply_patch(self, piece: list[Any]) -> bytes:
        _, layer, offset, length, out_length, reference = piece
        prefix = self.read_all(reference)
        patch = self.reader(layer).read(offset, length)
        return apply_patch(patch, prefix, out_length, f"{layer}@{offset}")


def make_patch(data: bytes, reference: bytes | pyzstd.ZstdDict, level: int) -> bytes:
    """Compress ``data`` with ``reference`` as a raw prefix (zstd patch-from).

    ``reference`` may be a prepared :func:`prefix_of` to avoid copying a
    large reference again.
    """
    span = len(reference) + len(data)
    return pyzstd.compress(data, _patch_options(level, span), _prefix(reference))


def compress_chunks(
    chunks: list[bytes | bytearray], reference: pyzstd.ZstdDict | None = None
) -> bytes:
    """One checksummed zstd frame of ``chunks``, emptying the list as it goes.

    Given a ``reference``, the frame is a patch against it, as from
    :func:`make_patch`.  Compressing in one call would allocate an output
    buffer as large as the input and keep the input alive until the end;
    fed a chunk at a time, with the total size pledged so that zstd's own
    window is no larger than the input, a manifest of 200,000 files costs
    one copy of its bytes instead of three.
    """
    options = (
        _patch_options(3)
        if reference is not None
        else {
            pyzstd.CParameter.compressionLevel: 3,
            pyzstd.CParameter.checksumFlag: 1,
        }
    )
    compressor = zstd.ZstdCompressor(
        options=options,
        zstd_dict=None if reference is None else reference.as_prefix,
    )
    compressor.set_pledged_input_size(sum(len(chunk) for chunk in chunks))
    output = []
    for number, chunk in enumerate(chunks):
        output.append(compressor.compress(chunk))
        # A constant, not a new object: a new small object lands in whatever
        # allocator arena has room, and would keep that arena alive.
        chunks[number] = EMPTY
    output.append(compressor.flush())
    chunks.clear()
    return b"".join(output)


def _patch_options(level: int, span: int | None = None) -> dict[int, int]:
    """Parameters of a patch whose reference and data are ``span`` bytes.

    The window is only as large as the span (None: as large as a patch
    may use), and long-distance matching only serves windows larger than
    the regular match finder reaches.  An append makes many small patches:
    set up for the largest window, a 40 KB patch took 60 % longer.
    """
    window_log = PATCH_WINDOW_LOG
    if span is not None:
        window_log = min(PATCH_WINDOW_LOG, max(MIN_WINDOW_LOG, span.bit_length()))
    options = {
        pyzstd.CParameter.compressionLevel: max(level, 3),
        pyzstd.CParameter.windowLog: window_log,
        pyzstd.CParameter.checksumFlag: 1,
    }
    if window_log >= LONG_DISTANCE_WINDOW_LOG:
        options[pyzstd.CParameter.enableLongDistanceMatching] = 1
    return options


def prefix_of(reference: bytes) -> pyzstd.ZstdDict:
    """A reference prepared once for many patches (zstd keeps its own copy)."""
    return pyzstd.ZstdDict(reference, is_raw=True)


def _prefix(reference: bytes | pyzstd.ZstdDict):
    if not isinstance(reference, pyzstd.ZstdDict):
        reference = prefix_of(reference)
    return reference.as_prefix


def apply_patch(
    patch: bytes, reference: bytes | pyzstd.ZstdDict, out_length: int | None, where: str
) -> bytes:
    """Rebuild what :func:`make_patch` made; ``out_length`` None skips the check."""
    options = {pyzstd.DParameter.windowLogMax: PATCH_WINDOW_LOG}
    try:
        data = pyzstd.decompress(patch, _prefix(reference), options)
    except pyzstd.ZstdError as error:
        raise CorruptStore(f"{where}: patch does not apply ({error})") from None
    if out_length is not None and len(data) != out_length:
        raise CorruptStore(f"{where}: patch yields {len(data)} bytes, not {out_length}")
    return data
