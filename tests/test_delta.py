"""Each way of storing only what is new, on real files.

Every test appends real visits through the Python API, checks how the bytes
were stored (the visit's ``stored`` figures and its layer size), and checks
that every visit still materializes exactly.
"""

from __future__ import annotations

import os
import random
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import pyzstd
from conftest import assert_same_tree, tree_state

from deltatar import Store
from deltatar.delta import Settings

MIB = 1024 * 1024


class History:
    """A source tree, a store outside it, and the tree captured at each visit."""

    def __init__(self, root: Path, settings: Settings | None = None) -> None:
        self.src = root / "src"
        self.src.mkdir()
        self.store = Store.open_or_create(root / "store")
        if settings is not None:
            self.store.save_settings(settings)
        self.root = root
        self.states: dict[int, dict] = {}

    def append(self, **options):
        record = self.store.append(self.src, **options)
        self.states[record.visit] = tree_state(self.src)
        return record

    def check_every_visit(self) -> None:
        for visit, state in self.states.items():
            dest = self.root / f"out-{visit}-{len(os.listdir(self.root))}"
            self.store.materialize(visit, dest)
            assert_same_tree(state, tree_state(dest))


@pytest.fixture
def history(tmp_path: Path) -> History:
    return History(tmp_path)


def log_lines(first: int, count: int) -> bytes:
    rng = random.Random(first)
    return b"".join(
        f"{i} event={rng.randrange(10**9)} status=ok\n".encode()
        for i in range(first, first + count)
    )


def test_appended_log_stores_only_its_tail(history: History) -> None:
    log = history.src / "run.log"
    log.write_bytes(log_lines(0, 200_000))
    first = history.append()
    tail = log_lines(200_000, 3_000)
    with open(log, "ab") as handle:
        handle.write(tail)

    second = history.append()

    assert second.stored["tail_bytes"] == len(tail)
    assert second.stored["full_bytes"] == 0
    assert second.layer_bytes < len(tail)
    assert first.layer_bytes > 20 * second.layer_bytes
    history.check_every_visit()


def test_truncate_then_grow_is_not_mistaken_for_an_append(history: History) -> None:
    log = history.src / "run.log"
    log.write_bytes(log_lines(0, 1_000))
    history.append()
    log.write_bytes(log_lines(5_000, 2_000))

    record = history.append()

    assert record.stored["tail_bytes"] == 0
    history.check_every_visit()


def test_small_edit_of_a_binary_file_stores_a_patch(history: History) -> None:
    blob = history.src / "model.bin"
    data = bytearray(random.Random(3).randbytes(4 * MIB))
    blob.write_bytes(data)
    history.append()
    data[2 * MIB : 2 * MIB + 64] = bytes(64)
    blob.write_bytes(data)

    record = history.append()

    assert record.stored["patch_source_bytes"] == len(data)
    assert record.layer_bytes < 64 * 1024
    history.check_every_visit()


def test_edit_of_a_large_binary_stores_only_the_changed_block(tmp_path: Path) -> None:
    history = History(
        tmp_path, Settings(block_mode_size=1 * MIB, block_size=256 * 1024)
    )
    blob = history.src / "disk.img"
    data = bytearray(random.Random(4).randbytes(8 * MIB))
    blob.write_bytes(data)
    history.append()
    data[5 * MIB + 10 : 5 * MIB + 20] = b"x" * 10
    blob.write_bytes(data)

    record = history.append()

    assert record.stored["block_bytes"] == 256 * 1024
    assert record.layer_bytes < 300 * 1024
    history.check_every_visit()


def test_patch_chains_stay_within_the_configured_depth(tmp_path: Path) -> None:
    history = History(tmp_path, Settings(max_patch_depth=2))
    blob = history.src / "state.bin"
    data = bytearray(random.Random(5).randbytes(256 * 1024))
    sizes = []
    for visit in range(8):
        data[visit * 1000 : visit * 1000 + 8] = b"edited!!"
        blob.write_bytes(data)
        sizes.append(history.append().layer_bytes)

    from deltatar.content import patch_depth

    manifest = history.store.load_manifest(history.store.visits()[-1])
    (entry,) = [e for e in manifest.entries if e.path == "state.bin"]
    assert patch_depth(entry.recipe) <= 2
    assert max(sizes[1:]) < 16 * 1024
    history.check_every_visit()


