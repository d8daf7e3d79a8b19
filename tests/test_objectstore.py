"""A store in an S3-compatible bucket, against a real SeaweedFS server.

Each test gets its own prefix in a bucket of a ``weed mini`` started on
loopback for this module (tests/seaweed.py); the restart test (marked slow)
starts its own server so that stopping it disturbs no other test.  Commands run as child
processes with the AWS variables of that server, as a user would run them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import obstore
import pytest
from conftest import (
    REPO_ROOT,
    Visits,
    assert_same_tree,
    cli_command,
    cli_env,
    describe_run,
    run_cli,
    run_json,
    write,
)
from obstore.store import S3Store
from seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedServer

from deltatar import Store
from deltatar.errors import StoreChanged

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    weed = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    weed.start()
    yield weed
    weed.stop()


@pytest.fixture
def s3_env(server, monkeypatch, tmp_path):
    """AWS variables for the test server and a cache of the test's own."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return server


@pytest.fixture
def own_server(monkeypatch, tmp_path):
    """A server of the test's own, which it may stop and start again."""
    server = SeaweedServer(tmp_path / "own-server")
    server.start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        yield server
    finally:
        server.stop()


_prefix_count = 0


def store_url(request) -> str:
    global _prefix_count
    _prefix_count += 1
    return f"s3://{BUCKET}/{request.node.name}-{os.getpid()}-{_prefix_count}"


def raw_store(server: SeaweedServer, url: str) -> S3Store:
    """Direct access to the store's objects, bypassing deltatar."""
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    return S3Store(
        BUCKET,
        prefix=prefix,
        config={"endpoint": server.endpoint, "region": "us-east-1"},
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        client_options={"allow_http": True},
    )


def object_names(server: SeaweedServer, url: str) -> list[str]:
    store = raw_store(server, url)
    return sorted(meta["path"] for batch in obstore.list(store) for meta in batch)


def head_document(server: SeaweedServer, url: str) -> dict:
    data = obstore.get(raw_store(server, url), "HEAD").bytes()
    return json.loads(bytes(data))


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args),
        env=cli_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="surrogateescape",
    )


def finish(process: subprocess.Popen, timeout: float = 180):
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# ------------------------------------------------------------------ round trips


def test_every_visit_round_trips_through_an_object_store(s3_env, tmp_path, request):
    url = store_url(request)
    visits = Visits(tmp_path, store=url)
    src = visits.src
    (src / "docs").mkdir()
    write(src / "docs/readme.txt", b"first words\n" * 100)
    write(src / "big.bin", random_bytes(20 * MIB, 1))
    write(src / "script.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    os.symlink("docs/readme.txt", src / "link")
    visits.append("-m", "base")

    write(src / "docs/readme.txt", b"first words\n" * 100 + b"more words\n")
    write(src / "docs/new.txt", b"a new file\n")
    (src / "script.sh").unlink()
    visits.append()

    big = bytearray((src / "big.bin").read_bytes())
    big[5 * MIB : 5 * MIB + 4096] = random_bytes(4096, 2)
    write(src / "big.bin", bytes(big))
    os.rename(src / "docs/new.txt", src / "renamed.txt")
    visits.append()

    (src / "link").unlink()
    (src / "empty").mkdir()
    visits.append()
    visits.assert_each_visit_matches_reference()

    run_cli("compact", "--store", url, "--keep-last", "3")
    assert [record["visit"] for record in visits.log()] == [2, 3, 4]
    for visit in (2, 3, 4):
        visits.assert_visit_matches_reference(visit)
    run_cli("verify", "--store", url)


def test_endpoint_and_region_options_override_the_environment(
    s3_env, tmp_path, request, monkeypatch
):
    url = store_url(request)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    visits = Visits(tmp_path, store=url)
    write(visits.src / "a.txt", b"a\n")
    options = ("--endpoint-url", s3_env.endpoint, "--region", "us-east-1")
    visits.append(*options)

    unreachable = run_cli("log", "--store", url, check=False)
    assert unreachable.returncode == 1, describe_run(unreachable, "port 9 answered")
    assert unreachable.stderr.startswith(f"deltatar: error: {url}:")
    assert "Traceback" not in unreachable.stderr
    logged = run_json("log", "--store", url, "--json", *options)
    assert [record["visit"] for record in logged["visits"]] == [1]


def test_materialize_elsewhere_with_an_empty_cache_fetches_and_checks(
    s3_env, tmp_path, request
):
    url = store_url(request)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "one.txt", b"one\n" * 1000)
    write(src / "two.bin", random_bytes(3 * MIB, 3))
    run_cli("append", src, "--store", url, env={"XDG_CACHE_HOME": str(tmp_path / "a")})

    other_cache = tmp_path / "b"
    dest = tmp_path / "restored"
    run_cli(
        "materialize", "--store", url, dest,
        cwd=tmp_path, env={"XDG_CACHE_HOME": str(other_cache)},
    )  # fmt: skip
    assert_same_tree(src, dest)
    cached = list((other_cache / "deltatar").rglob("*.json.zst"))
    assert cached and {path.parent.name for path in cached} == {"manifests"}

    for path in cached:
        path.write_bytes(b"not what was stored")
    again = tmp_path / "again"
    run_cli(
        "materialize", "--store", url, again,
        env={"XDG_CACHE_HOME": str(other_cache)},
    )  # fmt: skip
    assert_same_tree(src, again)


