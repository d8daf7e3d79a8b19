"""Manifests encoded in chunks and compressed a chunk at a time.

A large manifest is never held whole more than once while it is saved, so
the chunked paths must give exactly the bytes the whole-buffer paths give,
and a reader of either must see the same manifest.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyzstd
from conftest import tree_state

from deltatar import Store
from deltatar import manifest as manifest_module
from deltatar.content import apply_patch, compress_chunks, prefix_of
from deltatar.manifest import (
    FILE,
    Entry,
    Manifest,
    decode,
    encode,
    encode_chunks,
)


def _manifest(count: int, seed: int = 3) -> Manifest:
    rng = random.Random(seed)
    entries = [
        Entry(
            path=f"d{number // 100:03d}/f{number:06d}-{rng.randrange(10**9)}",
            type=FILE,
            mode=0o644,
            mtime_ns=1_700_000_000_000_000_000 + number,
            size=number,
            content_id=f"{rng.getrandbits(128):032x}",
            recipe=[["raw", "layers/000001-x.tar.zst", number * 512, number]],
        )
        for number in range(count)
    ]
    return Manifest(visit=7, entries=entries, info={"message": "chunks"})


def test_chunks_join_to_the_whole_encoding(monkeypatch) -> None:
    monkeypatch.setattr(manifest_module, "ENCODED_CHUNK_BYTES", 64 * 1024)
    manifest = _manifest(12_000)
    whole = bytes(encode(manifest))

    chunks = encode_chunks(manifest)

    assert len(chunks) > 1
    assert b"".join(chunks) == whole
    assert decode(whole, "test").entries == manifest.entries


def test_dropping_entries_while_encoding_leaves_the_same_bytes() -> None:
    manifest = _manifest(5_000)
    whole = bytes(encode(manifest))
    digest = manifest.tree_digest()

    chunks = encode_chunks(manifest, drop_entries=True)

    assert b"".join(chunks) == whole
    assert manifest.entries == []
    assert manifest.tree_digest() == digest


def test_chunked_frame_decompresses_to_its_input_and_states_its_size() -> None:
    data = bytes(encode(_manifest(8_000)))
    chunks = encode_chunks(_manifest(8_000))

    frame = compress_chunks(chunks)

    assert chunks == []
    assert pyzstd.get_frame_info(frame).decompressed_size == len(data)
    assert pyzstd.decompress(frame) == data


def test_chunked_patch_applies_to_its_reference_and_is_small() -> None:
    reference = bytes(encode(_manifest(8_000)))
    changed = _manifest(8_000)
    changed.entries[4_000].size += 1
    data = bytes(encode(changed))

    patch = compress_chunks(encode_chunks(changed), prefix_of(reference))

    assert apply_patch(patch, prefix_of(reference), len(data), "test") == data
    assert len(patch) < len(pyzstd.compress(data)) // 10


def test_store_reads_back_every_visit_after_chunked_saves(tmp_path: Path) -> None:
    """Patched and full manifests saved in chunks materialize exactly."""
    src = tmp_path / "src"
    src.mkdir()
    store = Store.open_or_create(tmp_path / "store")
    states = []
    for visit in range(1, 5):
        for number in range(300):
            (src / f"f{number:04d}").write_text(
                f"{number} {visit if number < 3 else 0}"
            )
        store.append(src)
        states.append(tree_state(src))

    for visit, expected in enumerate(states, 1):
        out = tmp_path / f"out{visit}"
        store.materialize(visit, out)
        assert tree_state(out) == expected
