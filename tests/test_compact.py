"""Compaction by policy: retention rules, --auto, merges, rebases and their I/O.

Visits get chosen times through the API (``append(visit_time_ns=...)``), so
every retention rule is checked on a real store without touching the clock.
Policies are set and compactions run through the real command line; every
kept visit must still materialize identical to the tree that was appended,
and the bytes compaction writes are measured from the store's own files.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from conftest import (
    assert_same_tree,
    cli_command,
    cli_env,
    run_cli,
    run_json,
    tree_state,
)

from deltatar import Store
from deltatar.backend import LocalBackend

HOUR = 3600 * 10**9
DAY = 24 * HOUR
# 2026-01-05 00:00 UTC, a Monday, so weeks and days start at round numbers.
T0 = 1_767_571_200 * 10**9
KIB = 1024


class TimedStore:
    """A store whose visits are appended at chosen times, with references."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.src = base / "src"
        self.src.mkdir()
        self.path = base / "store"
        self.store = Store.open_or_create(self.path)
        self.references: dict[int, dict] = {}
        self.counter = 0

    def append(self, time_ns: int, files: dict[str, bytes] | None = None) -> int:
        self.counter += 1
        changes = files or {f"note{self.counter % 3}": f"{self.counter}\n".encode()}
        for name, data in changes.items():
            path = self.src / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        record = self.store.append(self.src, visit_time_ns=time_ns)
        self.references[record.visit] = tree_state(self.src)
        return record.visit

    def config(self, *pairs: str) -> None:
        for key, value in zip(pairs[::2], pairs[1::2], strict=True):
            run_cli("config", "--store", self.path, key, value)

    def compact(self, *options: str) -> dict:
        return run_json("compact", "--store", self.path, "--json", *options)

    def kept(self) -> list[int]:
        log = run_json("log", "--store", self.path, "--json")
        return [record["visit"] for record in log["visits"]]

    def assert_kept_round_trip(self) -> None:
        for visit in self.kept():
            dest = self.base / f"out-{visit}-{len(list(self.base.iterdir()))}"
            run_cli("materialize", "--store", self.path, "--visit", str(visit), dest)
            assert_same_tree(self.references[visit], tree_state(dest))
        verify = run_cli("verify", "--store", self.path, check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.fixture
def timed(tmp_path: Path) -> TimedStore:
    return TimedStore(tmp_path)


def head_of(store: Path) -> dict:
    return json.loads((store / "HEAD").read_bytes())


def object_files(store: Path) -> dict[str, int]:
    return {
        str(path.relative_to(store)): path.stat().st_size
        for kind in ("layers", "manifests", "contents")
        for path in (store / kind).iterdir()
    }


def fingerprint(store: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(store)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in store.rglob("*")
        if path.is_file() and path.name not in ("lock", "readers.lock")
    }


# ------------------------------------------------------------ policy values


def test_policy_is_set_and_shown_through_config(timed: TimedStore) -> None:
    timed.append(T0)
    timed.config("keep-daily", "7", "keep-within", "12h", "max-chain", "8")
    shown = run_json("config", "--store", timed.path, "--json")
    assert shown["keep-daily"] == 7
    assert shown["keep-within"] == "12h"
    assert shown["max-chain"] == 8
    assert shown["keep-last"] is None
    text = run_cli("config", "--store", timed.path).stdout
    assert "keep-weekly = none" in text and "keep-daily = 7" in text
    timed.config("keep-daily", "none")
    assert run_json("config", "--store", timed.path, "--json")["keep-daily"] is None
    assert run_json("config", "--store", timed.path, "--json")["level"] == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("keep-within", "3x"),
        ("keep-within", "12"),
        ("keep-within", "h"),
        ("keep-last", "0"),
        ("keep-daily", "seven"),
        ("keep-monthly", "-2"),
        ("max-chain", "0"),
        ("max-delta-percent", "1.5"),
    ],
)
def test_bad_policy_value_is_one_line_naming_key_and_value(
    timed: TimedStore, key: str, value: str
) -> None:
    timed.append(T0)
    timed.config("keep-last", "4")
    before = (timed.path / "config.json").read_bytes()
    result = run_cli("config", "--store", timed.path, key, value, check=False)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and value in lines[0], lines
    assert (timed.path / "config.json").read_bytes() == before


# ------------------------------------------------------------ retention rules


def test_keep_last_keeps_the_latest_visits(timed: TimedStore) -> None:
    for number in range(6):
        timed.append(T0 + number * HOUR)
    timed.config("keep-last", "2")
    report = timed.compact("--auto")
    assert report["dropped"] == [1, 2, 3, 4]
    assert timed.kept() == [5, 6]
    timed.assert_kept_round_trip()


