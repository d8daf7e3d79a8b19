"""Moving bytes between layers, and rewriting the recipes that point at them.

Every recipe names byte ranges of layers, so a layer can be retired as soon
as no kept manifest or contents list points into it.  Compaction therefore
never rebuilds what it does not have to: it writes a new layer holding only
the *live* ranges of the layers it retires, and rewrites the recipes of the
kept visits to point at the new places.  :class:`Moves` records where bytes
went; the rest of this module writes the layers that receive them.

Three kinds of move exist (see docs/format.md, *Compaction*):

* a whole layer copied into a new one at some shift (a merge of adjacent
  delta layers, or a layer that also receives carried ranges);
* a live range of a retired layer carried into a new layer as a member
  under ``.deltatar/carried/``;
* a piece whose output a freshly written base now holds as plain bytes.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .content import PATCH, RAW, ZERO, ContentSource, piece_length
from .delta import RESERVED_PREFIX, LayerBuilder, _blob_info
from .errors import CorruptStore
from .layer import BLOCK, LayerWriter
from .manifest import FILE, Entry, Manifest, Recipe, StoredContent

logger = logging.getLogger(__name__)

# Live ranges closer than this are carried as one member: a tar header costs
# about as much as the dead bytes between them.
RANGE_GAP = 2 * BLOCK
END_OF_ARCHIVE = 2 * BLOCK


@dataclasses.dataclass(slots=True)
class Moves:
    """Where compaction put bytes that recipes still name by their old place."""

    pieces: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    shifts: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    ranges: dict[str, list[tuple[int, int, str, int]]] = dataclasses.field(
        default_factory=dict
    )

    def rewrite(self, recipe: Recipe) -> Recipe:
        """The recipe with every moved piece pointing at its new place."""
        return [self._rewrite_piece(piece) for piece in recipe]

    def _rewrite_piece(self, piece: list[Any]) -> list[Any]:
        if self.pieces:
            replacement = self.pieces.get(piece_key(piece))
            if replacement is not None:
                return list(replacement)
        if piece[0] == ZERO:
            return piece
        layer, offset = self.locate(piece[1], int(piece[2]), int(piece[3]))
        if piece[0] == RAW:
            return [RAW, layer, offset, piece[3]]
        return [PATCH, layer, offset, piece[3], piece[4], self.rewrite(piece[5])]

    def locate(self, layer: str, offset: int, length: int) -> tuple[str, int]:
        shift = self.shifts.get(layer)
        if shift is not None:
            return shift[0], offset + shift[1]
        spans = self.ranges.get(layer)
        if spans is None:
            return layer, offset
        index = bisect.bisect_right(spans, (offset, float("inf"))) - 1
        if index >= 0:
            start, end, new_layer, new_start = spans[index]
            if start <= offset and offset + length <= end:
                return new_layer, new_start + offset - start
        raise CorruptStore(
            f"{layer}: range {offset}+{length} was not carried by compaction"
        )


def piece_key(piece: list[Any]) -> str:
    return json.dumps(piece, separators=(",", ":"))


# -- live ranges -----------------------------------------------------------


def collect_live(
    recipe: Recipe, moves: Moves, retired: set[str], live: dict[str, list]
) -> None:
    """Add the ranges of ``retired`` layers that ``recipe`` still needs."""
    for piece in recipe:
        if piece[0] == ZERO or piece_key(piece) in moves.pieces:
            continue
        if piece[1] in retired:
            live.setdefault(piece[1], []).append(
                (int(piece[2]), int(piece[2]) + int(piece[3]))
            )
        if piece[0] == PATCH:
            collect_live(piece[5], moves, retired, live)


def collect_live_of_entries(
    entries: Iterable[Entry], moves: Moves, retired: set[str], live: dict
) -> None:
    for entry in entries:
        if entry.type == FILE and entry.recipe:
            collect_live(entry.recipe, moves, retired, live)


def collect_live_of_departed(
    departed: dict[str, StoredContent], moves: Moves, retired: set[str], live: dict
) -> None:
    for stored in departed.values():
        collect_live(stored.recipe, moves, retired, live)


def merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping or nearly touching ranges joined into one."""
    joined: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if joined and start <= joined[-1][1] + RANGE_GAP:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    return joined


