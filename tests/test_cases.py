"""Scenarios from real-world archiver failures, run against the deltatar CLI.

Each test builds a source tree under ``tmp_path``, appends visits with the real
command line, and checks that every visit materializes exactly as the tree was
when it was appended (a ``cp -a`` reference is kept after every append).  Where
a scenario is about how much gets stored, the ``bytes_stored`` figure from
``append --json`` is checked against content made large and random on purpose,
so that storing it again could not go unnoticed.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import (
    Visits,
    assert_same_tree,
    copy_reference,
    count,
    run_cli,
    run_cli_measured,
    run_json,
    store_plaintext,
    store_size,
    tree_state,
    write,
)

KIB = 1024
MIB = 1024 * KIB

# A layer that records metadata only (a mode, a rename, a new link) is a few
# tar headers after compression; this is far below any real file content the
# tests use to detect content being stored again.
METADATA_ONLY = 16 * KIB


def utc_ns(*fields: int) -> int:
    """Return the nanosecond timestamp of a UTC date and time."""
    moment = datetime(*fields, tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000_000


def set_mtime(path: os.PathLike | bytes, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


# ------------------------------------------------------------ change detection


def test_same_size_edit_within_clock_tick_is_recorded(visits: Visits) -> None:
    # Three same-size writes all stamped with the whole second the appends run
    # in, as a filesystem with one-second timestamps would leave them.
    tick = int(time.time()) * 1_000_000_000
    contents = [b"AAAA", b"BBBB", b"CCCC"]

    for content in contents:
        write(visits.src / "f", content, mtime_ns=tick)
        visits.append()

    for visit, content in enumerate(contents, start=1):
        dest = visits.assert_visit_matches_reference(visit)
        assert (dest / "f").read_bytes() == content, f"visit {visit}"


def test_same_size_edit_with_mtime_put_back_is_recorded(visits: Visits) -> None:
    # Tools that copy timestamps (touch -r, rsync -t, unpackers) can rewrite a
    # file and restore its old mtime; size and mtime then match the previous
    # visit and only the inode change time tells that the bytes are new.
    old = utc_ns(2001, 2, 3, 4, 5, 6)
    contents = [b"AAAA", b"BBBB", b"CCCC"]

    for content in contents:
        write(visits.src / "f", content, mtime_ns=old)
        visits.append()

    for visit, content in enumerate(contents, start=1):
        dest = visits.assert_visit_matches_reference(visit)
        assert (dest / "f").read_bytes() == content, f"visit {visit}"


def test_mode_only_change_is_recorded_without_content(visits: Visits) -> None:
    # chmod moves neither size nor mtime; the new modes must still be recorded,
    # and recording them must not store the file bytes again.
    src = visits.src
    (src / "d").mkdir()
    write(src / "tool.sh", b"run\n", mode=0o644)
    os.chmod(src / "d", 0o755)
    write(src / "payload.bin", os.urandom(64 * KIB), mode=0o644)
    first = visits.append()

    os.chmod(src / "tool.sh", 0o755)
    os.chmod(src / "d", 0o700)
    os.chmod(src / "payload.bin", 0o755)
    second = visits.append()

    os.chmod(src / "tool.sh", 0o600)
    os.chmod(src / "payload.bin", 0o600)
    third = visits.append()

    expected_modes = {1: (0o644, 0o755), 2: (0o755, 0o700), 3: (0o600, 0o700)}
    for visit, (tool_mode, dir_mode) in expected_modes.items():
        state = tree_state(visits.assert_visit_matches_reference(visit))
        assert oct(state[b"tool.sh"].mode) == oct(tool_mode), f"visit {visit}"
        assert oct(state[b"d"].mode) == oct(dir_mode), f"visit {visit}"
    assert first["bytes_stored"] >= 64 * KIB, first
    assert second["bytes_stored"] < 1024, second
    assert third["bytes_stored"] < 1024, third


def test_moved_in_file_with_old_mtime_and_deletion_are_recorded(
    visits: Visits, tmp_path: Path
) -> None:
    # Files arriving with timestamps older than the last append (moved in,
    # unpacked) are new all the same, and a removed file must be gone.
    src = visits.src
    write(src / "a", b"base\n")
    visits.append()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(elsewhere / "b", b"old-but-new\n", mtime_ns=utc_ns(2001, 2, 3, 4, 5, 6))
    os.rename(elsewhere / "b", src / "b")
    (src / "tree").mkdir()
    write(src / "tree" / "c", b"x\n")
    set_mtime(src / "tree" / "c", utc_ns(1999, 1, 1))
    set_mtime(src / "tree", utc_ns(1999, 1, 1))
    (src / "a").unlink()
    summary = visits.append()

    first = visits.assert_visit_matches_reference(1)
    assert set(tree_state(first)) == {b"a"}
    second = visits.assert_visit_matches_reference(2)
    assert set(tree_state(second)) == {b"b", b"tree", b"tree/c"}
    assert (second / "b").read_bytes() == b"old-but-new\n"
    assert count(summary["deleted"]) == 1, summary
    assert count(summary["added"]) >= 2, summary


# --------------------------------------------------------------------- renames


def test_renamed_directory_leaves_no_stale_copy_and_reuses_content(
    visits: Visits,
) -> None:
    # A renamed directory must appear only under its new name, and the bytes
    # of files that merely moved must not be stored a second time.
    src = visits.src
    (src / "proj" / "sub").mkdir(parents=True)
    write(src / "proj" / "a", os.urandom(256 * KIB))
    write(src / "proj" / "sub" / "b", os.urandom(256 * KIB))
    first = visits.append()

    os.rename(src / "proj", src / "project")
    second = visits.append()

    os.rename(src / "project" / "sub", src / "sub2")
    write(src / "project" / "a", b"3\n")
    third = visits.append()

    visits.assert_each_visit_matches_reference()
    assert set(tree_state(visits.materialize(2))) == {
        b"project",
        b"project/a",
        b"project/sub",
        b"project/sub/b",
    }
    final = visits.materialize(3)
    assert set(tree_state(final)) == {b"project", b"project/a", b"sub2", b"sub2/b"}
    assert (final / "project" / "a").read_bytes() == b"3\n"
    assert first["bytes_stored"] >= 512 * KIB, first
    assert second["bytes_stored"] < METADATA_ONLY, second
    assert third["bytes_stored"] < METADATA_ONLY, third


# ------------------------------------------------------- deletion and recreation


def _delete_then_recreate(visits: Visits) -> None:
    src = visits.src
    (src / "d").mkdir()
    write(src / "f1", b"same\n")
    write(src / "f2", b"two\n")
    write(src / "d" / "g", b"in\n")
    visits.append()

    (src / "f1").unlink()
    shutil.rmtree(src / "d")
    visits.append()

    write(src / "f1", b"same\n")
    (src / "d").mkdir()
    visits.append()

    (src / "f2").unlink()
    visits.append()


DELETE_RECREATE_PATHS = {
    1: {b"f1", b"f2", b"d", b"d/g"},
    2: {b"f2"},
    3: {b"f1", b"f2", b"d"},
    4: {b"f1", b"d"},
}


def _check_delete_then_recreate(visits: Visits) -> None:
    for visit, paths in DELETE_RECREATE_PATHS.items():
        dest = visits.assert_visit_matches_reference(visit)
        assert set(tree_state(dest)) == paths, f"visit {visit}"
        if b"f1" in paths:
            assert (dest / "f1").read_bytes() == b"same\n", f"visit {visit}"


def test_recreated_paths_are_not_hidden_by_earlier_tombstones(
    visits: Visits,
) -> None:
    # A path deleted in one visit and created again (same content, directory
    # now empty) in a later one must come back in that later visit.
    _delete_then_recreate(visits)
    _check_delete_then_recreate(visits)


def test_recreated_paths_survive_compaction(visits: Visits) -> None:
    _delete_then_recreate(visits)
    visits.compact()
    _check_delete_then_recreate(visits)


# ------------------------------------------------------------------ type changes


def _swap_file_and_directory(visits: Visits) -> None:
    src = visits.src
    write(src / "node", b"plain\n")
    (src / "box").mkdir()
    write(src / "box" / "f", b"in\n")
    visits.append()

    (src / "node").unlink()
    (src / "node").mkdir()
    write(src / "node" / "c", b"child\n")
    shutil.rmtree(src / "box")
    write(src / "box", b"nowfile\n")
    visits.append()

    shutil.rmtree(src / "node")
    write(src / "node", b"plain-again\n")
    visits.append()


def _check_swap_file_and_directory(visits: Visits) -> None:
    first = visits.assert_visit_matches_reference(1)
    assert tree_state(first)[b"node"].kind == "file"
    assert (first / "box" / "f").read_bytes() == b"in\n"

    second = visits.assert_visit_matches_reference(2)
    assert (second / "node" / "c").read_bytes() == b"child\n"
    assert (second / "box").read_bytes() == b"nowfile\n"

    third = visits.assert_visit_matches_reference(3)
    assert set(tree_state(third)) == {b"node", b"box"}
    assert (third / "node").read_bytes() == b"plain-again\n"
    assert (third / "box").read_bytes() == b"nowfile\n"


def test_file_and_directory_swapping_places_materializes(visits: Visits) -> None:
    # A path that turns from file into directory and back must materialize
    # in every visit without the restore tripping over the other type.
    _swap_file_and_directory(visits)
    _check_swap_file_and_directory(visits)


def test_file_and_directory_swap_materializes_after_compaction(
    visits: Visits,
) -> None:
    _swap_file_and_directory(visits)
    visits.compact()
    _check_swap_file_and_directory(visits)


# ---------------------------------------------------------------------- symlinks


def _links_leaving_the_tree(visits: Visits, tmp_path: Path) -> dict[str, bytes]:
    """Build links that point out of the source or nowhere; return marker bytes."""
    markers = {
        "secret": b"secret-" + os.urandom(16).hex().encode(),
        "changed": b"changed-" + os.urandom(16).hex().encode(),
        "later": b"later-" + os.urandom(16).hex().encode(),
    }
    src, outside = visits.src, tmp_path / "outside"
    outside.mkdir()
    (src / "deep" / "er").mkdir(parents=True)
    write(outside / "s", markers["secret"])
    os.symlink("../outside/s", src / "rel-out")
    os.symlink(str(outside / "s"), src / "abs-out")
    os.symlink("does/not/exist", src / "dangling")
    os.symlink("../../zz", src / "deep" / "er" / "fwd")  # resolves from visit 2 on
    os.symlink("/etc/passwd", src / "sys")
    visits.append()

    write(src / "zz", markers["later"])
    write(outside / "s", markers["changed"])
    visits.append()
    return markers


LINK_TARGETS = {
    b"rel-out": b"../outside/s",
    b"dangling": b"does/not/exist",
    b"deep/er/fwd": b"../../zz",
    b"sys": b"/etc/passwd",
}


def _file_bytes_below(root: Path) -> bytes:
    state = tree_state(root)
    return b"".join(
        (root / os.fsdecode(rel)).read_bytes()
        for rel, entry in state.items()
        if entry.kind == "file"
    )


def test_symlinks_leaving_the_tree_materialize_as_links(
    visits: Visits, tmp_path: Path
) -> None:
    # Links out of the tree, absolute links and dangling links are entries of
    # their own: restored with the target verbatim, never followed, and the
    # place they point to is neither read into a visit nor written to.
    passwd = Path("/etc/passwd")
    passwd_before = (passwd.read_bytes(), passwd.stat().st_mtime_ns)
    markers = _links_leaving_the_tree(visits, tmp_path)
    outside_before = tree_state(tmp_path / "outside")
    targets = {**LINK_TARGETS, b"abs-out": os.fsencode(tmp_path / "outside/s")}

    for visit in (1, 2):
        dest = visits.materialize(visit)
        assert_same_tree(visits.references[visit - 1], dest)
        state = tree_state(dest)
        for rel, target in targets.items():
            assert state[rel].kind == "symlink", f"visit {visit}: {rel!r}"
            assert state[rel].target == target, f"visit {visit}: {rel!r}"
        restored = _file_bytes_below(dest)
        for name in ("secret", "changed"):
            assert markers[name] not in restored, f"visit {visit} holds {name}"
        assert passwd_before[0] not in restored

    assert_same_tree(outside_before, tree_state(tmp_path / "outside"))
    assert (passwd.read_bytes(), passwd.stat().st_mtime_ns) == passwd_before
    second = visits.summaries[1]
    assert count(second["added"]) == 1, second
    assert count(second["deleted"]) == 0, second
    # The top directory's mtime moved when zz appeared; nothing else changed.
    assert count(second["changed"]) <= 1, second


def test_forced_materialize_never_writes_through_links_in_dest(
    visits: Visits, tmp_path: Path
) -> None:
    # A destination that already holds links to the outside under names the
    # visit uses must have those links replaced, not written through.
    _links_leaving_the_tree(visits, tmp_path)
    outside = tmp_path / "outside"
    outside_before = tree_state(outside)
    dest = visits.fresh_path("forced")
    dest.mkdir()
    os.symlink(outside, dest / "deep")
    os.symlink(outside / "s", dest / "zz")

    run_cli("materialize", "--store", visits.store, "--visit", "2", dest, "--force")

    assert_same_tree(outside_before, tree_state(outside))
    assert_same_tree(visits.references[1], dest)


def test_store_never_holds_bytes_behind_symlinks(
    visits: Visits, tmp_path: Path
) -> None:
    markers = _links_leaving_the_tree(visits, tmp_path)
    stored = store_plaintext(visits.store)

    # The in-tree file must be readable this way, or the search proves nothing.
    assert markers["later"] in stored, "could not read file bytes out of the store"
    assert markers["secret"] not in stored
    assert markers["changed"] not in stored
    assert Path("/etc/passwd").read_bytes() not in stored


def test_symlink_to_directory_is_kept_as_link_not_descended(
    visits: Visits,
) -> None:
    # A link to a directory (and a link to its own parent) is one entry; its
    # target's contents are recorded once, under their real path only.
    src = visits.src
    (src / "real").mkdir()
    write(src / "real" / "file.txt", b"data\n")
    os.symlink("real", src / "alias")
    os.symlink(".", src / "self")
    visits.append(timeout=120)

    write(src / "real" / "two.txt", b"more\n" + os.urandom(64 * KIB))
    second = visits.append(timeout=120)

    visits.assert_each_visit_matches_reference()
    for visit in (1, 2):
        state = tree_state(visits.materialize(visit))
        assert state[b"alias"].kind == "symlink" and state[b"alias"].target == b"real"
        assert state[b"self"].kind == "symlink" and state[b"self"].target == b"."
        through_links = [p for p in state if p.startswith((b"alias/", b"self/"))]
        assert through_links == [], f"visit {visit}"
    assert count(second["added"]) == 1, second
    assert second["bytes_stored"] < 64 * KIB + METADATA_ONLY, second


# --------------------------------------------------------------------- hardlinks


def _inode_groups(root: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """Map each name to (inode, link count) as seen inside ``root``."""
    result = {}
    for name in names:
        st = os.lstat(root / name)
        result[name] = (st.st_ino, st.st_nlink)
    return result


def _hardlink_group_changes(visits: Visits) -> tuple[bytes, list[dict]]:
    src = visits.src
    # Random bulk so that storing the group's content twice would show.
    v1 = os.urandom(128 * KIB) + b"v1\n"
    write(src / "f1", v1)
    for n in (2, 3, 4):
        os.link(src / "f1", src / f"f{n}")
    summaries = [visits.append()]

    (src / "f1").unlink()
    os.link(src / "f4", src / "f5")
    summaries.append(visits.append())

    with open(src / "f2", "ab") as f:
        f.write(b"v2\n")
    summaries.append(visits.append())

    shutil.copyfile(src / "f3", src / "tmp")
    os.rename(src / "tmp", src / "f3")
    with open(src / "f3", "ab") as f:
        f.write(b"v3\n")
    summaries.append(visits.append())
    return v1, summaries


def _check_hardlink_groups(visits: Visits, v1: bytes) -> None:
    visits.assert_each_visit_matches_reference()

    second = visits.materialize(2)
    links = _inode_groups(second, ["f2", "f3", "f4", "f5"])
    assert len({ino for ino, _ in links.values()}) == 1, links
    assert {nlink for _, nlink in links.values()} == {4}, links
    assert (second / "f2").read_bytes() == v1

    third = visits.materialize(3)
    links = _inode_groups(third, ["f2", "f3", "f4", "f5"])
    assert len({ino for ino, _ in links.values()}) == 1, links
    for name in links:
        assert (third / name).read_bytes() == v1 + b"v2\n", name

    fourth = visits.materialize(4)
    links = _inode_groups(fourth, ["f2", "f3", "f4", "f5"])
    assert links["f2"] == links["f4"] == links["f5"], links
    assert links["f2"][1] == 3, links
    assert links["f3"][0] != links["f2"][0] and links["f3"][1] == 1, links
    assert (fourth / "f5").read_bytes() == v1 + b"v2\n"
    assert (fourth / "f3").read_bytes() == v1 + b"v2\nv3\n"


def test_hardlink_group_is_restored_as_one_inode_through_changes(
    visits: Visits,
) -> None:
    # A group of names for one inode loses its first name, gains a new one,
    # is edited through one name and finally has one name split off; each
    # visit must bring back exactly that grouping, content stored once.
    v1, summaries = _hardlink_group_changes(visits)
    _check_hardlink_groups(visits, v1)

    size = len(v1)
    first, second, third, fourth = (s["bytes_stored"] for s in summaries)
    assert size <= first < 1.5 * size, summaries[0]
    assert second < METADATA_ONLY, summaries[1]
    assert third < 1.5 * size, summaries[2]
    assert fourth < 1.5 * size, summaries[3]


def test_hardlink_groups_survive_compaction(visits: Visits) -> None:
    v1, _ = _hardlink_group_changes(visits)
    visits.compact()
    _check_hardlink_groups(visits, v1)


# ------------------------------------------------------------------------- names


NON_UTF8_VISIT_1 = {
    b"\xfe": b"one",
    b"\xff": b"two",
    b"d\xe9j\xe0/\xc3\x28": b"three",
    "ok-é".encode(): b"four",
}


def _non_utf8_names(visits: Visits) -> None:
    src = os.fsencode(visits.src)
    os.mkdir(os.path.join(src, b"d\xe9j\xe0"))
    for name, content in NON_UTF8_VISIT_1.items():
        write(os.path.join(src, name), content)
    visits.append()

    os.remove(os.path.join(src, b"\xfe"))
    write(os.path.join(src, b"\xff"), b"TWO")
    visits.append()


def _read(root: Path, rel: bytes) -> bytes:
    with open(os.path.join(os.fsencode(root), rel), "rb") as f:
        return f.read()


def test_non_utf8_names_round_trip_byte_for_byte(visits: Visits) -> None:
    # Names are bytes: two names differing only in bytes that are not UTF-8
    # must stay two distinct entries with their own contents.
    _non_utf8_names(visits)

    first = visits.assert_visit_matches_reference(1)
    assert set(tree_state(first)) == set(NON_UTF8_VISIT_1) | {b"d\xe9j\xe0"}
    for rel, content in NON_UTF8_VISIT_1.items():
        assert _read(first, rel) == content, rel

    second = visits.assert_visit_matches_reference(2)
    names = set(tree_state(second))
    assert b"\xfe" not in names
    assert _read(second, b"\xff") == b"TWO"


@pytest.mark.parametrize(
    "environment",
    [
        {"LC_ALL": "C.UTF-8"},
        {"LC_ALL": "C"},
        {"PYTHONIOENCODING": "utf-8"},
    ],
    ids=["utf8-locale", "c-locale", "strict-utf8-io"],
)
def test_log_and_verify_handle_non_utf8_names(
    visits: Visits, environment: dict[str, str]
) -> None:
    # Reporting must escape such names, never die on encoding them.
    _non_utf8_names(visits)

    commands = [
        ("log", "--store", visits.store),
        ("log", "--store", visits.store, "--json"),
        ("verify", "--store", visits.store),
        ("verify", "--store", visits.store, "--quick"),
        ("verify", "--store", visits.store, "--visit", "1"),
    ]
    for args in commands:
        result = run_cli(*args, env=environment)
        assert "Traceback" not in result.stderr, result.stderr
        assert "UnicodeEncodeError" not in result.stderr, result.stderr


# ------------------------------------------------------------------ self-inclusion


SELF_INCLUSION_LAYOUTS = {
    # how the store is named on the command line, relative to T
    "plain": "src/.snap",
    "through-symlink-outside-source": "via/.snap",
    "through-symlink-inside-source": "src/here/.snap",
    "relative-from-inside-source": ".snap",
}


@pytest.mark.parametrize("layout", SELF_INCLUSION_LAYOUTS)
def test_store_inside_source_is_left_out_of_every_visit(
    tmp_path: Path, layout: str
) -> None:
    # A store kept inside the tree it records must not record itself, however
    # its path is spelled, or every layer would carry all earlier ones.
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(src, tmp_path / "via")
    if layout == "through-symlink-inside-source":
        os.symlink(".", src / "here")
    write(src / "data", os.urandom(1 * MIB))
    if layout == "relative-from-inside-source":
        cwd, source, store = src, ".", ".snap"
    else:
        cwd, source, store = tmp_path, src, tmp_path / SELF_INCLUSION_LAYOUTS[layout]

    sizes, summaries = [0], []
    for v in range(1, 7):
        write(src / f"new{v}", os.urandom(100 * KIB))
        summaries.append(
            run_json("append", source, "--store", store, "--json", cwd=cwd)
        )
        assert summaries[-1]["visit"] == v
        sizes.append(store_size(src / ".snap"))
        copy_reference(src, tmp_path / f"ref{v}", exclude=[".snap"])

    dest = tmp_path / "m6"
    run_cli("materialize", "--store", src / ".snap", "--visit", "6", dest)
    assert_same_tree(tmp_path / "ref6", dest)
    names = {rel for rel in tree_state(dest) if b"/" not in rel}
    assert {b"data", *(f"new{v}".encode() for v in range(1, 7))} <= names
    assert b".snap" not in names

    growth = [after - before for before, after in pairwise(sizes)]
    assert growth[0] < 1 * MIB + 100 * KIB + 256 * KIB, growth
    assert all(g < 100 * KIB + 150 * KIB for g in growth[1:]), growth
    assert summaries[5]["bytes_stored"] < 1 * MIB, summaries[5]


def test_foreign_store_inside_source_is_never_expanded(tmp_path: Path) -> None:
    # Another tree's store that happens to sit in the source is ordinary data:
    # either skipped or kept byte for byte, never unpacked into its tree.
    other = tmp_path / "other"
    other.mkdir()
    write(other / "other-file", os.urandom(64 * KIB))
    visits = Visits(tmp_path)
    foreign = visits.src / "vendor"
    run_cli("append", other, "--store", foreign)
    write(visits.src / "data", os.urandom(256 * KIB))
    visits.append()

    write(other / "other-later", b"later\n")
    run_cli("append", other, "--store", foreign)
    write(visits.src / "new", b"new\n")
    visits.append()

    for visit in (1, 2):
        dest = visits.materialize(visit)
        state = tree_state(dest)
        expanded = [rel for rel in state if rel.endswith((b"other-file", b"later"))]
        assert expanded == [], f"visit {visit}: {expanded}"
        if any(rel.startswith(b"vendor") for rel in state):
            assert_same_tree(visits.references[visit - 1], state)
        else:
            reference = tree_state(visits.references[visit - 1], exclude=["vendor"])
            assert_same_tree(reference, state)


# ----------------------------------------------------------------------- scale


def _many_small_files(tmp_path: Path, dirs: int, files: int) -> None:
    """Append a wide tree, change every tenth directory, drop the last one."""
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    for d in range(1, dirs + 1):
        (src / f"d{d}").mkdir()
        for f in range(1, files + 1):
            write(src / f"d{d}" / f"f{f}", f"{d}.{f}\n".encode())
    peaks = {}

    _, peaks["append of visit 1"] = run_cli_measured(
        "append", src, "--store", store, "--json"
    )

    changed = range(1, dirs + 1, 10)
    for d in changed:
        write(src / f"d{d}" / "f1", b"changed\n")
    shutil.rmtree(src / f"d{dirs}")
    _, peaks["append of visit 2"] = run_cli_measured(
        "append", src, "--store", store, "--json"
    )
    summary = run_json("log", "--store", store, "--json")["visits"][1]

    dest = tmp_path / "m2"
    _, peaks["materialize of visit 2"] = run_cli_measured(
        "materialize", "--store", store, "--visit", "2", dest
    )

    assert_same_tree(src, dest)
    # The top directory's mtime moved too, which may count as one change.
    assert count(summary["changed"]) in (len(changed), len(changed) + 1), summary
    assert count(summary["deleted"]) in (1, files + 1), summary
    # The layer alone: the manifest, a full listing of the visit, grows with
    # the tree by design and is not what the scenario bounds.
    assert summary["layer_bytes"] < 1 * MIB, summary

    # Checked last so that one report shows every command's peak.
    over = {step: peak // MIB for step, peak in peaks.items() if peak >= 512 * MIB}
    assert not over, f"peak RSS in MiB over the 512 MiB limit: {over}"


def test_many_small_files_append_and_materialize_in_bounded_memory(
    tmp_path: Path,
) -> None:
    _many_small_files(tmp_path, dirs=20, files=100)


@pytest.mark.slow
def test_two_hundred_thousand_files_stay_under_memory_limit(tmp_path: Path) -> None:
    _many_small_files(tmp_path, dirs=200, files=1000)
