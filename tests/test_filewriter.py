"""The threaded file writer used by materialize, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deltatar.filewriter import FileWriter

MTIME_NS = 1_700_000_000_123_456_789


def test_parts_and_holes_land_at_their_offsets(tmp_path: Path) -> None:
    writer = FileWriter(threads=3)
    writer.submit(str(tmp_path / "joined"), [b"ab", b"cd", b"ef"], 6, 0o640, 1, None)
    writer.submit(str(tmp_path / "holey"), [b"x", 4096, b"y", 10], 4108, 0o600, 1, None)
    writer.submit(str(tmp_path / "empty"), [], 0, 0o444, MTIME_NS, None)
    writer.finish()

    assert (tmp_path / "joined").read_bytes() == b"abcdef"
    assert (tmp_path / "holey").read_bytes() == b"x" + bytes(4096) + b"y" + bytes(10)
    empty = (tmp_path / "empty").stat()
    assert empty.st_size == 0
    assert empty.st_mode & 0o7777 == 0o444
    assert empty.st_mtime_ns == MTIME_NS


def test_many_files_beyond_the_queue_bound_are_all_written(tmp_path: Path) -> None:
    writer = FileWriter(threads=4)
    for number in range(600):
        data = bytes([number % 251]) * (number * 97)
        writer.submit(str(tmp_path / f"f{number}"), [data], len(data), 0o600, 1, None)
    writer.finish()

    for number in range(600):
        expected = bytes([number % 251]) * (number * 97)
        assert (tmp_path / f"f{number}").read_bytes() == expected


def test_a_failed_write_is_raised_and_never_overwrites(tmp_path: Path) -> None:
    existing = tmp_path / "taken"
    existing.write_bytes(b"keep me")
    writer = FileWriter(threads=2)
    writer.submit(str(existing), [b"other"], 5, 0o600, 1, None)

    with pytest.raises(FileExistsError):
        writer.finish()
    assert existing.read_bytes() == b"keep me"


def test_a_symlink_in_place_of_the_file_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    os.symlink(outside, tmp_path / "link")
    writer = FileWriter(threads=1)
    writer.submit(str(tmp_path / "link"), [b"evil"], 4, 0o600, 1, None)

    with pytest.raises(OSError):
        writer.finish()
    assert outside.read_bytes() == b"untouched"


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_batches_of_mixed_sizes_are_written_on_any_thread_count(
    tmp_path: Path, threads: int
) -> None:
    """Files go to the threads in batches; every file of every batch lands."""
    sizes = [0, 1, 300_000, 5, 2_000_000, 64, 70_000] * 40
    writer = FileWriter(threads=threads)
    for number, size in enumerate(sizes):
        data = bytes([number % 251]) * size
        writer.submit(str(tmp_path / f"f{number}"), [data], size, 0o640, MTIME_NS, None)
    writer.finish()

    for number, size in enumerate(sizes):
        written = tmp_path / f"f{number}"
        assert written.read_bytes() == bytes([number % 251]) * size
        assert written.stat().st_mtime_ns == MTIME_NS
        assert written.stat().st_mode & 0o7777 == 0o640
