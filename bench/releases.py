"""A real history: successive source releases of one open-source project.

The generators imitate a pipeline's directory; this workload is the real
thing, a project's source tree moving from one release to the next the way
a checkout does.  Each release's sdist is downloaded once with pip into a
cache and every visit replaces the tree with the next release, unpacked
without its versioned top-level directory so that unchanged files keep
their paths.  Which releases are used depends on the size: the quick size
takes the last few, the others all of them.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PROJECT = "pip"
RELEASES = (
    "21.3",
    "22.0",
    "22.1",
    "22.2",
    "22.3",
    "23.0",
    "23.1",
    "23.2",
    "23.3",
    "24.0",
    "24.1",
    "24.2",
)


class ReleaseDownloadFailed(RuntimeError):
    """pip could not fetch a release; the message says which one."""


class ReleaseHistory:
    """``apply_visit`` over the cached sdists of ``releases``, in order."""

    def __init__(self, cache: Path, releases: tuple[str, ...] = RELEASES) -> None:
        self.cache = cache
        self.releases = releases

    @property
    def max_visits(self) -> int:
        return len(self.releases)

    def fetch(self) -> list[Path]:
        """Every release's sdist, downloaded into the cache when missing."""
        return [self._sdist(release) for release in self.releases]

    def apply_visit(self, root: Path, visit: int, rng: random.Random, scale: float):
        # rng and scale are part of the workload interface; a real history
        # has neither randomness nor a size knob.
        sdist = self._sdist(self.releases[visit - 1])
        _replace_tree(root, sdist)

    def _sdist(self, release: str) -> Path:
        found = sorted(self.cache.glob(f"{PROJECT}-{release}.tar.gz"))
        if found:
            return found[0]
        self.cache.mkdir(parents=True, exist_ok=True)
        # --no-binary for this project only: the sdist is what we want, while
        # its build requirements may come as wheels, which is much faster.
        command = [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
            *("--disable-pip-version-check", "--no-binary", PROJECT),
            *("-d", str(self.cache), f"{PROJECT}=={release}"),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        found = sorted(self.cache.glob(f"{PROJECT}-{release}.tar.gz"))
        if done.returncode != 0 or not found:
            tail = done.stderr.strip().splitlines()[-1:] or ["no sdist saved"]
            raise ReleaseDownloadFailed(f"{PROJECT}=={release}: {tail[0]}")
        return found[0]


def _replace_tree(root: Path, sdist: Path) -> None:
    """Empty ``root`` and unpack ``sdist`` into it without its top directory."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            _, _, inner = member.name.partition("/")
            if inner:
                member.name = inner
                members.append(member)
        archive.extractall(root, members=members, filter="tar")
