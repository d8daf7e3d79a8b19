"""Micro-benchmarks of deltatar's hot paths, run with pytest-benchmark.

Each one times a single step that every append or materialize repeats per
file, on a tree of a few thousand small files built once per module: the
walk with its stat comparison, content hashing, manifest encoding and
decoding, writing a layer, an append that finds nothing changed, and
materializing small files.  ``scripts/bench --micro`` runs them with
timing; ``scripts/test`` runs them once each with ``--benchmark-disable`` as
a smoke check, so they cannot rot unnoticed.  No test here asserts a time.
"""

from __future__ import annotations

import os
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from deltatar import Store
from deltatar.content import content_id
from deltatar.layer import LayerWriter
from deltatar.manifest import decode, encode
from deltatar.scan import exclusion_spec, scan, stat_matches

FILES = 3000
DIRECTORIES = 60
FILE_BYTES = 2048


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, Store]:
    """A tree of small files and a store holding it as visit 1."""
    root = tmp_path_factory.mktemp("micro")
    tree = root / "tree"
    rng = random.Random(7)
    for index in range(FILES):
        folder = tree / f"d{index % DIRECTORIES:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        words = " ".join(f"w{rng.randrange(5000)}" for _ in range(FILE_BYTES // 6))
        (folder / f"f{index:05d}.txt").write_text(words[:FILE_BYTES])
    store = Store.open_or_create(root / "store")
    store.append(tree)
    return tree, store


def test_walk_and_stat_compare(benchmark, recorded) -> None:
    tree, store = recorded
    previous = store.load_manifest(store.visits()[-1]).by_path()

    def walk_and_compare() -> int:
        found = scan(tree, None, exclusion_spec(tree, [])).found
        return sum(
            1
            for item in found
            if item.path in previous and stat_matches(previous[item.path], item)
        )

    unchanged = benchmark(walk_and_compare)
    assert unchanged == FILES


def test_hash_small_files(benchmark, recorded) -> None:
    tree, _ = recorded
    contents = [path.read_bytes() for path in sorted(tree.rglob("*.txt"))]
    ids = benchmark(lambda: {content_id(data) for data in contents})
    assert len(ids) == len(set(contents))


def test_hash_large_buffer(benchmark) -> None:
    data = random.Random(3).randbytes(32 * 2**20)
    assert benchmark(content_id, data) == content_id(bytes(data))


def test_manifest_encode(benchmark, recorded) -> None:
    _, store = recorded
    manifest = store.load_manifest(store.visits()[-1])
    encoded = benchmark(encode, manifest)
    assert encoded.count(b"\n") == len(manifest.entries) + 1


def test_manifest_decode(benchmark, recorded) -> None:
    _, store = recorded
    manifest = store.load_manifest(store.visits()[-1])
    data = bytes(encode(manifest))
    decoded = benchmark(decode, data, "benchmark manifest")
    assert [entry.path for entry in decoded.entries] == [
        entry.path for entry in manifest.entries
    ]


def test_layer_write(benchmark, recorded, tmp_path) -> None:
    tree, _ = recorded
    files = sorted(tree.rglob("*.txt"))[:1000]
    contents = [(str(path.relative_to(tree)), path.read_bytes()) for path in files]
    target = tmp_path / "layer.tar.zst"

    def write_layer() -> int:
        writer = LayerWriter(target)
        for name, data in contents:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            writer.add_member(info, [data])
        return writer.finish().raw_bytes

    raw = benchmark(write_layer)
    assert raw >= sum(len(data) for _, data in contents)


def test_append_unchanged(benchmark, recorded) -> None:
    tree, store = recorded
    before = len(store.visits())
    benchmark.pedantic(store.append, args=(tree,), rounds=3, iterations=1)
    assert len(store.visits()) > before


def test_materialize_small_files(benchmark, recorded, tmp_path) -> None:
    tree, store = recorded
    destination = tmp_path / "out"

    def fresh() -> None:
        shutil.rmtree(destination, ignore_errors=True)

    benchmark.pedantic(
        store.materialize, args=(1, destination), setup=fresh, rounds=3, iterations=1
    )
    restored = sum(len(names) for _, _, names in os.walk(destination))
    assert restored == FILES
