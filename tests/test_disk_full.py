"""Run out of disk space for real: the store lives on a small tmpfs we mount.

A full filesystem must cost the user nothing but the command that hit it:
the command exits 1 with one line that says there is no space, the head is
byte for byte what it was, every visit still materializes and verifies, and
once space is freed the same command succeeds and leaves no temporary files
behind.  Compaction also refuses before writing anything when the
free space is clearly too small, saying how much it needs.

These tests need root (to mount); without it, or where mounting is not
permitted, they are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    assert_same_tree,
    copy_reference,
    describe_run,
    run_cli,
    run_json,
)

MIB = 1024 * 1024
PAGE = 4096
OBJECT_DIRS = ("layers", "manifests", "contents")


# ----------------------------------------------------------------- helpers


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size_mib: int = 64) -> Iterator[Path]:
    """Mount a tmpfs of ``size_mib`` MiB at ``mount_point``; skip if we cannot."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount are not installed")
    mount_point.mkdir()
    command = [
        "mount",
        "-t",
        "tmpfs",
        "-o",
        f"size={size_mib}m",
        "tmpfs",
        str(mount_point),
    ]
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted after the test."""
    with small_filesystem(tmp_path / "small") as mount_point:
        yield mount_point


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(mount_point: Path, leave: int = 0) -> Path:
    """Take all free space but ``leave`` bytes (rounded down to a page)."""
    filler = mount_point / "filler"
    wanted = free_bytes(mount_point) - leave
    with open(filler, "ab", buffering=0) as handle:
        if wanted > 0:
            try:
                os.posix_fallocate(
                    handle.fileno(), handle.tell(), wanted - wanted % PAGE
                )
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
        if leave == 0:
            _write_until_full(handle)
    return filler


def _write_until_full(handle) -> None:
    chunk = bytes(PAGE)
    with contextlib.suppress(OSError):
        while True:
            handle.write(chunk)


def leftovers(store: Path) -> list[str]:
    """Files in tmp/ and objects that the head does not name."""
    head = json.loads((store / "HEAD").read_bytes())
    named = set(head.get("garbage", []))
    for record in head["visits"]:
        named.update((record["layer"], record["manifest"], record["contents"]))
        named.update(record.get("retained_layers", []))
        named.update(
            [record["manifest_reference"]] * bool(record["manifest_reference"])
        )
    extra = [f"tmp/{name}" for name in sorted(os.listdir(store / "tmp"))]
    for kind in OBJECT_DIRS:
        extra += [
            f"{kind}/{name}"
            for name in sorted(os.listdir(store / kind))
            if f"{kind}/{name}" not in named
        ]
    return extra


class Chain:
    """A source tree on ordinary disk and its store on the small filesystem."""

    def __init__(self, base: Path, store: Path) -> None:
        self.base = base
        self.src = base / "src"
        self.store = store
        self.references: list[Path | None] = []  # None: compacted away
        self.src.mkdir()
        self._fresh = 0

    def add(self, name: str, size: int, seed: int) -> None:
        (self.src / name).write_bytes(_noise(size, seed))

    def append(self) -> dict:
        summary = run_json("append", self.src, "--store", self.store, "--json")
        assert summary["visit"] == len(self.references) + 1, summary
        reference = self.base / f"ref{summary['visit']}"
        copy_reference(self.src, reference)
        self.references.append(reference)
        return summary

    def visits(self) -> list[int]:
        return [
            v["visit"]
            for v in run_json("log", "--store", self.store, "--json")["visits"]
        ]

    def assert_intact(self, head: bytes) -> None:
        """The head is unchanged and every visit verifies and restores exactly."""
        assert (self.store / "HEAD").read_bytes() == head, "the head changed"
        kept = [n for n, ref in enumerate(self.references, 1) if ref is not None]
        assert self.visits() == kept
        verify = run_cli("verify", "--store", self.store, check=False)
        assert verify.returncode == 0, describe_run(verify, "verify after ENOSPC")
        for visit, reference in enumerate(self.references, 1):
            if reference is None:
                continue
            self._fresh += 1
            dest = self.base / f"m{visit}-{self._fresh}"
            run_cli("materialize", "--store", self.store, "--visit", str(visit), dest)
            assert_same_tree(reference, dest)
            shutil.rmtree(dest)


def _noise(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


def assert_no_space_error(result: subprocess.CompletedProcess, names: Path) -> None:
    """Exit 1 with one line on stderr that says there is no space, naming ``names``."""
    assert result.returncode == 1, describe_run(result, "expected exit status 1")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, describe_run(result, "expected one line on stderr")
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("deltatar: error:"), lines[0]
    assert "no space" in lines[0].lower(), lines[0]
    assert str(names) in lines[0], f"the message does not name {names}: {lines[0]}"


def br24_chain(base: Path, small: Path) -> Chain:
    """A store of a 20 MiB file, then two visits adding 10 MiB each."""
    chain = Chain(base, small / "store")
    chain.add("a", 20 * MIB, seed=1)
    chain.append()
    for visit in (2, 3):
        chain.add(f"a{visit}", 10 * MIB, seed=visit)
        chain.append()
    return chain


# ------------------------------------------------------------------ append


def rehearse_append(chain: Chain) -> dict:
    """Append the pending change to a copy of the store on ordinary disk."""
    copy = chain.base / "rehearsal"
    shutil.copytree(chain.store, copy)
    summary = run_json("append", chain.src, "--store", copy, "--json")
    shutil.rmtree(copy)
    return summary


def pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


# How much room to leave, as a function of the new visit's layer size: nothing,
# a little, half the layer, then the layer exactly and one or two pages more,
# so that ENOSPC strikes while writing the layer, the manifest, the contents
# list and the head in turn.
APPEND_LEVELS = {
    "nothing": lambda layer: 0,
    "one-mib": lambda layer: MIB,
    "half-layer": lambda layer: layer // 2,
    "layer": lambda layer: pages(layer),
    "layer+1page": lambda layer: pages(layer) + PAGE,
    "layer+2pages": lambda layer: pages(layer) + 2 * PAGE,
}
# Levels at which the pending visit cannot possibly fit.
MUST_FAIL = {"nothing", "one-mib", "half-layer", "layer"}


@pytest.mark.parametrize("level", list(APPEND_LEVELS))
def test_append_on_full_disk_changes_nothing(tmp_path, small, level) -> None:
    chain = br24_chain(tmp_path, small)
    chain.add("a4", 10 * MIB, seed=4)
    layer_bytes = rehearse_append(chain)["layer_bytes"]
    head = (chain.store / "HEAD").read_bytes()
    filler = fill(small, leave=APPEND_LEVELS[level](layer_bytes))

    result = run_cli("append", chain.src, "--store", chain.store, check=False)

    if result.returncode == 0:
        # Only the generous levels may fit the whole visit.
        assert level not in MUST_FAIL, describe_run(result, "append cannot fit")
        copy_reference(chain.src, tmp_path / "ref4")
        chain.references.append(tmp_path / "ref4")
        head = (chain.store / "HEAD").read_bytes()
    else:
        assert_no_space_error(result, chain.store)
    chain.assert_intact(head)

    filler.unlink()
    chain.add("a5", MIB, seed=5)
    chain.append()
    assert leftovers(chain.store) == []
    chain.assert_intact((chain.store / "HEAD").read_bytes())


def test_append_retried_on_full_disk_does_not_pile_up(tmp_path, small) -> None:
    # Three failed attempts in a row; their leftovers must not add up.
    chain = br24_chain(tmp_path, small)
    chain.add("a4", 10 * MIB, seed=4)
    head = (chain.store / "HEAD").read_bytes()
    filler = fill(small, leave=6 * MIB)
    for _ in range(3):
        result = run_cli("append", chain.src, "--store", chain.store, check=False)
        assert_no_space_error(result, chain.store)
        chain.assert_intact(head)

    filler.unlink()
    chain.append()
    assert leftovers(chain.store) == []
    chain.assert_intact((chain.store / "HEAD").read_bytes())


# ----------------------------------------------------------------- compact


def _text(size: int, seed: int) -> bytes:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    text = " ".join(
        rng.choice(words) + str(rng.randrange(1000)) for _ in range(size // 6)
    )
    return text.encode()[:size]


def level_change_chain(base: Path, small: Path) -> Chain:
    """Text stored at zstd level 12, then the store's level set to -7.

    Eight 1 MiB files; visit 2 rewrites five, visit 3 adds three, visit 4
    rewrites two.  Compacting with ``--keep-last 3`` carries the live three
    eighths of the base and merges the delta layers of visits 3 and 4,
    compressing again at level -7: it writes far more than the stored sizes
    its up-front estimate is made of, so the estimate passes and the disk
    still fills up midway.
    """
    from deltatar import Store

    chain = Chain(base, small / "store")
    Store.open_or_create(chain.store).configure("level", "12")
    for number in range(8):
        (chain.src / f"t{number}").write_bytes(_text(MIB, seed=number))
    chain.append()
    for number in range(5):
        (chain.src / f"t{number}").write_bytes(_text(MIB, seed=100 + number))
    chain.append()
    for number in range(8, 11):
        (chain.src / f"t{number}").write_bytes(_text(MIB, seed=200 + number))
    chain.append()
    for number in (0, 8):
        (chain.src / f"t{number}").write_bytes(_text(MIB, seed=300 + number))
    chain.append()
    run_cli("config", "--store", chain.store, "level", "-7")
    return chain


def rehearse_compact(chain: Chain) -> tuple[int, int]:
    """What compaction estimates and writes, on a copy on ordinary disk."""
    copy = chain.base / "rehearsal"
    shutil.copytree(chain.store, copy)
    args = ("compact", "--store", copy, "--keep-last", "3", "--json")
    needed = run_json(*args, "--dry-run")["bytes_needed"]
    written = run_json(*args)["bytes_written"]
    shutil.rmtree(copy)
    return needed, written


# Free space left, between what the estimate asks for and what is written.
@pytest.mark.parametrize("share", [0.25, 0.75])
def test_compact_on_full_disk_changes_nothing(tmp_path, small, share) -> None:
    chain = level_change_chain(tmp_path, small)
    needed, written = rehearse_compact(chain)
    assert needed < written, (needed, written)
    head = (chain.store / "HEAD").read_bytes()
    before = leftovers(chain.store), sorted(os.listdir(chain.store / "layers"))
    filler = fill(small, leave=int(needed + share * (written - needed)))

    result = run_cli("compact", "--store", chain.store, "--keep-last", "3", check=False)

    assert_no_space_error(result, chain.store)
    chain.assert_intact(head)
    # A failed compaction deletes what it wrote.
    assert (
        leftovers(chain.store),
        sorted(os.listdir(chain.store / "layers")),
    ) == before
    filler.unlink()
    run_cli("compact", "--store", chain.store, "--keep-last", "3")
    assert leftovers(chain.store) == []
    chain.references[0] = None
    chain.assert_intact((chain.store / "HEAD").read_bytes())


def test_compact_with_one_mib_free_reports_no_space(tmp_path, small) -> None:
    # The store of three visits with about 1 MiB left free.
    chain = br24_chain(tmp_path, small)
    head = (chain.store / "HEAD").read_bytes()
    filler = fill(small, leave=MIB)

    result = run_cli("compact", "--store", chain.store, check=False)

    assert_no_space_error(result, chain.store)
    chain.assert_intact(head)
    filler.unlink()
    run_cli("compact", "--store", chain.store)
    assert leftovers(chain.store) == []
    chain.assert_intact((chain.store / "HEAD").read_bytes())


def test_compact_refuses_up_front_and_says_what_it_needs(tmp_path, small) -> None:
    chain = br24_chain(tmp_path, small)
    # Compaction merges the two delta layers; the base is not rewritten.
    visits = run_json("log", "--store", chain.store, "--json")["visits"]
    stored = sum(v["bytes_stored"] for v in visits[1:])
    head = (chain.store / "HEAD").read_bytes()
    before = sorted(os.listdir(chain.store / "layers"))
    fill(small, leave=MIB)

    result = run_cli("compact", "--store", chain.store, check=False)

    assert result.returncode == 1, describe_run(result, "expected a refusal")
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    figures = [int(n) for n in re.findall(r"\d+", line.replace(str(chain.store), ""))]
    assert "need" in line and figures and max(figures) >= stored, (
        f"the refusal should say how much space compaction needs (>= {stored} "
        f"bytes): {line}"
    )
    # Refused before writing anything: not even a temporary file.
    assert (chain.store / "HEAD").read_bytes() == head
    assert sorted(os.listdir(chain.store / "layers")) == before
    assert leftovers(chain.store) == []


def test_drop_that_carries_nothing_runs_on_a_full_disk(tmp_path) -> None:
    # Appends of 700 kB files fill a 3 MiB filesystem; dropping the old
    # visits carries nothing, so compaction needs only room for manifests.
    with small_filesystem(tmp_path / "tiny", size_mib=3) as tiny:
        chain = Chain(tmp_path, tiny / "store")
        for number in range(1, 6):
            for old in chain.src.iterdir():
                old.unlink()
            chain.add(f"f{number}", 700_000, seed=number)
            result = run_cli("append", chain.src, "--store", chain.store, check=False)
            if result.returncode != 0:
                assert_no_space_error(result, chain.store)
                break
            copy_reference(chain.src, tmp_path / f"ref{number}")
            chain.references.append(tmp_path / f"ref{number}")
        assert result.returncode != 0, "the filesystem never filled up"
        kept = len(chain.references)

        report = run_json(
            "compact", "--store", chain.store, "--keep-last", "1", "--json"
        )

        assert report["bytes_written"] <= report["bytes_needed"], report
        chain.references[: kept - 1] = [None] * (kept - 1)
        chain.assert_intact((chain.store / "HEAD").read_bytes())
        assert leftovers(chain.store) == []


def test_rebase_of_retained_layers_is_refused_up_front(tmp_path, small) -> None:
    # Dropping visit 1 leaves its base retained by visit 2; the rebase of
    # the latest visit copies those bytes, and the estimate must count them.
    chain = Chain(tmp_path, small / "store")
    for number in range(8):
        chain.add(f"big{number}", 2 * MIB, seed=number)
    chain.append()
    chain.add("small", 10, seed=50)
    chain.append()
    chain.add("more", 256 * 1024, seed=51)
    chain.append()
    run_cli("config", "--store", chain.store, "max-delta-percent", "50")
    head = (chain.store / "HEAD").read_bytes()
    before = sorted(os.listdir(chain.store / "layers"))
    fill(small, leave=12 * MIB)

    args = ("compact", "--store", chain.store, "--keep-last", "2")
    result = run_cli(*args, check=False)

    assert_no_space_error(result, chain.store)
    assert "needs about" in result.stderr, result.stderr
    assert "--keep-last" not in result.stderr, result.stderr
    assert (chain.store / "HEAD").read_bytes() == head
    assert sorted(os.listdir(chain.store / "layers")) == before
    assert leftovers(chain.store) == []
    chain.assert_intact(head)


# ------------------------------------------------------------- materialize


def test_materialize_into_full_disk_fails_with_one_line(tmp_path, small) -> None:
    chain = Chain(tmp_path, tmp_path / "store")
    chain.add("a", 8 * MIB, seed=21)
    chain.append()
    fill(small, leave=MIB)
    dest = small / "dest"

    result = run_cli("materialize", "--store", chain.store, dest, check=False)

    assert_no_space_error(result, dest)
    # The half-written tree is removed, so the disk is as full as before.
    assert not dest.exists()
    assert free_bytes(small) >= MIB
