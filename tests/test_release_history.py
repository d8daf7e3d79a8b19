"""A real directory history: successive releases of a real project as visits.

The releases of pip are downloaded once into a cache with pip itself and
unpacked one after another into the same directory, the way a pipeline's
working directory moves from one state to the next.  Every visit must
materialize identical, before and after compaction, and the store must cost
far less than one archive per release.

The download needs the package index; when it fails the test fails, it never
skips, so a run without the network is a visible failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import assert_same_tree, tree_state

from deltatar import Store

RELEASES = ["22.3", "23.0", "23.1", "23.2", "23.3", "24.0", "24.1", "24.2"]
CACHE = Path(
    os.environ.get("DELTATAR_TEST_CACHE", Path.home() / ".cache" / "deltatar-tests")
)


def download_releases() -> list[Path]:
    """The wheels of every release, fetched into the cache when missing."""
    folder = CACHE / "pip-releases"
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for release in RELEASES:
        found = sorted(folder.glob(f"pip-{release}-*.whl"))
        if not found:
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--dest",
                str(folder),
                f"pip=={release}",
            ]
            subprocess.run(command, check=True, timeout=300)
            found = sorted(folder.glob(f"pip-{release}-*.whl"))
        assert found, f"pip {release} was not downloaded into {folder}"
        wheels.append(found[0])
    return wheels


def unpack_as_visit(wheel: Path, src: Path) -> None:
    """Replace the tree's content with one release, keeping the store inside."""
    for child in src.iterdir():
        if child.name == ".deltatar":
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(src)


@pytest.mark.slow
def test_successive_releases_of_a_real_project_round_trip(tmp_path: Path) -> None:
    wheels = download_releases()
    src = tmp_path / "node"
    src.mkdir()
    store = Store.open_or_create(src / ".deltatar")
    expected = {}
    for wheel in wheels:
        unpack_as_visit(wheel, src)
        record = store.append(src, message=wheel.name)
        expected[record.visit] = tree_state(src, exclude=[".deltatar"])

    for visit, state in expected.items():
        dest = tmp_path / f"visit-{visit}"
        store.materialize(visit, dest)
        assert_same_tree(state, tree_state(dest))
    archives = sum(wheel.stat().st_size for wheel in wheels)
    assert store.disk_usage() < 0.5 * archives

    store.compact(keep_last=3)
    for record in store.visits():
        dest = tmp_path / f"compacted-{record.visit}"
        store.materialize(record.visit, dest)
        assert_same_tree(expected[record.visit], tree_state(dest))
    assert store.verify() == []
