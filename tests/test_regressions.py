"""Failures found by trying to break deltatar, each kept as a named test."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import (
    Visits,
    assert_same_tree,
    cli_command,
    cli_env,
    run_cli,
    run_json,
    tree_state,
)

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


def test_store_that_lost_its_head_is_refused_not_emptied(tmp_path: Path) -> None:
    # Someone deleted HEAD by hand; the layers of two visits are still there.
    visits = Visits(tmp_path)
    (visits.src / "a").write_text("a\n")
    visits.append()
    (visits.src / "b").write_text("b\n")
    visits.append()
    (visits.store / "HEAD").unlink()
    before = sorted(p.relative_to(visits.store) for p in visits.store.rglob("*"))

    for command in (
        ("verify",),
        ("append", visits.src),
        ("compact", "--keep-last", "1"),
        ("materialize", "--visit", "1", tmp_path / "out"),
    ):
        result = run_cli(*command, "--store", visits.store, check=False)
        assert result.returncode == 1, command
        assert "HEAD" in result.stderr and "missing" in result.stderr
        assert "nothing was changed" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1

    after = sorted(p.relative_to(visits.store) for p in visits.store.rglob("*"))
    assert after == before


def test_forced_materialize_keeps_another_store_inside_the_destination(
    tmp_path: Path,
) -> None:
    # A node directory with its own store, and a subfolder with a store of its
    # own that the node's visits leave out; visit 1 is restored over the node.
    node = tmp_path / "node"
    (node / "sub").mkdir(parents=True)
    (node / "a").write_text("a\n")
    store = node / ".deltatar"
    other = node / "sub" / "other"
    run_cli("append", node, "--store", store, "-q")
    (node / "sub" / "s").write_text("s\n")
    run_cli("append", node / "sub", "--store", other, "-q")
    run_cli("append", node, "--store", store, "-q")

    run_cli("materialize", "--visit", "1", node, "--force", "--store", store)

    assert not (node / "sub" / "s").exists()
    assert run_cli("verify", "--store", other).returncode == 0
    restored = tmp_path / "restored"
    run_cli("materialize", "--store", other, restored)
    assert (restored / "s").read_text() == "s\n"


def test_forced_materialize_refuses_a_file_above_the_store_before_deleting(
    tmp_path: Path,
) -> None:
    # Visit 1 had a file "sub"; now "sub" is a folder holding the store.
    node = tmp_path / "node"
    node.mkdir()
    (node / "sub").write_text("file\n")
    run_cli("append", node, "--store", tmp_path / "st", "-q")
    (node / "sub").unlink()
    (node / "sub").mkdir()
    (node / "other").write_text("keep\n")
    store = node / "sub" / ".deltatar"
    (tmp_path / "st").rename(store)

    result = run_cli(
        "materialize", "--visit", "1", node, "--force", "--store", store, check=False
    )

    assert result.returncode == 1
    assert "'sub'" in result.stderr and "Traceback" not in result.stderr
    assert (node / "other").read_text() == "keep\n"
    assert [r.visit for r in Store.open(store).visits()] == [1]


@pytest.mark.parametrize("where", ["below a file", "under /proc"])
def test_materialize_into_an_impossible_destination_gives_one_line(
    tmp_path: Path, where: str
) -> None:
    visits = Visits(tmp_path)
    (visits.src / "f").write_text("f\n")
    visits.append()
    (tmp_path / "afile").write_text("not a folder\n")
    dest = tmp_path / "afile" / "sub" if where == "below a file" else "/proc/dt/x"

    result = run_cli("materialize", "--store", visits.store, dest, check=False)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"deltatar: error: {dest}: cannot create the destination "
        + (
            "(Not a directory)"
            if where == "below a file"
            else "(No such file or directory)"
        )
    ]


def test_pattern_ending_in_a_backslash_is_named_with_its_origin(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a\n")
    store = tmp_path / "st"

    given = run_cli("append", src, "--store", store, "--exclude", "\\", check=False)
    (src / ".deltatarignore").write_text("*.tmp\nfoo\\\n")
    ignored = run_cli("append", src, "--store", store, check=False)
    previewed = run_cli("append", "-n", src, "--store", store, check=False)

    assert given.returncode == ignored.returncode == previewed.returncode == 1
    assert given.stderr.splitlines() == [
        "deltatar: error: --exclude: '\\' is not a valid pattern "
        "(it may not end in a backslash)"
    ]
    for result in (ignored, previewed):
        assert result.stderr.splitlines() == [
            f"deltatar: error: {src / '.deltatarignore'} line 2: 'foo\\' is not a "
            "valid pattern (it may not end in a backslash)"
        ]
    assert not store.exists()


def test_store_given_as_a_dangling_symlink_gives_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a\n")
    link = tmp_path / "st"
    link.symlink_to(tmp_path / "nowhere")

    result = run_cli("append", src, "--store", link, check=False)

    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert f"{link}: is a symlink to {tmp_path / 'nowhere'}" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_dry_run_counts_a_file_turned_hard_link_as_append_does(tmp_path: Path) -> None:
    # "b" held the same bytes as "a"; now it is a hard link to "a".
    visits = Visits(tmp_path)
    (visits.src / "a").write_text("same\n")
    (visits.src / "b").write_text("same\n")
    visits.append()
    (visits.src / "b").unlink()
    os.link(visits.src / "a", visits.src / "b")

    preview = run_json("append", "-n", visits.src, "--store", visits.store, "--json")
    real = visits.append()

    counted = ("added", "changed", "deleted", "metadata_only")
    assert {key: preview[key] for key in counted} == {key: real[key] for key in counted}
    assert real["changed"] == 1
    assert preview["paths"]["metadata_only"] == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("99999999999999999999999", "there is no visit 99999999999999999999999;"),
        ("-99999999999999999999999", "reaches before the oldest kept visit"),
        ("9" * 5000, "there is no visit with a 5000-digit number"),
    ],
)
def test_any_all_digit_visit_is_a_number_however_long(
    tmp_path: Path, spec: str, expected: str
) -> None:
    # A message that is all digits would need msg:, however many digits it has.
    visits = Visits(tmp_path)
    (visits.src / "f").write_text("f\n")
    visits.append("-m", spec)

    result = run_cli("cat", "--store", visits.store, "--visit", spec, "f", check=False)

    assert result.returncode == 1
    assert expected in result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("spelled", ["./d/f", "d//f", "./d//f", "d/f/"])
def test_paths_are_read_the_same_by_cat_ls_diff_and_materialize(
    tmp_path: Path, spelled: str
) -> None:
    visits = Visits(tmp_path)
    (visits.src / "d").mkdir()
    (visits.src / "d" / "f").write_text("one\n")
    visits.append()
    (visits.src / "d" / "f").write_text("two\n")
    visits.append()
    store = ("--store", visits.store)

    cat = run_cli("cat", *store, "--visit", "1", spelled)
    listed = run_json("ls", *store, "--json", spelled)
    changed = run_json("diff", *store, "1", "2", spelled, "--json")
    dest = visits.fresh_path("part")
    run_cli("materialize", *store, "--visit", "1", "--path", spelled, dest)

    assert cat.stdout == "one\n"
    assert [entry["path"] for entry in listed["entries"]] == ["d/f"]
    assert [change["path"] for change in changed["changes"]] == ["d/f"]
    assert (dest / "d" / "f").read_text() == "one\n"


@pytest.mark.parametrize("command", ["cat", "ls"])
def test_reader_closing_the_pipe_early_always_exits_141(
    tmp_path: Path, command: str
) -> None:
    # As `deltatar cat big | head -c 10`: the reader takes a few bytes and goes.
    visits = Visits(tmp_path)
    (visits.src / "big").write_bytes(random.Random(8).randbytes(8 * MIB))
    for number in range(5000):
        (visits.src / f"name-{number:05d}").touch()
    visits.append()
    args = (
        ("--store", visits.store, "big")
        if command == "cat"
        else ("--store", visits.store)
    )

    reader = subprocess.Popen(
        cli_command(command, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(None),
    )
    assert len(reader.stdout.read(10)) == 10
    reader.stdout.close()
    status = reader.wait(timeout=120)

    assert status == 141
    assert b"Traceback" not in reader.stderr.read()


def test_bucket_store_that_lost_its_head_is_refused_not_emptied(tmp_path: Path) -> None:
    # The same loss in a bucket: the head object deleted, the layers left.
    import obstore
    from obstore.store import S3Store
    from seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedServer

    server = SeaweedServer(tmp_path / "seaweed")
    server.start()
    try:
        env = server.env() | {"XDG_CACHE_HOME": str(tmp_path / "cache")}
        url = f"s3://{BUCKET}/headless"
        src = tmp_path / "src"
        src.mkdir()
        for name in ("a", "b"):
            (src / name).write_text(f"{name}\n")
            run_cli("append", src, "--store", url, "-q", env=env)
        raw = S3Store(
            BUCKET,
            prefix="headless",
            config={"endpoint": server.endpoint, "region": "us-east-1"},
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            client_options={"allow_http": True},
        )
        obstore.delete(raw, "HEAD")
        before = sorted(m["path"] for batch in obstore.list(raw) for m in batch)

        for command in (("verify",), ("append", src)):
            result = run_cli(*command, "--store", url, check=False, env=env)
            assert result.returncode == 1, command
            assert "HEAD) is missing" in result.stderr
            assert "nothing was changed" in result.stderr

        after = sorted(m["path"] for batch in obstore.list(raw) for m in batch)
        assert [name for name in after if "/" in name] == [
            name for name in before if "/" in name
        ]
    finally:
        server.stop()


def test_leftovers_of_an_interrupted_first_append_are_tidied(tmp_path: Path) -> None:
    # A new store gets a head with no visits, so what a first append killed
    # before its commit left behind is a leftover, not a store that lost its
    # head: the next append tidies it and records visit 1.
    visits = Visits(tmp_path)
    Store.open_or_create(visits.store)
    leftover = visits.store / "layers" / "v000001-0123456789ab.tar.zst"
    leftover.write_bytes(b"half-written layer")
    (visits.src / "a").write_text("a\n")

    visits.append()

    assert not leftover.exists()
    assert [record.visit for record in Store.open(visits.store).visits()] == [1]
    assert run_cli("verify", "--store", visits.store).returncode == 0
