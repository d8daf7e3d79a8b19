"""Kill real deltatar processes with SIGKILL and check that no visit is lost.

Each series runs ``python -m deltatar`` on a tree large enough that the
command takes a noticeable fraction of a second, sends SIGKILL after a random
delay within the command's measured running time, and then checks the store
the way a user would find it: ``log`` lists only whole visits, ``verify``
passes, every committed visit materializes identical to the tree that was
appended, and the next writer succeeds without any repair.  After each series
the store must hold nothing but what its head names, so killed runs cannot
make it grow (docs/format.md, *Order of writes*).

The default suite kills about ten processes; the ``slow`` tests kill a few
hundred and assert how many they actually killed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import (
    Entry,
    assert_same_tree,
    cli_command,
    cli_env,
    describe_run,
    run_cli,
    run_json,
    store_size,
    tree_state,
)

MIB = 1024 * 1024
FILES = 20
FILE_SIZE = 2 * MIB
OBJECT_DIRS = ("layers", "manifests", "contents")
# Files a store keeps besides its objects; a few KiB at most.
STORE_FILES = ("deltatar-store.json", "config.json", "HEAD", "lock", "readers.lock")


# ----------------------------------------------------------------- helpers


def fill_tree(src: Path, rng: random.Random, count: int = FILES) -> None:
    """Give ``count`` of the tree's files new random content (creating them)."""
    src.mkdir(parents=True, exist_ok=True)
    names = [f"f{i:02d}" for i in range(FILES)]
    for name in rng.sample(names, count):
        (src / name).write_bytes(rng.randbytes(FILE_SIZE))


def timed_run(*args) -> float:
    """Run a command that must succeed and return how long it took."""
    started = time.monotonic()
    run_cli(*args)
    return time.monotonic() - started