def test_cat_reads_only_the_ranges_of_one_file(s3_env, tmp_path, request):
    url = store_url(request)
    src = tmp_path / "src"
    src.mkdir()
    for number in range(12):
        write(src / f"f{number:02d}.bin", random_bytes(2 * MIB, number))
    run_cli("append", src, "--store", url)

    store = Store.open(url)
    fetched: list[tuple[str, int]] = []
    original = store.backend.read

    def counting_read(name, offset=0, length=None):
        data = original(name, offset, length)
        if name.startswith("layers/"):
            fetched.append((name, len(data)))
        return data

    store.backend.read = counting_read
    from deltatar.browse import read_file

    data = b"".join(read_file(store, None, "f05.bin"))
    assert data == (src / "f05.bin").read_bytes()
    layer_bytes = store.read_head().latest().layer_bytes
    assert sum(size for _, size in fetched) < layer_bytes / 4


# ------------------------------------------------------------------- writers


def test_head_commit_refuses_a_writer_that_started_from_an_older_head(
    s3_env, tmp_path, request
):
    url = store_url(request)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.txt", b"a\n")
    run_cli("append", src, "--store", url)

    first, second = Store.open(url), Store.open(url)
    head_one, token_one = first.read_head_with_token()
    head_two, token_two = second.read_head_with_token()
    head_one.next_visit += 1
    first.commit_head(head_one, token_one)
    head_two.next_visit += 5
    with pytest.raises(StoreChanged):
        second.commit_head(head_two, token_two)
    assert Store.open(url).read_head().next_visit == head_one.next_visit


def test_two_writers_at_once_lose_no_visit(s3_env, tmp_path, request):
    url = store_url(request)
    trees = []
    for number in range(2):
        tree = tmp_path / f"src{number}"
        tree.mkdir()
        write(tree / "shared.txt", b"same\n")
        write(tree / f"only{number}.bin", random_bytes(6 * MIB, 10 + number))
        trees.append(tree)
    seed = tmp_path / "seed"
    seed.mkdir()
    run_cli("append", seed, "--store", url)

    runs = [start("append", tree, "--store", url, "--json") for tree in trees]
    results = [finish(run) for run in runs]
    for result in results:
        assert result.returncode == 0 or (
            result.returncode == 1 and "deltatar: error:" in result.stderr
        ), describe_run(result, "a writer failed without a clear error")
    landed = [json.loads(r.stdout)["visit"] for r in results if r.returncode == 0]
    assert landed, "neither writer committed"
    log = run_json("log", "--store", url, "--json")["visits"]
    assert [record["visit"] for record in log] == [1, *sorted(landed)]
    for result, tree in zip(results, trees, strict=True):
        if result.returncode == 0:
            dest = tmp_path / f"check{json.loads(result.stdout)['visit']}"
            visit = str(json.loads(result.stdout)["visit"])
            run_cli("materialize", "--store", url, "--visit", visit, dest)
            assert_same_tree(tree, dest)
    run_cli("verify", "--store", url)


