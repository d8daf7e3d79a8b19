"""Frames decoded ahead on threads during materialize, on real stores."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import pyzstd

from deltatar.content import ContentSource
from deltatar.errors import CorruptStore
from deltatar.store import Store, compress_checked, decompress_whole


def _tree(root: Path, files: int = 240, size: int = 40_000) -> dict[str, bytes]:
    """Incompressible files, enough to spread over several frames."""
    rng = random.Random(7)
    contents = {}
    for number in range(files):
        folder = root / f"d{number % 12}"
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size + number)
        (folder / f"f{number}").write_bytes(data)
        contents[f"d{number % 12}/f{number}"] = data
    return contents


def _store_of(tmp_path: Path) -> tuple[Store, dict[str, bytes]]:
    contents = _tree(tmp_path / "src")
    store = Store.open_or_create(tmp_path / "store")
    store.append(tmp_path / "src")
    return store, contents


def test_a_tree_over_many_frames_comes_back_whole(tmp_path: Path) -> None:
    store, contents = _store_of(tmp_path)
    store.materialize(1, tmp_path / "out")

    for path, data in contents.items():
        assert (tmp_path / "out" / path).read_bytes() == data


def test_frames_of_names_the_frames_a_read_touches(tmp_path: Path) -> None:
    store, _ = _store_of(tmp_path)
    record = store.visits()[0]
    reader = ContentSource(store.backend).reader(record.layer)
    assert reader.frame_count > 3

    for offset, length in [(0, 1), (0, reader.raw_size), (5000, 3_000_000)]:
        frames = list(reader.frames_of(offset, length))
        starts = [reader._raw_offsets[index] for index in frames]
        assert starts[0] <= offset < reader._raw_offsets[frames[0] + 1]
        assert reader._raw_offsets[frames[-1] + 1] >= offset + length
        assert b"".join(reader.frame(i) for i in frames)[offset - starts[0] :][
            :length
        ] == reader.read(offset, length)
    assert list(reader.frames_of(100, 0)) == []
    assert list(reader.frames_of(reader.raw_size + 10, 5)) == []


def test_a_damaged_frame_ahead_fails_the_restore_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    store, _ = _store_of(tmp_path)
    layer = tmp_path / "store" / store.visits()[0].layer
    data = bytearray(layer.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    os.chmod(layer, 0o600)
    layer.write_bytes(bytes(data))

    with pytest.raises(CorruptStore, match="frame"):
        Store.open(tmp_path / "store").materialize(1, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_decompress_whole_matches_pyzstd_and_refuses_damage() -> None:
    data = b"a manifest line\n" * 400_000
    frame = compress_checked(data)

    assert decompress_whole(frame) == data
    assert decompress_whole(frame + frame) == data + data
    for damaged in (frame[:-8], frame[: len(frame) // 2], frame + b"junk"):
        with pytest.raises(pyzstd.ZstdError):
            decompress_whole(damaged)
