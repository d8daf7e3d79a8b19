"""Failures found by trying to break deltatar, each kept as a named test."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
from conftest import Visits, assert_same_tree, run_cli, run_json, tree_state

from deltatar import Store

MIB = 1024 * 1024


def test_materialize_into_the_source_resumes_it_and_keeps_the_store(
    tmp_path: Path,
) -> None:
    # Resuming a run: visit 1 restored over the node directory the store lives in.
    visits = Visits(
        tmp_path, store=tmp_path / "src" / "state" / ".dt", exclude=["state"]
    )
    (visits.src / "f").write_text("first\n")
    (visits.src / "state").mkdir()
    visits.append()
    (visits.src / "f").write_text("second\n")
    (visits.src / "extra").write_text("later\n")
    visits.append()

    run_cli(
        "materialize", "--store", visits.store, "--visit", "1", visits.src, "--force"
    )

    assert_same_tree(visits.references[0], visits.src, exclude=["state"])
    assert [v["visit"] for v in visits.log()] == [1, 2]
    assert run_cli("verify", "--store", visits.store).returncode == 0
    run_json("append", visits.src, "--store", visits.store, "--json")


def test_materialize_refuses_a_visit_with_a_path_where_the_store_lies(
    tmp_path: Path,
) -> None:
    visits = Visits(tmp_path)
    (visits.src / "box").mkdir()
    (visits.src / "box" / "store").write_text("a file of the visit\n")
    visits.append()
    dest = tmp_path / "dest"
    shutil.copytree(visits.store, dest / "box" / "store")
    moved = dest / "box" / "store"

    result = run_cli("materialize", "--store", moved, dest, "--force", check=False)

    assert result.returncode == 1
    assert "where the store lies" in result.stderr
    assert [r.visit for r in Store.open(moved).visits()] == [1]


def test_damaged_manifest_never_restores_wrong_metadata(tmp_path: Path) -> None:
    visits = Visits(tmp_path)
    for number in range(30):
        (visits.src / f"f{number}").write_text(f"{number}\n")
    visits.append()
    head = json.loads((visits.store / "HEAD").read_bytes())
    manifest = visits.store / head["visits"][0]["manifest"]
    pristine = manifest.read_bytes()

    for offset in range(12, len(pristine), max(1, len(pristine) // 60)):
        damaged = bytearray(pristine)
        damaged[offset] ^= 0x01
        manifest.write_bytes(damaged)
        dest = visits.fresh_path("m")
        result = run_cli("materialize", "--store", visits.store, dest, check=False)
        if result.returncode == 0:
            assert_same_tree(visits.references[0], dest)
        else:
            assert "Traceback" not in result.stderr
    manifest.write_bytes(pristine)


def test_file_rewritten_in_place_during_append_is_never_stored_torn(
    tmp_path: Path,
) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    names = [src / f"f{n}" for n in range(4)]
    for path in names:
        path.write_bytes(bytes([0]) * (2 * MIB))
    stop = threading.Event()

    def rewrite() -> None:
        # Each rewrite is one write call, so every state on disk is uniform;
        # a stored mix of two values could only come from a torn read.
        value = 0
        while not stop.is_set():
            value = (value + 1) % 250
            for path in names:
                fd = os.open(path, os.O_WRONLY)
                os.pwrite(fd, bytes([value]) * (2 * MIB), 0)
                os.close(fd)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(6):
            run_cli("append", src, "--store", store)
    finally:
        stop.set()
        writer.join()

    opened = Store.open(store)
    for record in opened.visits():
        dest = tmp_path / f"m{record.visit}"
        opened.materialize(record.visit, dest)
        for path in names:
            # A file that never held still is left out with a warning, never torn.
            if (dest / path.name).exists():
                data = (dest / path.name).read_bytes()
                assert len(set(data)) == 1, f"visit {record.visit}: {path.name} is torn"


def test_head_naming_objects_outside_the_store_is_refused(tmp_path: Path) -> None:
    visits = Visits(tmp_path)
    (visits.src / "f").write_text("x\n")
    visits.append()
    victim = tmp_path / "victim"
    victim.write_text("important\n")
    head = json.loads((visits.store / "HEAD").read_bytes())
    head.pop("checksum")
    head["garbage"] = ["../victim"]
    (visits.store / "HEAD").write_text(json.dumps(head))

    result = run_cli("append", visits.src, "--store", visits.store, check=False)

    assert result.returncode == 1
    assert "invalid object" in result.stderr
    assert victim.read_text() == "important\n"


def test_partial_restore_of_a_hardlink_whose_first_name_is_elsewhere(
    tmp_path: Path,
) -> None:
    visits = Visits(tmp_path)
    (visits.src / "a").mkdir()
    (visits.src / "b").mkdir()
    (visits.src / "a" / "f").write_text("hi\n")
    os.link(visits.src / "a" / "f", visits.src / "b" / "g")
    visits.append()

    dest = tmp_path / "out"
    run_cli("materialize", "--store", visits.store, "--path", "b/g", dest)

    assert (dest / "b" / "g").read_text() == "hi\n"


def test_invalid_zstd_archive_in_the_source_is_recorded_not_inspected(visits) -> None:
    (visits.src / "data.tar.zst").write_bytes(b"\x28\xb5\x2f\xfdnot really zstd")
    (visits.src / "other.tar.zst").write_text("not zstd at all\n")

    visits.append()

    visits.assert_each_visit_matches_reference()


@pytest.mark.parametrize(
    "config",
    [{"block_size": 0}, {"level": 99}, {"threads": "2"}, "not json"],
    ids=["zero-block", "level-99", "string", "unparsable"],
)
def test_hand_edited_config_gives_one_line(tmp_path: Path, config) -> None:
    visits = Visits(tmp_path)
    (visits.src / "f").write_text("x\n")
    visits.append()
    text = config if isinstance(config, str) else json.dumps(config)
    (visits.store / "config.json").write_text(text)

    result = run_cli(
        "append", visits.src, "--store", visits.store, check=False, timeout=60
    )

    assert result.returncode == 1
    assert "config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("spec", ["٢", "1_0", "+1", " 1"])
def test_visit_numbers_are_plain_digits(tmp_path: Path, spec: str) -> None:
    visits = Visits(tmp_path)
    for number in range(2):
        (visits.src / "f").write_text(f"{number}\n")
        visits.append()

    result = run_cli("cat", "--store", visits.store, "--visit", spec, "f", check=False)

    assert result.returncode == 1
    assert "no visit has the message" in result.stderr


def test_log_prints_messages_literally(tmp_path: Path) -> None:
    visits = Visits(tmp_path)
    (visits.src / "f").write_text("x\n")
    visits.append("--message", "[bold]rich[/bold]")

    result = run_cli("log", "--store", visits.store)

    assert "[bold]rich[/bold]" in result.stdout


def test_root_directory_mode_and_mtime_are_restored(tmp_path: Path) -> None:
    visits = Visits(tmp_path)
    (visits.src / "f").write_text("x\n")
    os.chmod(visits.src, 0o750)
    os.utime(visits.src, ns=(946684800_123456789, 946684800_123456789))
    visits.append()

    dest = visits.materialize(1)

    assert os.stat(dest).st_mode & 0o7777 == 0o750
    assert os.stat(dest).st_mtime_ns == 946684800_123456789


def test_failed_materialize_leaves_no_partial_tree(tmp_path: Path) -> None:
    visits = Visits(tmp_path)
    (visits.src / "a").write_bytes(random.Random(1).randbytes(MIB))
    (visits.src / "b").write_bytes(random.Random(2).randbytes(MIB))
    visits.append()
    head = json.loads((visits.store / "HEAD").read_bytes())
    layer = visits.store / head["visits"][0]["layer"]
    damaged = bytearray(layer.read_bytes())
    damaged[len(damaged) // 4] ^= 0xFF  # inside the bytes of the first file
    layer.write_bytes(damaged)
    dest = tmp_path / "out"

    result = run_cli("materialize", "--store", visits.store, dest, check=False)

    assert result.returncode == 1
    assert not dest.exists()


def test_failed_append_of_a_missing_source_creates_no_store(tmp_path: Path) -> None:
    result = run_cli(
        "append", tmp_path / "missing", "--store", tmp_path / "s", check=False
    )

    assert result.returncode == 1
    assert not (tmp_path / "s").exists()


def test_stats_never_estimate_archives_larger_than_plain_tar(tmp_path: Path) -> None:
    visits = Visits(tmp_path)
    (visits.src / "tiny").write_text("x")
    visits.append()
    (visits.src / "big").write_bytes(bytes(MIB))
    visits.append()

    total = run_json("stats", "--store", visits.store, "--json")["total"]

    assert total["naive_compressed_estimate"] <= total["naive_full_bytes"]


def test_compaction_keeps_the_visits_it_reports(tmp_path: Path) -> None:
    visits = Visits(tmp_path)
    for number in range(4):
        (visits.src / f"f{number}").write_bytes(random.Random(number).randbytes(50_000))
        visits.append()
    visits.compact("--keep-last", "2")
    shutil.rmtree(visits.src)

    kept = [v["visit"] for v in visits.log()]

    assert kept == [3, 4]
    for visit in kept:
        assert_same_tree(
            tree_state(visits.references[visit - 1]),
            tree_state(visits.materialize(visit)),
        )
