"""Decompress the frames a restore will read next, on a thread of their own.

A restore reads its files in the order their bytes lie in the layers, so the
frames it needs are known before it starts.  Decompressing them one by one
in the reading thread would leave that thread idle for the kernel and the
kernel idle for zstd; zstd releases the GIL, so a thread working a few
frames ahead overlaps decompression with creating and writing files.

One thread is the default: it asks for frames in the order they lie in
the layers, which keeps an object store's read-ahead sequential, and on a
small machine it already overlaps most of the decompression.

Decoded frames go into the shared :class:`~deltatar.layer.FrameCache`, where
the reader finds them.  Only the frames of the next few files are decoded
ahead, so memory stays bounded by ``depth`` frames whatever the tree.  A
frame that fails to decompress raises its error when the restore reaches
the file that needs it, exactly as reading it in place would.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from .content import PATCH, RAW, ContentSource
from .layer import LayerReader
from .manifest import Recipe

# (number of the file that needs it first, reader, frame index)
Planned = tuple[int, LayerReader, int]


class DecodeAhead:
    """Frames of the files ahead of the reader, decoded into the frame cache."""

    def __init__(
        self,
        source: ContentSource,
        recipes: Iterable[Recipe | None],
        threads: int = 1,
        depth: int = 8,
    ) -> None:
        self._plan = collections.deque(_plan(source, recipes))
        self._pending: collections.deque[tuple[int, Future[bytes]]] = (
            collections.deque()
        )
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="deltatar-decode")
        self._depth = depth

    # TODO: a file spanning more than ``depth`` frames has its later frames
    # decoded in the reading thread; topping up as frames are consumed would
    # keep the decoder ahead inside large files too.
    def ready(self, number: int) -> None:
        """Wait for the frames file ``number`` needs first; keep decoding ahead.

        Frames of that file not yet started are left for the reader itself,
        so no frame is ever decoded twice at once.
        """
        self._top_up()
        while self._pending and self._pending[0][0] <= number:
            self._pending.popleft()[1].result()
        while self._plan and self._plan[0][0] <= number:
            self._plan.popleft()
        self._top_up()

    def close(self) -> None:
        """Stop decoding ahead; frames already decoding are let finish."""
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._plan.clear()
        self._pool.shutdown(wait=True)

    def _top_up(self) -> None:
        while self._plan and len(self._pending) < self._depth:
            number, reader, index = self._plan.popleft()
            self._pending.append((number, self._pool.submit(reader.frame, index)))


def _plan(source: ContentSource, recipes: Iterable[Recipe | None]) -> list[Planned]:
    """Every frame ``recipes`` read, once, in reading order.

    A patch piece reads its own bytes and, before them, its reference's.
    """
    plan: list[Planned] = []
    seen: set[tuple[str, int]] = set()
    for number, recipe in enumerate(recipes, 1):
        for layer, offset, length in _ranges(recipe or []):
            reader = source.reader(layer)
            for index in reader.frames_of(offset, length):
                if (layer, index) not in seen:
                    seen.add((layer, index))
                    plan.append((number, reader, index))
    return plan


def _ranges(recipe: Recipe) -> Iterator[tuple[str, int, int]]:
    """The layer ranges a recipe reads, in the order reading it does."""
    for piece in recipe:
        if piece[0] == RAW:
            yield piece[1], piece[2], piece[3]
        elif piece[0] == PATCH:
            yield from _ranges(piece[5])
            yield piece[1], piece[2], piece[3]