def test_a_held_lock_makes_a_writer_wait_then_name_the_holder(
    s3_env, tmp_path, request
):
    url = store_url(request)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.txt", b"a\n")
    run_cli("append", src, "--store", url)

    store = Store.open(url)
    with store.backend.writer_lock(5, "compact (held by the test)"):
        blocked = run_cli(
            "append", src, "--store", url, "--lock-timeout", "1", check=False
        )
    assert blocked.returncode == 1, describe_run(blocked, "append was not blocked")
    assert "locked by compact (held by the test)" in blocked.stderr
    run_cli("append", src, "--store", url)
    assert len(run_json("log", "--store", url, "--json")["visits"]) == 2


def test_a_live_holder_in_another_pid_namespace_is_not_judged_dead(
    s3_env, tmp_path, request
):
    # Containers sharing a hostname: the holder's pid does not exist in the
    # other namespace, yet the holder runs, so its lease must be waited for.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("this test needs root and unshare(1) to make a pid namespace")
    url = store_url(request)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.txt", b"a\n")
    run_cli("append", src, "--store", url)
    write(src / "b.txt", b"b\n")
    command = ["unshare", "-p", "-f", "--mount-proc"]
    command += cli_command("append", src, "--store", url, "--lock-timeout", "2")

    store = Store.open(url)
    with store.backend.writer_lock(5, "compact (held by the test)"):
        blocked = subprocess.run(
            command, env=cli_env(), capture_output=True, text=True, check=False
        )
        assert blocked.returncode == 1, describe_run(blocked, "the lease was taken")
        assert "locked by compact (held by the test)" in blocked.stderr

    assert len(run_json("log", "--store", url, "--json")["visits"]) == 1
    taken = subprocess.run(command, env=cli_env(), capture_output=True, text=True)
    assert taken.returncode == 0, describe_run(taken, "append after release")
    assert len(run_json("log", "--store", url, "--json")["visits"]) == 2


def _wait_for(condition, process: subprocess.Popen, what: str, limit: float = 120):
    deadline = time.monotonic() + limit
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the writer finished before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_writer_killed_mid_upload_leaves_no_visit_and_next_append_cleans_up(
    s3_env, tmp_path, request
):
    url = store_url(request)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "small.txt", b"small\n")
    run_cli("append", src, "--store", url)
    head_before = head_document(s3_env, url)

    write(src / "huge.bin", random_bytes(40 * MIB, 5))
    writer = start("append", src, "--store", url)
    _wait_for(
        lambda: s3_env.multipart_uploads() > 0, writer, "a multipart upload began"
    )
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert head_document(s3_env, url) == head_before

    # A leftover a crashed writer left whole: a layer no head names.
    leftover = "layers/v000002-0123456789ab.tar.zst"
    obstore.put(raw_store(s3_env, url), leftover, b"half a visit")
    assert run_cli("verify", "--store", url).returncode == 0
    time.sleep(1.1)  # object times have whole seconds; the next lease is newer

    run_cli("append", src, "--store", url)
    assert leftover not in object_names(s3_env, url)
    log = run_json("log", "--store", url, "--json")["visits"]
    assert [record["visit"] for record in log] == [1, 2]
    dest = tmp_path / "dest"
    run_cli("materialize", "--store", url, dest)
    assert_same_tree(src, dest)
    run_cli("verify", "--store", url)


