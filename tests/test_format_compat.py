"""Stores written by earlier format versions must keep reading.

``tests/data/store-v1`` was written by format version 1 and is checked in as
bytes; ``expected.json`` beside it describes every visit's tree.  When the
format changes, add a new directory for the new version and keep this one: a
store written today is a store users will open years from now.

Run ``python tests/test_format_compat.py --regenerate`` only when adding a
directory for a new format version, never to make this test pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import sys
from pathlib import Path

import pytest

from deltatar import Store
from deltatar.delta import Settings

DATA = Path(__file__).parent / "data"
FIXTURES = sorted(DATA.glob("store-v*"))


def describe(root: Path) -> dict[str, list]:
    """Path (hex of its bytes) -> [type, mode, mtime_ns, sha256 or link target]."""
    tree = {}
    for directory, names, files in os.walk(os.fsencode(root)):
        for name in names + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            relative = os.path.relpath(path, os.fsencode(root)).hex()
            if os.path.islink(path):
                tree[relative] = [
                    "symlink",
                    0,
                    info.st_mtime_ns,
                    os.readlink(path).hex(),
                ]
            elif os.path.isdir(path):
                tree[relative] = ["dir", info.st_mode & 0o7777, info.st_mtime_ns, None]
            elif stat.S_ISFIFO(info.st_mode):
                tree[relative] = ["fifo", info.st_mode & 0o7777, info.st_mtime_ns, None]
            else:
                digest = hashlib.sha256(
                    Path(os.fsdecode(path)).read_bytes()
                ).hexdigest()
                tree[relative] = [
                    "file",
                    info.st_mode & 0o7777,
                    info.st_mtime_ns,
                    digest,
                ]
    return tree


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_store_written_by_an_earlier_format_still_materializes(fixture, tmp_path):
    store_copy = tmp_path / "store"
    shutil.copytree(fixture / "store", store_copy)
    expected = json.loads((fixture / "expected.json").read_text())
    store = Store.open(store_copy)

    assert [str(record.visit) for record in store.visits()] == sorted(expected, key=int)
    for visit, tree in expected.items():
        dest = tmp_path / f"visit-{visit}"
        store.materialize(int(visit), dest)
        assert describe(dest) == tree
    assert store.verify() == []


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_compacting_a_store_of_an_earlier_format_keeps_its_visits(fixture, tmp_path):
    store_copy = tmp_path / "store"
    shutil.copytree(fixture / "store", store_copy)
    expected = json.loads((fixture / "expected.json").read_text())
    store = Store.open(store_copy)
    store.compact(keep_last=2)
    kept = [str(record.visit) for record in store.visits()]
    assert kept == sorted(expected, key=int)[-2:]
    for visit in kept:
        dest = tmp_path / f"visit-{visit}"
        store.materialize(int(visit), dest)
        assert describe(dest) == expected[visit]
    assert store.verify() == []


def test_head_that_retains_layers_is_version_2_and_refused_by_version_1_readers(
    tmp_path,
):
    from deltatar.errors import UnsupportedFormat
    from deltatar.formats import check_document

    src = tmp_path / "src"
    src.mkdir()
    store = Store.open_or_create(tmp_path / "store")
    (src / "kept").write_bytes(random.Random(3).randbytes(100_000))
    for number in range(3):
        (src / "note").write_bytes(bytes([number]) * 10)
        store.append(src)
    store.compact(keep_last=1)
    head = json.loads((tmp_path / "store" / "HEAD").read_bytes())
    assert head["version"] == 2 and head["visits"][0]["retained_layers"]
    # A version-1 reader checks the head with newest=1: it must refuse, not
    # misread the store and delete the retained layers it does not know.
    with pytest.raises(
        UnsupportedFormat, match="version 2 is newer than the version 1"
    ):
        check_document(head, "deltatar-head", 1, "HEAD")
    head["version"] = 3
    (tmp_path / "store" / "HEAD").write_text(json.dumps(head))
    with pytest.raises(UnsupportedFormat, match="version 3"):
        Store.open(tmp_path / "store").visits()


def test_fixture_for_the_current_format_exists():
    from deltatar.store import STORE_VERSION

    assert (DATA / f"store-v{STORE_VERSION}").is_dir()


def _build_history(src: Path) -> None:
    """One visit per step, covering every recipe kind and entry type."""
    (src / "dir").mkdir(parents=True)
    words = random.Random(1).choices(["alpha", "beta", "gamma", "delta", "x"], k=9000)
    (src / "dir" / "text.txt").write_text(" ".join(words))
    (src / "log.txt").write_text("".join(f"line {i}\n" for i in range(3000)))
    (src / "big.bin").write_bytes(bytes(range(256)) * 2000 + bytes(300_000))
    (src / os.fsdecode(b"name-\xff")).write_bytes(b"not utf-8")
    (src / "empty").mkdir()
    os.symlink("dir/text.txt", src / "link")
    os.link(src / "log.txt", src / "log-hardlink.txt")
    os.mkfifo(src / "pipe")
    os.chmod(src / "dir" / "text.txt", 0o640)
    yield
    with open(src / "log.txt", "a") as log:
        log.write("".join(f"more {i}\n" for i in range(500)))
    text = (src / "dir" / "text.txt").read_text()
    (src / "dir" / "text.txt").write_text(text[:5000] + "edited" + text[5000:])
    with open(src / "big.bin", "r+b") as big:
        big.seek(100_000)
        big.write(b"patched" * 100)
    shutil.copy(src / "dir" / "text.txt", src / "zz-copy.txt")
    yield
    (src / os.fsdecode(b"name-\xff")).unlink()
    os.rename(src / "dir", src / "renamed")
    os.unlink(src / "link")
    os.symlink("renamed/text.txt", src / "link")
    yield


def regenerate(version: int) -> None:
    target = DATA / f"store-v{version}"
    if target.exists():
        raise SystemExit(f"{target} exists; fixtures of released formats never change")
    work = DATA / "tmp-src"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = Store.open_or_create(target / "store")
    store.save_settings(Settings(block_mode_size=400_000, block_size=65_536))
    expected = {}
    for _ in _build_history(work):
        record = store.append(work)
        materialized = DATA / "tmp-out"
        store.materialize(record.visit, materialized)
        expected[str(record.visit)] = describe(materialized)
        shutil.rmtree(materialized)
    shutil.rmtree(work)
    for leftover in ("lock", "readers.lock", "tmp"):
        path = target / "store" / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (target / "expected.json").write_text(
        json.dumps(expected, indent=1, sort_keys=True)
    )


if __name__ == "__main__" and sys.argv[1:] == ["--regenerate"]:
    from deltatar.store import STORE_VERSION

    regenerate(STORE_VERSION)