def test_renamed_copied_and_recreated_files_cost_no_content(history: History) -> None:
    payload = random.Random(6).randbytes(2 * MIB)
    (history.src / "a.bin").write_bytes(payload)
    history.append()
    os.rename(history.src / "a.bin", history.src / "moved.bin")
    shutil.copy(history.src / "moved.bin", history.src / "copy.bin")
    renamed = history.append()
    (history.src / "moved.bin").unlink()
    (history.src / "copy.bin").unlink()
    history.append()
    (history.src / "back.bin").write_bytes(payload)

    recreated = history.append()

    for record in (renamed, recreated):
        assert record.stored["new_bytes"] == 0
        assert record.stored["deduplicated_bytes"] >= len(payload)
        assert record.layer_bytes < 4096
    history.check_every_visit()


def test_sparse_file_is_stored_and_restored_without_its_holes(tmp_path: Path) -> None:
    history = History(tmp_path, Settings(block_mode_size=1 * MIB, block_size=1 * MIB))
    disk = history.src / "disk.img"
    with open(disk, "wb") as handle:
        handle.write(b"header")
        handle.seek(512 * MIB)
        handle.write(b"tail")

    record = history.append()

    assert record.layer_bytes < 1 * MIB
    dest = tmp_path / "restored"
    history.store.materialize(record.visit, dest)
    restored = dest / "disk.img"
    assert restored.stat().st_size == disk.stat().st_size
    assert restored.stat().st_blocks * 512 < 16 * MIB
    history.check_every_visit()


def _archive_of(tree: Path, target: Path, kind: str) -> None:
    if kind == "zip":
        with zipfile.ZipFile(target, "w") as archive:
            for path in sorted(tree.rglob("*")):
                if path.is_file() and path != target:
                    archive.write(path, path.relative_to(tree))
        return
    with tarfile.open(target, "w:gz") as archive:
        archive.add(tree / "work", arcname="work")


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_archive_of_the_tree_inside_it_is_reported(
    history: History, caplog, kind
) -> None:
    (history.src / "work").mkdir()
    for number in range(5):
        (history.src / "work" / f"f{number}.txt").write_text(f"file {number}\n")
    history.append()
    _archive_of(history.src, history.src / f"stage.{kind}", kind)

    with caplog.at_level("WARNING"):
        history.append()

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"stage.{kind}" in w and "--exclude" in w for w in warnings), warnings


def test_nested_archives_are_skipped_when_asked(history: History) -> None:
    (history.src / "work").mkdir()
    (history.src / "work" / "a.txt").write_text("a\n")
    history.append()
    _archive_of(history.src, history.src / "stage.tgz", "tgz")

    record = history.store.append(history.src, exclude_nested_archives=True)

    manifest = history.store.load_manifest(record)
    assert "stage.tgz" not in {entry.path for entry in manifest.entries}


def test_unrelated_archive_is_not_reported(history: History, caplog) -> None:
    other = history.root / "other"
    other.mkdir()
    (other / "README").write_text("elsewhere\n")
    history.append()
    with tarfile.open(history.src / "vendor.tar.gz", "w:gz") as archive:
        archive.add(other / "README", arcname="README")

    with caplog.at_level("WARNING"):
        history.append()

    assert not [r for r in caplog.records if "archives of this tree" in r.getMessage()]


def test_incompressible_file_is_stored_without_inflation(history: History) -> None:
    payload = random.Random(7).randbytes(3 * MIB)
    (history.src / "media.jpg").write_bytes(payload)

    record = history.append()

    assert record.layer_bytes < len(payload) * 1.01 + 4096
    history.check_every_visit()


def test_many_small_files_share_compression_context(history: History) -> None:
    # Source files repeat their licence header and imports; one frame per file
    # would pay for that boilerplate again in every file.
    rng = random.Random(8)
    header = "".join(
        f"# licence line {i}: {rng.randbytes(16).hex()}\n" for i in range(40)
    )
    for number in range(400):
        body = "".join(
            f"value_{number}_{i} = {rng.randrange(10**6)}\n" for i in range(20)
        )
        (history.src / f"src{number:03d}.py").write_text(header + body)

    record = history.append()

    separately = sum(
        len(pyzstd.compress(path.read_bytes(), 3)) for path in history.src.iterdir()
    )
    assert record.layer_bytes < 0.5 * separately