def test_leftovers_younger_than_the_lease_are_kept(s3_env, tmp_path, request):
    url = store_url(request)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.txt", b"a\n")
    run_cli("append", src, "--store", url)

    store = Store.open(url)
    with store.writing("test") as (head, token):
        # An upload of a writer that lost its lease and still runs.
        store.backend.put_bytes("layers/v000002-aaaaaaaaaaaa.tar.zst", b"in flight")
        store.collect_garbage(head, token)
    assert "layers/v000002-aaaaaaaaaaaa.tar.zst" in object_names(s3_env, url)


def test_retired_objects_stay_for_the_grace_period(
    s3_env, tmp_path, request, monkeypatch
):
    url = store_url(request)
    src = tmp_path / "src"
    src.mkdir()
    for number in range(3):
        write(src / f"f{number}.txt", f"version {number}\n".encode() * 50)
        run_cli("append", src, "--store", url)
    first_layer = head_document(s3_env, url)["visits"][0]["layer"]

    run_cli("compact", "--store", url, "--keep-last", "2")
    head = head_document(s3_env, url)
    assert first_layer in head["garbage"]
    assert set(head["garbage_times"]) == set(head["garbage"])
    assert first_layer in object_names(s3_env, url)

    monkeypatch.setenv("DELTATAR_GARBAGE_GRACE", "0")
    write(src / "late.txt", b"late\n")
    run_cli("append", src, "--store", url)
    assert first_layer not in object_names(s3_env, url)
    assert head_document(s3_env, url)["garbage"] == []
    run_cli("verify", "--store", url)


# ------------------------------------------------------------- faults


