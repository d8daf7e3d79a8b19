"""Several deltatar processes on one store at once.

Writers take the ``flock`` on ``STORE/lock`` and readers a shared one on
``STORE/readers.lock`` (docs/format.md).  These tests start real processes
side by side and check what users see: two appends never interleave, a
writer that times out names the holder, a lock left by a killed process is
no obstacle, and a compaction beside a running materialize never lets it
finish with a wrong tree.  To make the overlap certain rather than
likely, some tests freeze a process with SIGSTOP while it holds a lock.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    Visits,
    assert_same_tree,
    cli_command,
    cli_env,
    copy_reference,
    describe_run,
    run_cli,
    run_json,
)

MIB = 1024 * 1024


def start(*args, **options) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args),
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="surrogateescape",
        **options,
    )


def finish(
    process: subprocess.Popen, timeout: float = 120
) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def random_files(directory: Path, count: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        (directory / f"f{number:02d}").write_bytes(rng.randbytes(size))


def wait_for(condition, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def lock_holder(store: Path) -> dict | None:
    try:
        return json.loads((store / "lock").read_text())
    except (OSError, ValueError):
        return None


def holds_writer_lock(store: Path, pid: int) -> bool:
    holder = lock_holder(store)
    return holder is not None and holder.get("pid") == pid


def visit_numbers(store: Path) -> list[int]:
    return [v["visit"] for v in run_json("log", "--store", store, "--json")["visits"]]


def assert_one_line_error(result: subprocess.CompletedProcess, why: str) -> str:
    assert result.returncode == 1, describe_run(result, why)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltatar: error:"), describe_run(
        result, f"{why}: expected one error line"
    )
    return lines[0]


@pytest.fixture
def stopped():
    """Collects processes frozen with SIGSTOP so that none outlives the test."""
    frozen: list[subprocess.Popen] = []
    yield frozen
    for process in frozen:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()


# ------------------------------------------------------------------ appends


def test_simultaneous_appends_are_serialized(tmp_path: Path) -> None:
    store = tmp_path / "store"
    sources = {name: tmp_path / name for name in ("a", "b")}
    for seed, src in enumerate(sources.values()):
        random_files(src, 10, 2 * MIB, seed)
    run_cli("append", sources["a"], "--store", store, "-m", "a")

    for round_number in range(3):
        runs = {
            name: start("append", src, "--store", store, "-m", name, "--json")
            for name, src in sources.items()
        }
        results = {name: finish(process) for name, process in runs.items()}
        for result in results.values():
            assert result.returncode == 0, describe_run(result, "both appends wait")
        numbers = sorted(json.loads(r.stdout)["visit"] for r in results.values())
        first = 2 + 2 * round_number
        assert numbers == [first, first + 1]

    log = run_json("log", "--store", store, "--json")["visits"]
    assert [v["visit"] for v in log] == list(range(1, 8))
    for record in log:
        dest = tmp_path / f"m{record['visit']}"
        run_cli("materialize", "--store", store, "--visit", str(record["visit"]), dest)
        assert_same_tree(sources[record["message"]], dest)
    assert run_cli("verify", "--store", store, check=False).returncode == 0


def test_second_writer_with_no_wait_names_the_holder(tmp_path: Path, stopped) -> None:
    visits = Visits(tmp_path)
    random_files(visits.src, 10, 2 * MIB, seed=1)
    visits.append()
    random_files(visits.src, 10, 2 * MIB, seed=2)
    head = (visits.store / "HEAD").read_bytes()

    holder = start("append", visits.src, "--store", visits.store)
    stopped.append(holder)
    wait_for(lambda: holds_writer_lock(visits.store, holder.pid), what="the lock")
    holder.send_signal(signal.SIGSTOP)

    for command in (
        ("append", visits.src, "--store", visits.store),
        ("compact", "--store", visits.store),
    ):
        result = run_cli(*command, "--lock-timeout", "0", check=False)
        line = assert_one_line_error(result, "the store is locked")
        assert str(holder.pid) in line and "append" in line, line
        assert (visits.store / "HEAD").read_bytes() == head

    holder.send_signal(signal.SIGCONT)
    assert finish(holder).returncode == 0
    copy_reference(visits.src, tmp_path / "ref2")
    visits.references.append(tmp_path / "ref2")
    assert visit_numbers(visits.store) == [1, 2]
    visits.assert_each_visit_matches_reference()


def test_lock_of_killed_writer_is_recovered(tmp_path: Path) -> None:
    visits = Visits(tmp_path)
    random_files(visits.src, 10, 2 * MIB, seed=3)
    visits.append()
    random_files(visits.src, 10, 2 * MIB, seed=4)

    holder = start("append", visits.src, "--store", visits.store)
    wait_for(lambda: holds_writer_lock(visits.store, holder.pid), what="the lock")
    holder.send_signal(signal.SIGSTOP)
    holder.kill()
    holder.wait()
    assert lock_holder(visits.store)["pid"] == holder.pid  # its identity stays behind

    started = time.monotonic()
    visits.append("--lock-timeout", "5")
    assert time.monotonic() - started < 5, "the dead holder's lock was waited for"
    run_cli("compact", "--store", visits.store, "--lock-timeout", "0")
    visits.assert_each_visit_matches_reference()


# ------------------------------------------------- compact beside a reader


def eight_visits(tmp_path: Path) -> Visits:
    """A chain of eight visits, each rewriting five files."""
    visits = Visits(tmp_path)
    for number in range(8):
        random_files(visits.src, 5, 2 * MIB, seed=100 + number)
        visits.append()
    return visits


@pytest.mark.parametrize("keep_last", [None, 2])
def test_compact_while_materialize_is_frozen(
    tmp_path: Path, stopped, keep_last
) -> None:
    visits = eight_visits(tmp_path)
    dest = tmp_path / "m3"
    reader = start("materialize", "--store", visits.store, "--visit", "3", dest)
    stopped.append(reader)
    # DEST appears once the reader holds the guard and has read its manifest.
    wait_for(lambda: dest.exists(), what="materialize to start")
    reader.send_signal(signal.SIGSTOP)

    options = ("--keep-last", str(keep_last)) if keep_last else ()
    compact = run_cli("compact", "--store", visits.store, *options, check=False)
    reader.send_signal(signal.SIGCONT)
    result = finish(reader)

    assert compact.returncode in (0, 1), describe_run(
        compact, "compact beside a reader"
    )
    if compact.returncode == 1:
        assert_one_line_error(compact, "compact refused")
    if result.returncode == 0:
        assert_same_tree(visits.references[2], dest)
    else:
        assert_one_line_error(result, "materialize beside compact")

    # The next writer may now remove what the reader was still using.
    random_files(visits.src, 1, MIB, seed=200)
    visits.append()
    assert run_cli("verify", "--store", visits.store, check=False).returncode == 0
    kept = visit_numbers(visits.store)
    for visit in kept:
        visits.assert_visit_matches_reference(visit)
    assert json.loads((visits.store / "HEAD").read_bytes())["garbage"] == []


def test_compact_beside_materialize_at_random_moments(tmp_path: Path) -> None:
    # Compaction started at random moments beside a restore: never exit 0 with a wrong tree.
    visits = eight_visits(tmp_path)
    rng = random.Random(26)
    for attempt in range(4):
        dest = tmp_path / f"m3-{attempt}"
        reader = start("materialize", "--store", visits.store, "--visit", "3", dest)
        time.sleep(rng.uniform(0.0, 0.3))
        compact = run_cli("compact", "--store", visits.store, check=False)
        result = finish(reader)
        assert compact.returncode == 0, describe_run(compact, "compact")
        if result.returncode == 0:
            assert_same_tree(visits.references[2], dest)
        else:
            assert_one_line_error(result, "materialize beside compact")
        shutil.rmtree(dest, ignore_errors=True)
    assert run_cli("verify", "--store", visits.store, check=False).returncode == 0


def test_append_and_compact_at_once_both_succeed(tmp_path: Path) -> None:
    visits = eight_visits(tmp_path)
    rng = random.Random(9)
    for attempt in range(3):
        (visits.src / f"late{attempt}").write_bytes(rng.randbytes(MIB))
        copy_reference(visits.src, tmp_path / f"ref-late{attempt}")
        appender = start("append", visits.src, "--store", visits.store, "--json")
        time.sleep(rng.uniform(0.0, 0.2))
        compactor = start("compact", "--store", visits.store)
        appended, compacted = finish(appender), finish(compactor)
        assert appended.returncode == 0, describe_run(appended, "append beside compact")
        assert compacted.returncode == 0, describe_run(
            compacted, "compact beside append"
        )
        assert json.loads(appended.stdout)["visit"] == len(visits.references) + 1
        visits.references.append(tmp_path / f"ref-late{attempt}")

    assert run_cli("verify", "--store", visits.store, check=False).returncode == 0
    assert visit_numbers(visits.store) == list(range(1, len(visits.references) + 1))
    visits.assert_each_visit_matches_reference()