def test_keep_within_counts_back_from_the_latest_visit(timed: TimedStore) -> None:
    for hours in (0, 10, 20, 30, 31):
        timed.append(T0 + hours * HOUR)
    timed.config("keep-within", "11h")
    timed.compact("--auto")
    assert timed.kept() == [3, 4, 5]
    timed.assert_kept_round_trip()


def test_keep_hourly_keeps_the_latest_visit_of_each_hour(timed: TimedStore) -> None:
    for minutes in (10, 50, 80, 100, 125):
        timed.append(T0 + minutes * 60 * 10**9)
    timed.config("keep-hourly", "2")
    timed.compact("--auto")
    assert timed.kept() == [4, 5]
    timed.assert_kept_round_trip()


def test_keep_daily_skips_days_without_visits(timed: TimedStore) -> None:
    times = [T0 + 10 * HOUR, T0 + 20 * HOUR, T0 + DAY + 8 * HOUR]
    times += [T0 + 3 * DAY + 9 * HOUR, T0 + 3 * DAY + 18 * HOUR]
    for time_ns in times:
        timed.append(time_ns)
    timed.config("keep-daily", "3")
    timed.compact("--auto")
    assert timed.kept() == [2, 3, 5]
    timed.assert_kept_round_trip()


def test_keep_weekly_and_monthly_combine(timed: TimedStore) -> None:
    # Jan 5 (week 2), Jan 7 (week 2), Jan 14 (week 3), Feb 2 (week 6), Feb 3.
    for days in (0, 2, 9, 28, 29):
        timed.append(T0 + days * DAY)
    timed.config("keep-weekly", "2", "keep-monthly", "2")
    timed.compact("--auto")
    # weekly: Feb 3 (week 6) and Jan 14 (week 3); monthly: Feb 3 and Jan 14.
    assert timed.kept() == [3, 5]
    timed.config("keep-weekly", "3")
    timed.compact("--auto")
    assert timed.kept() == [3, 5]
    timed.assert_kept_round_trip()


def test_empty_policy_keeps_every_visit_and_auto_does_nothing(
    timed: TimedStore,
) -> None:
    for number in range(4):
        timed.append(T0 + number * DAY)
    before = fingerprint(timed.path)
    result = run_cli("compact", "--auto", "--store", timed.path)
    assert result.stdout.strip() == "nothing due"
    assert fingerprint(timed.path) == before
    assert timed.kept() == [1, 2, 3, 4]


def test_latest_visit_is_kept_whatever_the_rules(timed: TimedStore) -> None:
    timed.append(T0)
    timed.append(T0 + 100 * DAY)
    timed.config("keep-within", "1s", "keep-hourly", "1")
    timed.compact("--auto")
    assert timed.kept() == [2]
    timed.assert_kept_round_trip()


def test_keep_last_option_replaces_the_policy_rules(timed: TimedStore) -> None:
    for number in range(5):
        timed.append(T0 + number * DAY)
    timed.config("keep-daily", "5")
    run_cli("compact", "--store", timed.path, "--keep-last", "2")
    assert timed.kept() == [4, 5]


# ------------------------------------------------------------ --auto


