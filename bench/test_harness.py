"""Checks of the benchmark's own measuring pieces, on real files.

The benchmark judges deltatar by these numbers, so the parts that decide
what counts as new bytes, how a release replaces the tree and how a ratio
becomes a verdict are tested like any other code.  ``scripts/test`` runs
them next to the micro-benchmark smoke check.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

from bench.compact_io import edit_some
from bench.ideal import patch_size
from bench.limits import FloorTracker
from bench.releases import ReleaseHistory
from bench.run import BENCH_DIR, _parse
from bench.targets import final_numbers


def test_floor_counts_only_new_and_changed_files(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for index in range(5):
        (tree / f"f{index}").write_bytes(os.urandom(1000 + index))
    floors = FloorTracker()
    first = floors.measure(tree)

    (tree / "f0").write_bytes(os.urandom(3000))
    (tree / "new").write_bytes(b"x" * 500)
    second = floors.measure(tree)

    assert (first["files"], first["new_files"]) == (5, 5)
    assert first["new_bytes"] == sum(1000 + index for index in range(5))
    assert (second["files"], second["new_files"], second["new_bytes"]) == (6, 2, 3500)
    assert second["floor_seconds"] >= second["stat_seconds"]


def test_release_replaces_the_tree_without_its_top_directory(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for release, files in (("1.0", {"a.py": b"one", "old.txt": b"x"}), ("2.0", {})):
        files = files or {"a.py": b"two", "pkg/b.py": b"new"}
        _sdist(cache / f"pip-{release}.tar.gz", f"pip-{release}", files)
    history = ReleaseHistory(cache, ("1.0", "2.0"))
    tree = tmp_path / "tree"

    history.apply_visit(tree, 1, random.Random(1), 1.0)
    first = sorted(str(path.relative_to(tree)) for path in tree.rglob("*"))
    history.apply_visit(tree, 2, random.Random(1), 1.0)

    assert first == ["a.py", "old.txt"]
    assert (tree / "a.py").read_bytes() == b"two"
    assert not (tree / "old.txt").exists()
    assert (tree / "pkg" / "b.py").read_bytes() == b"new"


def test_targets_are_ratios_of_the_same_run() -> None:
    rows = [_row(visit, deltatar=2.0, restic=12.0, floor=1.0) for visit in (1, 2, 3)]
    data = {"name": "attractor", "visits": rows, "restore": {}}

    targets = final_numbers(data, ["deltatar", "restic"])["targets"]

    assert targets["append_vs_floor"]["ratio"] == 2.0
    assert targets["append_vs_floor"]["met"] is False
    assert targets["append_vs_restic"]["ratio"] == 6.0
    assert targets["append_vs_restic"]["met"] is True
    assert targets["smallest_store"]["met"] is True


def test_patch_against_a_tiny_old_version_is_priced() -> None:
    new = b"a line of text that grew\n" * 40
    assert 0 < patch_size(new, b"abc") < len(new)
    assert 0 < patch_size(new, new[:500]) < patch_size(new, b"abc")


def _row(visit: int, deltatar: float, restic: float, floor: float) -> dict:
    def outcome(seconds: float, size: int) -> dict:
        return {"seconds": seconds, "store_bytes": size, "peak_rss_kib": 1000}

    return {
        "visit": visit,
        "tree_bytes": 100,
        "floor": {"files": 10, "floor_seconds": floor},
        "ideal": {"ideal_bytes": 10},
        "tools": {"deltatar": outcome(deltatar, 50), "restic": outcome(restic, 80)},
    }


def _sdist(path: Path, top: str, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_compaction_edits_never_write_through_a_symlink(tmp_path: Path) -> None:
    """The copied tree may hold a symlink leading out of it; edits skip it."""
    outside = tmp_path / "outside.py"
    outside.write_bytes(b"# keep me\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "module.py").write_bytes(b"a = 1\nb = 2\n")
    (src / "linked.py").symlink_to(outside)

    for visit in range(2, 6):
        edit_some(src, random.Random(visit), 1.0, visit, new=visit % 2 == 0)

    assert outside.read_bytes() == b"# keep me\n"
    assert (src / "module.py").read_bytes().endswith(b"# visit 5\n")


def test_a_large_run_reports_beside_the_default_one() -> None:
    default, large = _parse([]), _parse(["--large"])

    assert default.report == BENCH_DIR / "RESULTS.md"
    assert large.report == BENCH_DIR / "large" / "RESULTS.md"
    assert large.out != default.out
    assert large.workload == ["generic"]
