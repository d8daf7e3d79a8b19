"""Round-trip properties: every visit materializes identical to what was appended.

Hypothesis generates sequences of tree mutations (create, edit in place,
append, truncate, delete, rename files and directories, swap a file for a
directory, chmod, retarget symlinks, hardlink, touch with an old mtime, same
size edits that keep the mtime).  After each batch a visit is appended and the
tree captured; at the end every visit is materialized and compared, then the
store is compacted and every kept visit is compared again.  A generated
policy (retention on chosen visit times, merges, rebases) then compacts it
once more, a visit is appended and the policy applied again, so layers that
compaction carried or retained are themselves dropped; every kept visit is
compared after each step.

The store runs with tiny block sizes so that the large-file (block) path is
exercised by files of a few hundred KiB.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import assert_same_tree, tree_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltatar import Store
from deltatar.delta import Settings
from deltatar.policy import Policy

NAMES = ["a", "b", "sub", os.fsdecode(b"n\xff"), "x y"]
PATHS = [
    "/".join(parts)
    for parts in [(n,) for n in NAMES]
    + [(d, n) for d in ("sub", "b") for n in NAMES[:3]]
]
LINK_TARGETS = ["a", "../a", "/etc/passwd", "missing/target", ".", "sub/a"]
MODES = [0o644, 0o600, 0o755, 0o700, 0o444, 0o750]
KINDS_OF_CONTENT = ["empty", "text", "binary", "large", "zeros"]

mutation = st.one_of(
    st.tuples(
        st.just("write"),
        st.sampled_from(PATHS),
        st.sampled_from(KINDS_OF_CONTENT),
        st.integers(0, 2**16),
    ),
    st.tuples(st.just("append"), st.sampled_from(PATHS), st.integers(1, 5000)),
    st.tuples(
        st.just("edit_keep_mtime"), st.sampled_from(PATHS), st.integers(0, 2**16)
    ),
    st.tuples(st.just("edit_in_place"), st.sampled_from(PATHS), st.integers(0, 2**16)),
    st.tuples(st.just("truncate"), st.sampled_from(PATHS), st.integers(0, 3000)),
    st.tuples(st.just("delete"), st.sampled_from(PATHS)),
    st.tuples(st.just("rename"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    st.tuples(st.just("mkdir"), st.sampled_from(PATHS)),
    st.tuples(st.just("chmod"), st.sampled_from(PATHS), st.sampled_from(MODES)),
    st.tuples(
        st.just("symlink"), st.sampled_from(PATHS), st.sampled_from(LINK_TARGETS)
    ),
    st.tuples(st.just("hardlink"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    st.tuples(st.just("touch"), st.sampled_from(PATHS), st.integers(0, 2**31)),
    st.tuples(st.just("fifo"), st.sampled_from(PATHS)),
)
history = st.lists(st.lists(mutation, min_size=1, max_size=6), min_size=1, max_size=6)


def _content(kind: str, seed: int) -> bytes:
    if kind == "empty":
        return b""
    if kind == "text":
        return (f"line {seed}\n" * (seed % 50 + 1)).encode()
    if kind == "binary":
        return os.urandom(seed % 3000 + 1)
    if kind == "zeros":
        return bytes(seed % 3 * 70_000 + 10)
    words = [f"w{(seed * 7 + i) % 997}" for i in range(60_000)]
    return " ".join(words).encode()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _parent_ready(root: Path, relative: str) -> bool:
    parent = (root / relative).parent
    if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
        return False
    parent.mkdir(parents=True, exist_ok=True)
    return True


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _reaches_through_link(root: Path, relative: str) -> bool:
    """True when a parent of ``relative`` is a symlink or not a directory."""
    parent = root
    for part in relative.split("/")[:-1]:
        parent = parent / part
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            return True
    return False


def apply_mutation(root: Path, step: tuple) -> None:
    """Apply one generated mutation when it makes sense in the current tree."""
    kind, relative = step[0], step[1]
    path = root / relative
    others = [step[2]] if kind in ("rename", "hardlink") else []
    if any(_reaches_through_link(root, name) for name in [relative, *others]):
        return
    if kind in ("write", "mkdir", "symlink", "fifo") and not _parent_ready(
        root, relative
    ):
        return
    if kind == "write":
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        if path.is_symlink() or (path.exists() and not _is_plain_file(path)):
            path.unlink()
        with open(path, "wb") as handle:
            handle.write(_content(step[2], step[3]))
    elif kind == "append" and _is_plain_file(path):
        with open(path, "ab") as handle:
            handle.write(b"appended line\n" * step[2])
    elif kind in ("edit_keep_mtime", "edit_in_place") and _is_plain_file(path):
        _edit(path, step[2], keep_mtime=kind == "edit_keep_mtime")
    elif kind == "truncate" and _is_plain_file(path):
        os.truncate(path, step[2])
    elif kind == "delete":
        _remove(path)
    elif kind == "rename":
        _rename(root, relative, step[2])
    elif kind == "mkdir" and not path.exists() and not path.is_symlink():
        path.mkdir()
    elif kind == "chmod" and (path.exists() and not path.is_symlink()):
        os.chmod(path, step[2] | (0o700 if path.is_dir() else 0))
    elif kind == "symlink":
        _remove(path)
        os.symlink(step[2], path)
    elif kind == "hardlink":
        _hardlink(root, relative, step[2])
    elif kind == "touch" and (path.exists() or path.is_symlink()):
        os.utime(
            path,
            ns=(step[2] * 10**9 + 123, step[2] * 10**9 + 123),
            follow_symlinks=False,
        )
    elif kind == "fifo" and not path.exists() and not path.is_symlink():
        os.mkfifo(path)


def _edit(path: Path, seed: int, keep_mtime: bool) -> None:
    info = path.stat()
    size = info.st_size
    if size == 0:
        return
    with open(path, "r+b") as handle:
        handle.seek(seed % size)
        handle.write(bytes([(seed % 251) + 1]) * min(16, size - seed % size))
    if keep_mtime:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def _rename(root: Path, source: str, target: str) -> None:
    src, dst = root / source, root / target
    if not (src.exists() or src.is_symlink()) or source == target:
        return
    if target.startswith(source + "/") or source.startswith(target + "/"):
        return
    if not _parent_ready(root, target):
        return
    _remove(dst)
    os.rename(src, dst)


def _hardlink(root: Path, source: str, target: str) -> None:
    src, dst = root / source, root / target
    if not _is_plain_file(src) or source == target or not _parent_ready(root, target):
        return
    if src.parent.resolve() == dst.resolve():
        return
    _remove(dst)
    os.link(src, dst)


def _small_block_settings(store: Store) -> None:
    store.save_settings(
        Settings(block_mode_size=200_000, block_size=65_536, max_patch_depth=2)
    )


T0 = 1_767_571_200 * 10**9
MINUTE = 60 * 10**9

policies = st.builds(
    Policy,
    keep_last=st.one_of(st.none(), st.integers(1, 4)),
    keep_within=st.one_of(st.none(), st.sampled_from(["30m", "3h", "1d"])),
    keep_hourly=st.one_of(st.none(), st.integers(1, 3)),
    keep_daily=st.one_of(st.none(), st.integers(1, 2)),
    max_chain=st.one_of(st.none(), st.integers(1, 3)),
    max_delta_percent=st.one_of(st.none(), st.sampled_from([1, 30, 300])),
)


def check_history(
    batches: list[list[tuple]],
    keep_last: int | None,
    policy: Policy | None = None,
    spacing: int = 60,
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        src, store_path = root / "src", root / "src" / ".store"
        src.mkdir()
        store = Store.open_or_create(store_path)
        _small_block_settings(store)
        expected = {}
        for number, batch in enumerate(batches):
            for step in batch:
                apply_mutation(src, step)
            when = T0 + (number * spacing + number * number % 7) * MINUTE
            record = store.append(src, visit_time_ns=when)
            expected[record.visit] = tree_state(src, exclude=[".store"])
        _compare_all(store, root / "out", expected)
        assert store.verify() == []
        store.compact(keep_last=keep_last)
        _compare_kept(store, root / "compacted", expected)
        if policy is None:
            return
        store.compact(auto=True, policy=policy)
        _compare_kept(store, root / "policy", expected)
        for step in batches[0]:
            apply_mutation(src, step)
        when = T0 + (len(batches) + 1) * spacing * MINUTE
        record = store.append(src, visit_time_ns=when)
        expected[record.visit] = tree_state(src, exclude=[".store"])
        store.compact(auto=True, policy=policy)
        _compare_kept(store, root / "again", expected)


def _compare_kept(store: Store, out: Path, expected: dict) -> None:
    kept = {record.visit: expected[record.visit] for record in store.visits()}
    _compare_all(store, out, kept)
    assert store.verify() == []


def _compare_all(store: Store, out: Path, expected: dict) -> None:
    for visit, state in expected.items():
        dest = out / str(visit)
        store.materialize(visit, dest)
        assert_same_tree(state, tree_state(dest))


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    batches=history,
    keep_last=st.one_of(st.none(), st.integers(1, 3)),
    policy=policies,
    spacing=st.integers(1, 600),
)
def test_every_visit_round_trips_before_and_after_compaction(
    batches, keep_last, policy, spacing
):
    check_history(batches, keep_last, policy, spacing)


@pytest.mark.slow
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    batches=history,
    keep_last=st.one_of(st.none(), st.integers(1, 3)),
    policy=policies,
    spacing=st.integers(1, 600),
)
def test_many_random_histories_round_trip(batches, keep_last, policy, spacing):
    check_history(batches, keep_last, policy, spacing)