def test_damaged_objects_are_found_by_verify(s3_env, tmp_path, request):
    url = store_url(request)
    src = tmp_path / "src"
    src.mkdir()
    write(src / "data.bin", random_bytes(5 * MIB, 7))
    write(src / "note.txt", b"note\n" * 100)
    run_cli("append", src, "--store", url)
    run_cli("materialize", "--store", url, tmp_path / "warm-the-cache")
    record = head_document(s3_env, url)["visits"][0]
    raw = raw_store(s3_env, url)

    layer = bytearray(obstore.get(raw, record["layer"]).bytes())
    layer[len(layer) // 2] ^= 0xFF
    obstore.put(raw, record["layer"], bytes(layer))
    damaged = run_cli("verify", "--store", url, check=False)
    assert damaged.returncode == 1, describe_run(damaged, "verify missed the damage")
    assert f"{url}: {record['layer']}" in damaged.stdout + damaged.stderr

    manifest = bytearray(obstore.get(raw, record["manifest"]).bytes())
    manifest[len(manifest) // 2] ^= 0xFF
    obstore.put(raw, record["manifest"], bytes(manifest))
    damaged = run_cli("verify", "--store", url, check=False)
    assert damaged.returncode == 1
    assert "visit 1" in damaged.stdout + damaged.stderr
    assert f"{url}: {record['manifest']}" in damaged.stdout + damaged.stderr


@pytest.mark.slow
def test_server_restarted_mid_append_loses_no_visit(tmp_path, own_server):
    url = f"s3://{BUCKET}/restart"
    src = tmp_path / "src"
    src.mkdir()
    write(src / "first.txt", b"first\n")
    run_cli("append", src, "--store", url)
    reference = tmp_path / "ref1"
    run_cli("materialize", "--store", url, reference)

    write(src / "huge.bin", random_bytes(32 * MIB, 9))
    writer = start("append", src, "--store", url)
    _wait_for(lambda: own_server.multipart_uploads() > 0, writer, "the upload began")
    own_server.stop()
    time.sleep(1)
    own_server.start()
    result = finish(writer)
    assert result.returncode in (0, 1), describe_run(result, "append crashed")
    if result.returncode == 1:
        assert result.stderr.startswith("deltatar: error:"), result.stderr
        assert "Traceback" not in result.stderr
        run_cli("append", src, "--store", url)

    log = run_json("log", "--store", url, "--json")["visits"]
    assert [record["visit"] for record in log] == [1, 2]
    assert_same_tree(reference, _materialized(url, 1, tmp_path / "v1"))
    assert_same_tree(src, _materialized(url, 2, tmp_path / "v2"))
    run_cli("verify", "--store", url)


@pytest.mark.slow
def test_server_down_for_seconds_during_an_append_is_ridden_out(tmp_path, own_server):
    # The server is gone when the append starts and comes back five seconds
    # (plus its start-up) later; every request must be retried for longer
    # than that, so the append succeeds.
    url = f"s3://{BUCKET}/outage"
    src = tmp_path / "src"
    src.mkdir()
    write(src / "first.txt", b"first\n")
    run_cli("append", src, "--store", url)

    write(src / "second.bin", random_bytes(2 * MIB, 11))
    own_server.stop()
    writer = start("append", src, "--store", url)
    time.sleep(5)
    own_server.start()
    result = finish(writer)

    assert result.returncode == 0, describe_run(result, "append gave up")
    log = run_json("log", "--store", url, "--json")["visits"]
    assert [record["visit"] for record in log] == [1, 2]
    assert_same_tree(src, _materialized(url, 2, tmp_path / "v2"))
    run_cli("verify", "--store", url)


def _materialized(url: str, visit: int, dest: Path) -> Path:
    run_cli("materialize", "--store", url, "--visit", str(visit), dest)
    return dest


# ------------------------------------------------------------- usage


@pytest.mark.parametrize("prefix", ["a/../b", "./dot", "/x", "a//b", "a/."])
def test_prefix_with_empty_or_dot_parts_is_one_line(s3_env, tmp_path, prefix):
    url = f"s3://{BUCKET}/{prefix}"
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.txt", b"a\n")
    for command in (("log",), ("append", src)):
        result = run_cli(*command, "--store", url, check=False)
        assert result.returncode in (1, 2), describe_run(result, "accepted")
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, lines
        assert lines[0].startswith(f"deltatar: error: {url}: "), lines[0]


def test_missing_bucket_is_named(s3_env, tmp_path):
    url = "s3://no-such-bucket-here/store"
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.txt", b"a\n")
    result = run_cli("append", src, "--store", url, check=False)
    assert result.returncode == 1, describe_run(result, "append succeeded")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"deltatar: error: {url}: "), lines[0]
    assert "bucket no-such-bucket-here" in lines[0], lines[0]
    assert "failed on  (" not in lines[0]


def test_unknown_scheme_is_a_one_line_error(tmp_path):
    result = run_cli("log", "--store", "ftp://host/store", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "deltatar: error: ftp://host/store: ftp:// stores are not supported; "
        "use a directory or an s3://bucket/prefix URL"
    ]


def test_missing_obstore_says_what_to_install(tmp_path):
    # Python treats a None entry in sys.modules as a module that cannot be
    # imported, which is what a deltatar installed without the extra sees.
    program = (
        "import sys; sys.modules['obstore'] = None; "
        "from deltatar.cli import main; "
        "sys.exit(main(['log', '--store', 's3://bucket/store']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        env=cli_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "deltatar: error: s3://bucket/store: s3:// stores need the obstore "
        "package; install it with: pip install 'deltatar[s3]'"
    ]


def test_a_prefix_holding_other_objects_is_not_made_a_store(s3_env, tmp_path, request):
    url = store_url(request)
    obstore.put(raw_store(s3_env, url), "someone-elses.txt", b"theirs")
    src = tmp_path / "src"
    src.mkdir()
    result = run_cli("append", src, "--store", url, check=False)
    assert result.returncode == 1
    assert "holds objects but no deltatar store" in result.stderr
    assert object_names(s3_env, url) == ["someone-elses.txt"]
