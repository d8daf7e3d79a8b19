"""The simulated node history must be repeatable and must exercise every kind
of change deltatar has to record, or the demo and the benchmarks prove little.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

import pytest

from deltatar import simulate

SCALE = 0.05


def _replay(root: Path, visits: int, seed: int = 7) -> list[dict[str, tuple]]:
    """Apply visits 1..``visits`` and return the listing after each one."""
    rng = random.Random(seed)
    listings = []
    for visit in range(1, visits + 1):
        simulate.apply_visit(root, visit, rng, SCALE)
        listings.append(_listing(root))
    return listings


def _listing(root: Path) -> dict[str, tuple]:
    """Path -> (kind, permission bits, bytes or symlink target or None)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        relative = path.relative_to(root).as_posix()
        bits = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            entries[relative] = ("symlink", bits, os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            entries[relative] = ("dir", bits, None)
        else:
            entries[relative] = ("file", bits, path.read_bytes())
    return entries


def _files(listing: dict[str, tuple]) -> dict[str, bytes]:
    return {path: entry[2] for path, entry in listing.items() if entry[0] == "file"}


def test_same_seed_gives_same_tree(tmp_path: Path) -> None:
    _replay(tmp_path / "a", 4, seed=11)
    _replay(tmp_path / "b", 4, seed=11)

    first = simulate.tree_digest(tmp_path / "a")
    assert first == simulate.tree_digest(tmp_path / "b")


def test_other_seed_gives_other_tree(tmp_path: Path) -> None:
    _replay(tmp_path / "a", 2, seed=1)
    _replay(tmp_path / "b", 2, seed=2)

    assert simulate.tree_digest(tmp_path / "a") != simulate.tree_digest(tmp_path / "b")


def test_first_visit_creates_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "missing" / "node"
    simulate.apply_visit(root, 1, random.Random(1), SCALE)

    assert (root / "worktree" / "src").is_dir()
    assert (root / "worktree" / "cache").is_dir()
    assert not any((root / "worktree" / "cache").iterdir())


def test_visit_zero_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        simulate.apply_visit(tmp_path, 0, random.Random(1), SCALE)


def test_logs_grow_by_appending(tmp_path: Path) -> None:
    before, after = (_files(listing) for listing in _replay(tmp_path, 2))

    for name in simulate.LOG_NAMES:
        path = f"logs/{name}"
        assert len(after[path]) > len(before[path])
        assert after[path].startswith(before[path])


def test_visits_add_edit_and_delete_files(tmp_path: Path) -> None:
    before, after = (_files(listing) for listing in _replay(tmp_path, 2))

    added = after.keys() - before.keys()
    deleted = before.keys() - after.keys()
    edited = [p for p in before.keys() & after.keys() if before[p] != after[p]]

    assert any(path.startswith("worktree/src/") for path in added)
    assert any(path.startswith("worktree/src/") for path in deleted)
    assert any(path.startswith("worktree/src/") for path in edited)
    assert "worktree/data/state.bin" in edited
    assert "worktree/data/frozen.bin" not in edited


def test_files_are_renamed_with_their_bytes(tmp_path: Path) -> None:
    before, after = (_files(listing) for listing in _replay(tmp_path, 2))

    moved = [path for path in after if "/moved_v002_" in path]
    old_contents = {hashlib.sha256(data).digest() for data in before.values()}

    assert len(moved) == 1
    assert hashlib.sha256(after[moved[0]]).digest() in old_contents


def test_stage_outputs_move_under_visit_dirs(tmp_path: Path) -> None:
    listings = _replay(tmp_path, 3)
    first, last = _files(listings[0]), _files(listings[-1])

    assert last["stage/visit_1/stdout.log"] == first["stage/stdout.log"]
    assert "stage/visit_2/report.md" in last
    assert last["stage/stdout.log"] == last["stage/events.ndjson"]
    assert listings[-1]["stage/visit_2/tmp"][0] == "dir"


def test_symlink_is_retargeted_each_visit(tmp_path: Path) -> None:
    listings = _replay(tmp_path, 3)

    targets = [listing["worktree/notes/CURRENT.md"] for listing in listings]
    assert [target[2] for target in targets] == [
        "visit_001.md",
        "visit_002.md",
        "visit_003.md",
    ]
    assert listings[-1]["worktree/data/model"] == ("symlink", 0o777, "frozen.bin")


def test_mode_only_change_and_type_swap_happen(tmp_path: Path) -> None:
    listings = _replay(tmp_path, 4)
    second, third = listings[1], listings[2]

    scripts = [p for p in second if p.startswith("worktree/scripts/")]
    changed = [p for p in scripts if second[p][1] != third[p][1]]
    assert len(changed) == 1
    assert second[changed[0]][2] == third[changed[0]][2]

    kinds = [listing["worktree/build/out"][0] for listing in listings]
    assert kinds == ["file", "file", "file", "dir"]


def test_packages_are_renamed_every_fourth_visit(tmp_path: Path) -> None:
    listings = _replay(tmp_path, 4)

    renamed = [path for path in listings[-1] if path.endswith("_r004")]
    assert len(renamed) == 1


def test_entries_it_did_not_create_are_left_alone(tmp_path: Path) -> None:
    rng = random.Random(3)
    simulate.apply_visit(tmp_path, 1, rng, SCALE)
    digest = simulate.tree_digest(tmp_path)
    store = tmp_path / ".deltatar"
    store.mkdir()
    (store / "HEAD").write_text("untouched")

    assert simulate.tree_digest(tmp_path) == digest
    simulate.apply_visit(tmp_path, 2, rng, SCALE)
    assert (store / "HEAD").read_text() == "untouched"


def test_command_line_prints_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "node"
    argv = [str(root), "--visits", "2", "--scale", str(SCALE), "--seed", "5"]
    assert simulate.main(argv) == 0

    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line == f"digest {simulate.tree_digest(root)}"