def test_auto_with_writer_lock_held_exits_zero_and_changes_nothing(
    timed: TimedStore,
) -> None:
    for number in range(4):
        timed.append(T0 + number * HOUR)
    timed.config("keep-last", "1")
    before = fingerprint(timed.path)
    with LocalBackend(timed.path).writer_lock(1, "append (test)"):
        result = run_cli("compact", "--auto", "--store", timed.path, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("store busy, nothing done"), result.stdout
    assert fingerprint(timed.path) == before
    assert timed.compact("--auto")["dropped"] == [1, 2, 3]


def test_auto_dry_run_says_what_it_would_drop_and_changes_nothing(
    timed: TimedStore,
) -> None:
    for number in range(5):
        timed.append(T0 + number * HOUR)
    timed.config("keep-last", "2")
    before = fingerprint(timed.path)
    result = run_cli("compact", "--auto", "--dry-run", "--store", timed.path)
    line = result.stdout.strip()
    assert line.startswith("would compact: kept visits 4-5; dropped: 1, 2, 3"), line
    assert "frees" in line and "carries about" in line, line
    assert fingerprint(timed.path) == before


def test_auto_is_quiet_with_q_when_nothing_is_due(timed: TimedStore) -> None:
    timed.append(T0)
    result = run_cli("compact", "--auto", "-q", "--store", timed.path)
    assert result.stdout == "" and result.stderr == ""


# ------------------------------------------------------------ merging


def chain_of_small_deltas(timed: TimedStore, deltas: int) -> None:
    big = {f"data/f{i:02d}": hashlib_bytes(i, 64 * KIB) for i in range(32)}
    timed.append(T0, big)
    for number in range(deltas):
        timed.append(T0 + (number + 1) * HOUR, {f"small/s{number}": b"x%d" % number})


def hashlib_bytes(seed: int, size: int) -> bytes:
    """Incompressible, reproducible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d-%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


def test_merging_small_deltas_leaves_the_base_untouched(timed: TimedStore) -> None:
    chain_of_small_deltas(timed, deltas=8)
    base = head_of(timed.path)["visits"][0]["layer"]
    base_digest = hashlib.sha256((timed.path / base).read_bytes()).hexdigest()
    old_layers = {r["layer"] for r in head_of(timed.path)["visits"][1:]}
    merged_bytes = sum((timed.path / name).stat().st_size for name in old_layers)
    before = object_files(timed.path)

    timed.config("max-chain", "4")
    report = timed.compact("--auto")

    head = head_of(timed.path)
    assert head["visits"][0]["layer"] == base
    assert hashlib.sha256((timed.path / base).read_bytes()).hexdigest() == base_digest
    chain = {r["layer"] for r in head["visits"][1:]}
    assert len(chain) <= 2, chain
    written = {n: s for n, s in object_files(timed.path).items() if n not in before}
    layer_bytes = sum(s for n, s in written.items() if n.startswith("layers/"))
    assert 0 < layer_bytes <= merged_bytes, (layer_bytes, merged_bytes)
    assert report["bytes_written"] == sum(written.values())
    assert report["bytes_written"] < (timed.path / base).stat().st_size / 4
    timed.assert_kept_round_trip()
    assert timed.compact("--auto")["did"] == "nothing due"


# ------------------------------------------------------------ dropping


def test_dropping_the_base_keeps_a_mostly_live_layer_without_copying(
    timed: TimedStore,
) -> None:
    chain_of_small_deltas(timed, deltas=3)
    base = head_of(timed.path)["visits"][0]["layer"]
    before = object_files(timed.path)
    timed.config("keep-last", "2")
    report = timed.compact("--auto")
    assert report["dropped"] == [1, 2]
    head = head_of(timed.path)
    assert head["version"] == 2
    assert base in head["visits"][0]["retained_layers"]
    written = {n: s for n, s in object_files(timed.path).items() if n not in before}
    # Only visit 2's small file is carried out of its mostly dead layer.
    layer_bytes = sum(s for n, s in written.items() if n.startswith("layers/"))
    assert layer_bytes < 2 * KIB, written
    timed.assert_kept_round_trip()


def test_dropping_carries_only_the_live_bytes_of_a_mostly_dead_base(
    timed: TimedStore,
) -> None:
    files = {f"data/f{i:02d}": hashlib_bytes(i, 64 * KIB) for i in range(32)}
    timed.append(T0, files)
    # Rewrite 28 of 32 files: an eighth of the base stays live.
    rewritten = {name: hashlib_bytes(100 + i, 64 * KIB) for i, name in enumerate(files)}
    timed.append(T0 + HOUR, dict(list(rewritten.items())[:28]))
    timed.append(T0 + 2 * HOUR)
    base = head_of(timed.path)["visits"][0]["layer"]
    base_bytes = (timed.path / base).stat().st_size
    before = object_files(timed.path)

    timed.config("keep-last", "2")
    preview = timed.compact("--auto", "--dry-run")
    assert object_files(timed.path) == before
    report = timed.compact("--auto")

    written = {n: s for n, s in object_files(timed.path).items() if n not in before}
    carried = sum(s for n, s in written.items() if n.startswith("layers/"))
    removed = {n: s for n, s in before.items() if n not in object_files(timed.path)}
    assert preview["freed_layer_bytes"] == sum(
        s for n, s in removed.items() if n.startswith("layers/")
    )
    assert 0.8 * carried <= preview["carried_bytes"] <= 1.2 * carried
    live = 4 * 64 * KIB
    assert live <= carried <= live * 1.1 + 16 * KIB, (carried, live)
    assert carried < base_bytes / 4
    assert not (timed.path / base).exists()
    assert report["store_bytes_after"] < report["store_bytes_before"]
    timed.assert_kept_round_trip()
    # Dropping the visit that now holds the carried bytes carries them again.
    timed.append(T0 + 3 * HOUR)
    timed.config("keep-last", "1")
    timed.compact("--auto")
    assert timed.kept() == [4]
    timed.assert_kept_round_trip()


def test_head_without_retained_layers_stays_version_1(timed: TimedStore) -> None:
    for number in range(3):
        timed.append(T0 + number * HOUR)
    timed.compact()
    head = head_of(timed.path)
    assert head["version"] == 1
    assert all("retained_layers" not in record for record in head["visits"])


# ------------------------------------------------------------ rebasing


def test_rebase_gives_the_latest_visit_a_base_tar_extracts(
    timed: TimedStore, tmp_path: Path
) -> None:
    timed.append(T0, {f"f{i}": hashlib_bytes(i, 16 * KIB) for i in range(4)})
    timed.append(
        T0 + HOUR, {f"g{i}": hashlib_bytes(50 + i, 16 * KIB) for i in range(4)}
    )
    first_base = head_of(timed.path)["visits"][0]["layer"]
    timed.config("max-delta-percent", "50")
    report = timed.compact("--auto")
    assert report["rebase"] is True
    head = head_of(timed.path)
    assert head["visits"][0]["layer"] == first_base
    latest = head["visits"][-1]
    assert latest["kind"] == "base"
    for layer, visit in ((latest["layer"], 2), (first_base, 1)):
        out = tmp_path / f"tar-{visit}"
        out.mkdir()
        zstd = subprocess.run(
            ["zstd", "-dc", str(timed.path / layer)], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(out)], input=zstd.stdout, check=True)
        assert_same_tree(timed.references[visit], tree_state(out))
    timed.assert_kept_round_trip()
    assert timed.compact("--auto")["did"] == "nothing due"


def test_two_auto_compactions_at_once_both_exit_zero(timed: TimedStore) -> None:
    chain_of_small_deltas(timed, deltas=6)
    timed.config("keep-last", "3", "max-chain", "1")
    command = cli_command("compact", "--auto", "--store", timed.path)
    runs = [
        subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    lines = sorted(run.communicate(timeout=120)[0].strip() for run in runs)
    assert [run.returncode for run in runs] == [0, 0], lines
    assert any(line.startswith("compacted") for line in lines), lines
    assert timed.kept() == [5, 6, 7]
    timed.assert_kept_round_trip()


# ------------------------------------------------------------ space estimate


def _drop_with_carry(timed: TimedStore) -> tuple[str, ...]:
    files = {f"data/f{i:02d}": hashlib_bytes(i, 64 * KIB) for i in range(32)}
    timed.append(T0, files)
    rewritten = {name: hashlib_bytes(100 + i, 64 * KIB) for i, name in enumerate(files)}
    timed.append(T0 + HOUR, dict(list(rewritten.items())[:28]))
    timed.append(T0 + 2 * HOUR)
    return ("--keep-last", "2")


def _merge(timed: TimedStore) -> tuple[str, ...]:
    chain_of_small_deltas(timed, deltas=6)
    for number in range(3):
        timed.append(
            T0 + (10 + number) * HOUR, {f"m{number}": hashlib_bytes(number, 96 * KIB)}
        )
    return ()


def _rebase(timed: TimedStore) -> tuple[str, ...]:
    timed.append(T0, {f"f{i}": hashlib_bytes(i, 16 * KIB) for i in range(4)})
    timed.append(
        T0 + HOUR, {f"g{i}": hashlib_bytes(50 + i, 64 * KIB) for i in range(4)}
    )
    timed.config("max-delta-percent", "50")
    return ()


def _rebase_after_drop(timed: TimedStore) -> tuple[str, ...]:
    # The oldest kept visit retains the dropped base, which the rebase copies.
    files = {f"data/f{i:02d}": hashlib_bytes(i, 64 * KIB) for i in range(32)}
    timed.append(T0, files)
    timed.append(T0 + HOUR, {"small": b"x"})
    timed.append(T0 + 2 * HOUR, {"more": hashlib_bytes(7, 8 * KIB)})
    timed.config("max-delta-percent", "50")
    return ("--keep-last", "2")


@pytest.mark.parametrize(
    "make",
    [_drop_with_carry, _merge, _rebase, _rebase_after_drop],
    ids=lambda f: f.__name__,
)
def test_space_estimate_bounds_what_compaction_writes(timed: TimedStore, make) -> None:
    options = make(timed)
    preview = timed.compact("--dry-run", *options)
    report = timed.compact(*options)
    assert report["did"] == "compacted", report
    assert report["bytes_written"] > 0, report
    assert preview["bytes_needed"] >= report["bytes_written"], (preview, report)
    timed.assert_kept_round_trip()


def test_drop_that_carries_nothing_needs_little_space(timed: TimedStore) -> None:
    for number in range(4):
        timed.append(T0 + number * HOUR, {"only": hashlib_bytes(number, 256 * KIB)})
    preview = timed.compact("--dry-run", "--keep-last", "1")
    assert preview["carried_bytes"] == 0, preview
    assert preview["bytes_needed"] < preview["freed_layer_bytes"] / 4, preview
    report = timed.compact("--keep-last", "1")
    assert preview["bytes_needed"] >= report["bytes_written"], (preview, report)
    timed.assert_kept_round_trip()
