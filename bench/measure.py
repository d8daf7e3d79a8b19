"""Running a tool once and measuring it; sizing and comparing directories.

Every number in the results comes through here, so that deltatar and its peers
are timed and sized by exactly the same rules:

- wall seconds from the benchmark's own clock around the whole command;
- CPU seconds from ``getrusage(RUSAGE_CHILDREN)`` before and after, which
  covers every process of a pipeline because each one is waited for;
- peak resident memory from GNU time's ``%M``.  ``ru_maxrss`` of the children
  is a maximum over *all* children so far, useless per step, so without
  ``/usr/bin/time`` the peak is recorded as unknown rather than guessed;
- store size as the sum of the apparent sizes of the regular files below a
  directory (what ``du --apparent-size -b`` would say).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

GNU_TIME = "/usr/bin/time"
TIME_FORMAT = "%M %e %U %S"


class ToolFailed(RuntimeError):
    """A measured command exited non-zero; the message carries its stderr tail."""


@dataclass
class Timed:
    """What one run of a command cost, and what it printed."""

    wall_seconds: float
    user_seconds: float
    system_seconds: float
    peak_rss_kib: int | None
    stdout: str
    stderr: str

    def summary(self) -> dict[str, float | int | None]:
        return {
            "seconds": round(self.wall_seconds, 4),
            "user_seconds": round(self.user_seconds, 4),
            "system_seconds": round(self.system_seconds, 4),
            "peak_rss_kib": self.peak_rss_kib,
        }


def gnu_time_available() -> bool:
    return os.access(GNU_TIME, os.X_OK)


def run(
    argv: Sequence[str | os.PathLike],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Timed:
    """Run ``argv`` to completion and measure it; raise ToolFailed on failure."""
    argv = [os.fspath(part) for part in argv]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        if gnu_time_available():
            argv = [GNU_TIME, "-f", TIME_FORMAT, "-o", report.name, *argv]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(
            argv, cwd=cwd, env=_environment(env), capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = _peak_from_report(report.name) if gnu_time_available() else None

    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-8:]
        raise ToolFailed(
            f"exit {done.returncode}: {' '.join(argv)}\n" + "\n".join(tail)
        )

    return Timed(
        wall_seconds=wall,
        user_seconds=after.ru_utime - before.ru_utime,
        system_seconds=after.ru_stime - before.ru_stime,
        peak_rss_kib=peak,
        stdout=done.stdout,
        stderr=done.stderr,
    )


def run_shell(script: str, cwd: Path | None = None) -> Timed:
    """Run a pipeline under bash with pipefail, so a failing producer is seen."""
    return run(["bash", "-o", "pipefail", "-c", script], cwd=cwd)


def quote(path: Path | str) -> str:
    """Quote a path for the bash pipelines of run_shell."""
    return shlex.quote(str(path))


def output_of(argv: Sequence[str]) -> str:
    """The combined output of a quick, unmeasured command (versions and such)."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip()


def _environment(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    if extra is None:
        return None
    return {**os.environ, **extra}


def _peak_from_report(path: str) -> int | None:
    # GNU time writes "Command exited with non-zero status N" before the
    # numbers when the command fails, so the numbers are on the last line.
    lines = Path(path).read_text().strip().splitlines()
    if not lines:
        return None
    fields = lines[-1].split()
    return int(fields[0]) if fields and fields[0].isdigit() else None


# -- sizes ----------------------------------------------------------------------


def disk_bytes(root: Path) -> int:
    """Apparent size of every regular file below ``root``; symlinks count nothing."""
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


# -- trees ----------------------------------------------------------------------


def copy_tree(source: Path, destination: Path) -> None:
    """Keep an exact copy of a tree (modes, symlinks, mtimes) to check restores."""
    shutil.copytree(source, destination, symlinks=True)


def compare_trees(expected: Path, actual: Path) -> dict[str, list[str]]:
    """Differences between two trees, split into content and mtime problems.

    Content covers paths, entry types, permission bits, symlink targets and
    file bytes: anything there means the restore is wrong.  File mtimes are
    listed apart, because a tool may deliberately round them.
    """
    wanted, found = _listing(expected), _listing(actual)
    problems = [f"missing {path}" for path in sorted(wanted.keys() - found.keys())]
    problems += [f"unexpected {path}" for path in sorted(found.keys() - wanted.keys())]
    mtimes = []
    for path in sorted(wanted.keys() & found.keys()):
        if wanted[path][:-1] != found[path][:-1]:
            problems.append(f"differs {path}")
        elif wanted[path][-1] != found[path][-1]:
            mtimes.append(path)
    return {"content": problems, "mtime": mtimes}


def _listing(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` as (type, mode, target or digest, mtime)."""
    entries: dict[str, tuple] = {}
    for directory, dirnames, names in os.walk(root):
        for name in dirnames + names:
            path = os.path.join(directory, name)
            entries[os.path.relpath(path, root)] = _describe(path)
    return entries


def _describe(path: str) -> tuple:
    info = os.lstat(path)
    kind = stat.S_IFMT(info.st_mode)
    permissions = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        return kind, permissions, os.readlink(path), None
    if stat.S_ISREG(info.st_mode):
        with open(path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        return kind, permissions, digest, info.st_mtime_ns
    # Directory mtimes change whenever an entry is created inside, so a
    # restore can only set them at the very end; they are not compared.
    return kind, permissions, None, None