def live_bytes(live: dict[str, list[tuple[int, int]]]) -> int:
    return sum(end - start for spans in live.values() for start, end in spans)


# -- writing layers that receive moved bytes --------------------------------


def copy_layer(
    writer: LayerWriter, source: ContentSource, layer: str, new_name: str, moves
) -> None:
    """Copy every member of ``layer`` into ``writer``, recording the shift."""
    reader = source.reader(layer)
    length = reader.raw_size - END_OF_ARCHIVE
    if length < 0 or any(reader.read(length, END_OF_ARCHIVE)):
        raise CorruptStore(f"{layer}: the tar stream does not end as deltatar ends it")
    shift = writer.copy_members(_chunks(reader.iter_range(0, length)))
    moves.shifts[layer] = (new_name, shift)


def carry_ranges(
    writer: LayerWriter,
    source: ContentSource,
    layer: str,
    spans: list[tuple[int, int]],
    new_name: str,
    moves: Moves,
) -> None:
    """Write each live range of a retired layer as a member of the new layer."""
    stem = Path(layer).name.split(".")[0]
    placed = []
    for start, end in spans:
        info = _blob_info(f"{RESERVED_PREFIX}/carried/{stem}-{start}", end - start)
        reader = source.reader(layer)
        offset = writer.add_member(info, reader.iter_range(start, end - start))
        placed.append((start, end, new_name, offset))
    moves.ranges[layer] = placed


def _chunks(parts: Iterator[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield bytes(part)


# -- a fresh base --------------------------------------------------------------


def build_base_entries(
    manifest: Manifest, builder: LayerBuilder, source: ContentSource
) -> list[Entry]:
    """Every entry of ``manifest`` written in full into a base layer."""
    rebuilt: dict[str, Entry] = {}
    for old in manifest.entries:
        entry = dataclasses.replace(old)
        if entry.type != FILE:
            builder.add_metadata_member(entry)
        elif entry.hardlink_of is not None:
            leader = rebuilt[entry.hardlink_of]
            entry.recipe, entry.block_ids = leader.recipe, leader.block_ids
            builder.add_hardlink_member(entry)
        elif old.block_ids is not None:
            blocks = (_join(source.iter_pieces([p])) for p in old.recipe or [])
            builder.store_blocks(entry, blocks, None)
        else:
            data = source.read_verified(old.recipe or [], old.content_id, old.path)
            builder.store_small(entry, data, None)
        rebuilt[entry.path] = entry
    return list(rebuilt.values())


def _join(parts) -> bytes | int:
    collected = list(parts)
    if len(collected) == 1 and isinstance(collected[0], int):
        return collected[0]
    return b"".join(bytes(p) if isinstance(p, int) else p for p in collected)


def map_to_base(old: list[Entry], new: list[Entry], moves: Moves) -> None:
    """Record, for each piece of the old recipes, the base bytes that equal it.

    A later visit that shares a piece (an unchanged file, the head of a grown
    file, the reference of a patch) then reads it from the base, and the
    layer that held it may be retired without carrying it.
    """
    fresh = {entry.path: entry for entry in new}
    for entry in old:
        if entry.type != FILE or entry.hardlink_of is not None or not entry.recipe:
            continue
        target = fresh[entry.path].recipe or []
        spans = _raw_spans(target)
        position = 0
        for piece in entry.recipe:
            length = piece_length(piece)
            if piece[0] != ZERO:
                mapped = _covering(spans, position, length)
                if mapped is not None:
                    moves.pieces[piece_key(piece)] = mapped
            position += length


def _raw_spans(recipe: Recipe) -> list[tuple[int, int, list[Any]]]:
    spans, position = [], 0
    for piece in recipe:
        length = piece_length(piece)
        if piece[0] == RAW:
            spans.append((position, position + length, piece))
        position += length
    return spans


def _covering(spans, position: int, length: int) -> list[Any] | None:
    for start, end, piece in spans:
        if start <= position and position + length <= end:
            return [RAW, piece[1], int(piece[2]) + position - start, length]
    return None