def kill_after(args: tuple, delay: float) -> bool:
    """Start deltatar, SIGKILL it after ``delay`` seconds; True if it was killed.

    A command that finished before the signal counts as not killed.
    """
    process = subprocess.Popen(
        cli_command(*args),
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return process.returncode == -signal.SIGKILL


def log_visits(store: Path) -> list[int]:
    return [
        record["visit"]
        for record in run_json("log", "--store", store, "--json")["visits"]
    ]


def head_document(store: Path) -> dict:
    return json.loads((store / "HEAD").read_bytes())


def head_objects(record: dict) -> list[str]:
    """Every object one visit of the head names (docs/format.md, *Head*)."""
    names = [record["layer"], record["manifest"], record["contents"]]
    names += record.get("retained_layers", [])
    return names + [record["manifest_reference"]] * bool(record["manifest_reference"])


def leftovers(store: Path) -> list[str]:
    """Files of the store that its head does not name (nor lists as garbage)."""
    head = head_document(store)
    named = set(head.get("garbage", []))
    for record in head["visits"]:
        named.update(head_objects(record))
    extra = []
    for kind in OBJECT_DIRS:
        for name in sorted(os.listdir(store / kind)):
            if f"{kind}/{name}" not in named:
                extra.append(f"{kind}/{name}")
    if (store / "tmp").is_dir():
        extra += [f"tmp/{name}" for name in sorted(os.listdir(store / "tmp"))]
    return extra


def named_bytes(store: Path) -> int:
    """Bytes of the objects the head names plus the store's own small files."""
    head = head_document(store)
    named = {name for record in head["visits"] for name in head_objects(record)}
    total = sum((store / name).stat().st_size for name in named)
    total += sum(
        (store / name).stat().st_size for name in STORE_FILES if (store / name).exists()
    )
    return total


def fingerprint(store: Path) -> dict[str, tuple[int, int, int]]:
    """Cheap identity of every file of a store: size, mtime and inode."""
    result = {}
    for directory, _, names in os.walk(store):
        for name in names:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            key = os.path.relpath(path, store)
            result[key] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return result


@dataclass
class Series:
    """One store under attack, the references of its visits and a tally."""

    base: Path
    rng: random.Random
    references: dict[int, dict[bytes, Entry]] = field(default_factory=dict)
    kills: int = 0
    attempts: int = 0
    checks: int = 0
    window: float = 0.0  # narrowed kill window once runs outpace the measure
    _fresh: int = 0

    @property
    def src(self) -> Path:
        return self.base / "src"

    @property
    def store(self) -> Path:
        return self.base / "store"

    def keep_reference(self, visit: int) -> None:
        self.references[visit] = tree_state(self.src)

    def fresh(self, stem: str) -> Path:
        self._fresh += 1
        return self.base / f"{stem}-{self._fresh}"

    def attack(self, args: tuple, longest: float) -> bool:
        """Kill one run of ``args`` at a random point of its running time."""
        self.attempts += 1
        killed = kill_after(args, self.rng.uniform(0.0, self.window or longest))
        self.kills += killed
        if not killed:
            # Later runs of the command can be quicker than the measured one.
            self.window = 0.8 * (self.window or longest)
        return killed

    def assert_visit_restores(self, visit: int, dest: Path | None = None) -> None:
        dest = dest or self.fresh(f"m{visit}")
        run_cli("materialize", "--store", self.store, "--visit", str(visit), dest)
        assert_same_tree(self.references[visit], dest)
        shutil.rmtree(dest)

    def assert_sound(self, expected: list[int], every_visit: bool = True) -> None:
        """The store lists ``expected``, verifies, and restores its visits."""
        self.checks += 1
        assert log_visits(self.store) == expected
        verify = run_cli("verify", "--store", self.store, check=False)
        assert verify.returncode == 0, describe_run(verify, "verify after a kill")
        chosen = expected if every_visit else {expected[-1], self.rng.choice(expected)}
        for visit in sorted(chosen):
            self.assert_visit_restores(visit)


def report(
    request: pytest.FixtureRequest, capsys, tmp_path: Path, series: Series, what: str
) -> None:
    """Show and keep how many processes a test killed, whatever pytest captures."""
    summary = {
        "test": request.node.name,
        "operation": what,
        "kills": series.kills,
        "attempts": series.attempts,
        "checks": series.checks,
    }
    (tmp_path / "kill-summary.json").write_text(json.dumps(summary))
    request.node.user_properties.append(("kills", series.kills))
    with capsys.disabled():
        print(
            f"\n[{request.node.name}] {what}: {series.kills} SIGKILLs in "
            f"{series.attempts} runs, {series.checks} store checks"
        )


# ------------------------------------------------------------------ append


def append_round(series: Series, kills: int, every_visit: bool = True) -> None:
    """Kill appends of a changed tree; whole visits only, no growth."""
    store, src = series.store, series.src
    fill_tree(src, series.rng)
    longest = 1.1 * timed_run("append", src, "--store", store, "-q")
    series.keep_reference(1)
    expected = [1]
    fill_tree(src, series.rng)
    size_before = store_size(store)

    wanted = series.kills + kills
    while series.kills < wanted:
        assert series.attempts < 4 * wanted, (
            "the appends keep finishing before the kill"
        )
        series.attack(("append", src, "--store", store, "-q"), longest)
        visits = log_visits(store)
        if visits == expected + [expected[-1] + 1]:
            # The append committed before the signal arrived.
            expected.append(visits[-1])
            series.keep_reference(visits[-1])
            assert_growth_is_one_visit(store, size_before)
            fill_tree(series.src, series.rng)
            size_before = store_size(store)
        series.assert_sound(expected, every_visit)

    final = run_json("append", src, "--store", store, "--json")
    assert final["visit"] == expected[-1] + 1, final
    expected.append(final["visit"])
    series.keep_reference(final["visit"])
    assert_growth_is_one_visit(store, size_before)
    assert leftovers(store) == []
    series.assert_sound(expected)


def assert_growth_is_one_visit(store: Path, size_before: int) -> None:
    """Size now <= size before the kills + 1.2 x what the last visit stored."""
    last = run_json("log", "--store", store, "--json")["visits"][-1]
    new_bytes = last["bytes_stored"]
    size_now = store_size(store)
    assert size_now <= size_before + 1.2 * new_bytes, (
        f"store grew by {size_now - size_before} bytes for a visit that stored "
        f"{new_bytes}; leftovers: {leftovers(store)}"
    )


def test_kill_during_append_keeps_committed_visits(tmp_path, request, capsys) -> None:
    series = Series(tmp_path, random.Random(2214))
    append_round(series, kills=4)
    report(request, capsys, tmp_path, series, "append")
    assert series.kills == 4


# ----------------------------------------------------------------- compact


def build_chain(series: Series, visits: int) -> list[int]:
    """Append ``visits`` visits: a full tree, then a quarter of it rewritten each time."""
    fill_tree(series.src, series.rng)
    for visit in range(1, visits + 1):
        if visit > 1:
            fill_tree(series.src, series.rng, count=FILES // 4)
        summary = run_json("append", series.src, "--store", series.store, "--json")
        assert summary["visit"] == visit
        series.keep_reference(visit)
    return list(range(1, visits + 1))


def small_append(series: Series, expected: list[int]) -> None:
    """An append after a killed writer must work at once and clean up after it."""
    name = f"small{series.attempts:04d}"
    (series.src / name).write_bytes(series.rng.randbytes(64 * 1024))
    summary = run_json("append", series.src, "--store", series.store, "--json")
    assert summary["visit"] == expected[-1] + 1, summary
    expected.append(summary["visit"])
    series.keep_reference(summary["visit"])
    assert leftovers(series.store) == []


def compact_round(
    series: Series, kills: int, keep_last: int = 3, every_visit: bool = True
) -> None:
    store = series.store
    expected = build_chain(series, visits=keep_last + 1)
    args = ("compact", "--store", store, "-q", "--keep-last", str(keep_last))
    # Measure on a copy so that the attacked store still has work to do.
    rehearsal = series.base / "rehearsal"
    shutil.copytree(store, rehearsal)
    longest = 1.1 * timed_run(
        "compact", "--store", rehearsal, "-q", "--keep-last", str(keep_last)
    )
    shutil.rmtree(rehearsal)

    wanted = series.kills + kills
    while series.kills < wanted:
        assert series.attempts < 4 * wanted, (
            "the compactions keep finishing before the kill"
        )
        series.attack(args, longest)
        visits = log_visits(store)
        assert visits in (expected, expected[-keep_last:]), (
            f"after a killed compact the store lists {visits}; expected {expected} "
            f"or, had it committed, {expected[-keep_last:]}"
        )
        expected = visits
        series.assert_sound(expected, every_visit)
        small_append(series, expected)

    run_cli("compact", "--store", store, "--keep-last", str(keep_last))
    expected = expected[-keep_last:]
    assert leftovers(store) == []
    series.assert_sound(expected)
    small_append(series, expected)
    extra = store_size(store) - named_bytes(store)
    assert extra == 0, f"{extra} bytes not named by the head: {leftovers(store)}"


def test_kill_during_compact_keeps_every_visit(tmp_path, request, capsys) -> None:
    series = Series(tmp_path, random.Random(2415))
    compact_round(series, kills=3)
    report(request, capsys, tmp_path, series, "compact")
    assert series.kills == 3


AUTO_POLICIES = {
    "carry and merge": ("keep-last", "4", "max-chain", "2"),
    "carry and rebase": ("keep-last", "4", "max-delta-percent", "40"),
}


def auto_compact_round(
    series: Series, kills: int, policy: tuple[str, ...], every_visit: bool = True
) -> None:
    """Kill ``compact --auto`` while it drops, carries, merges or rebases."""
    store = series.store
    expected = build_chain(series, visits=6)
    for key, value in zip(policy[::2], policy[1::2], strict=True):
        run_cli("config", "--store", store, key, value)
    args = ("compact", "--auto", "--store", store, "-q")
    rehearsal = series.base / "rehearsal"
    shutil.copytree(store, rehearsal)
    longest = 1.1 * timed_run("compact", "--auto", "--store", rehearsal, "-q")
    shutil.rmtree(rehearsal)

    wanted = series.kills + kills
    while series.kills < wanted:
        assert series.attempts < 4 * wanted, "the compactions keep finishing first"
        series.attack(args, longest)
        visits = log_visits(store)
        assert visits in (expected, expected[-4:]), (
            f"after a killed compact --auto the store lists {visits}; "
            f"expected {expected} or {expected[-4:]}"
        )
        expected = visits
        series.assert_sound(expected, every_visit)
        # One more visit gives the next run a visit to drop again.
        small_append(series, expected)

    run_cli("compact", "--auto", "--store", store)
    expected = expected[-4:]
    assert leftovers(store) == []
    series.assert_sound(expected)
    extra = store_size(store) - named_bytes(store)
    assert extra == 0, f"{extra} bytes not named by the head: {leftovers(store)}"


@pytest.mark.parametrize("name", list(AUTO_POLICIES))
def test_kill_during_auto_compact_keeps_every_visit(
    tmp_path, request, capsys, name
) -> None:
    series = Series(tmp_path, random.Random(2416 + len(name)))
    auto_compact_round(series, kills=2, policy=AUTO_POLICIES[name])
    report(request, capsys, tmp_path, series, f"compact --auto ({name})")
    assert series.kills == 2


# ------------------------------------------------------------- materialize


def materialize_round(series: Series, kills: int) -> None:
    """A killed materialize changes nothing in the store; DEST can be redone."""
    store = series.store
    expected = build_chain(series, visits=3)
    longest = 1.1 * timed_run(
        "materialize", "--store", store, "--visit", "2", series.fresh("rehearsal")
    )
    # Taken after one reader ran, which creates readers.lock once and for all.
    before = fingerprint(store)

    wanted = series.kills + kills
    while series.kills < wanted:
        assert series.attempts < 4 * wanted, (
            "materialize keeps finishing before the kill"
        )
        visit = series.rng.choice(expected)
        dest = series.fresh(f"killed{visit}")
        args = ("materialize", "--store", store, "--visit", str(visit), dest)
        series.attack(args, longest)
        assert fingerprint(store) == before, "a killed materialize changed the store"
        redo_materialize(series, visit, dest)

    series.assert_sound(expected)
    assert fingerprint(store) == before
    small_append(series, expected)


def redo_materialize(series: Series, visit: int, dest: Path) -> None:
    """Without --force a partly written DEST is refused; with it, it is rebuilt."""
    series.checks += 1
    args = ("materialize", "--store", series.store, "--visit", str(visit), dest)
    if dest.exists() and any(dest.iterdir()):
        refused = run_cli(*args, check=False)
        assert refused.returncode == 1, describe_run(refused, "DEST is not empty")
        assert "not empty" in refused.stderr
    run_cli(*args, "--force")
    assert_same_tree(series.references[visit], dest)
    shutil.rmtree(dest)


def test_kill_during_materialize_leaves_store_untouched(
    tmp_path, request, capsys
) -> None:
    series = Series(tmp_path, random.Random(2616))
    materialize_round(series, kills=3)
    report(request, capsys, tmp_path, series, "materialize")
    assert series.kills == 3


# -------------------------------------------------------------------- slow

# Kills per operation, run as rounds on fresh stores so that checks stay cheap.
SLOW_PLAN: dict[str, tuple[int, int]] = {
    "append": (70, 14),
    "compact": (40, 20),
    "materialize": (90, 30),
}


def run_rounds(tmp_path: Path, what: str, seed: int) -> Series:
    total, per_round = SLOW_PLAN[what]
    rounds: dict[str, Callable[[Series, int], None]] = {
        "append": lambda s, n: append_round(s, n, every_visit=False),
        "compact": lambda s, n: compact_round(s, n, every_visit=False),
        "materialize": materialize_round,
    }
    tally = Series(tmp_path, random.Random(seed))
    for number in range(total // per_round):
        series = Series(tmp_path / f"round{number}", random.Random(seed * 100 + number))
        rounds[what](series, per_round)
        tally.kills += series.kills
        tally.attempts += series.attempts
        tally.checks += series.checks
        shutil.rmtree(series.base)
    return tally


@pytest.mark.slow
@pytest.mark.parametrize("what", list(SLOW_PLAN))
def test_many_kills_never_lose_a_visit(tmp_path, request, capsys, what) -> None:
    tally = run_rounds(tmp_path, what, seed=len(what))
    report(request, capsys, tmp_path, tally, what)
    assert tally.kills == SLOW_PLAN[what][0]
