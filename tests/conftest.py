"""Shared helpers for tests that drive the deltatar command line on real trees.

Everything here works on real files under pytest's ``tmp_path``: the command
line runs in a child process exactly as a user would start it, and trees are
compared through ``os.lstat`` with bytes paths so that names which are not
valid UTF-8, symlinks and hardlinks are seen as they are on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Generous: a hung command should fail the test rather than the whole run.
DEFAULT_TIMEOUT = 600

PathArg = str | bytes | os.PathLike


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return an environment that imports deltatar from this checkout.

    ``DELTATAR_STORE`` is removed so that a value set in the developer's shell
    can never send a test's writes to a real store.
    """
    env = {k: v for k, v in os.environ.items() if k != "DELTATAR_STORE"}
    paths = [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def cli_command(*args: PathArg) -> list[str | bytes]:
    """Return the argv that runs ``deltatar`` with ``args``."""
    argv: list[str | bytes] = [sys.executable, "-m", "deltatar"]
    for arg in args:
        argv.append(arg if isinstance(arg, bytes) else os.fspath(arg))
    return argv


def run_cli(
    *args: PathArg,
    check: bool = True,
    cwd: PathArg | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m deltatar *args`` and return the finished process.

    Output is decoded as UTF-8 with ``surrogateescape`` so that stray bytes in
    file names survive into the strings a test inspects.  With ``check`` a
    non-zero exit fails the test and shows the command with both streams.
    """
    argv = cli_command(*args)
    result = subprocess.run(
        argv,
        check=False,
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        encoding="utf-8",
        errors="surrogateescape",
        timeout=timeout,
    )

    if check and result.returncode != 0:
        raise AssertionError(describe_run(result, "expected exit status 0"))
    return result


def describe_run(result: subprocess.CompletedProcess[str], why: str) -> str:
    """Render a finished command for an assertion message."""
    shown = " ".join(
        os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in result.args[1:]
    )
    return (
        f"{why}\n$ python {shown}\nexit status: {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n"
        f"--- stderr ---\n{result.stderr[-4000:]}"
    )


def run_json(*args: PathArg, **kwargs) -> dict:
    """Run a command that was given ``--json`` and parse its one object."""
    result = run_cli(*args, **kwargs)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(
            describe_run(result, f"stdout is not JSON: {exc}")
        ) from None


# Run inside a throwaway interpreter so that RUSAGE_CHILDREN sees only the one
# deltatar process and not every child the test session started before it.
_MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
sys.stderr.buffer.write(done.stderr)
sys.stdout.buffer.write(done.stdout)
sys.stdout.buffer.write(b"\\n@@peak_rss_kib=" + str(peak).encode())
sys.exit(done.returncode)
"""


def run_cli_measured(
    *args: PathArg, timeout: float = DEFAULT_TIMEOUT
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run deltatar like :func:`run_cli` (checked) and return its peak RSS in bytes."""
    argv = [sys.executable, "-c", _MEASURE, *cli_command(*args)]
    result = subprocess.run(
        argv,
        check=False,
        env=cli_env(),
        capture_output=True,
        encoding="utf-8",
        errors="surrogateescape",
        timeout=timeout,
    )

    output, _, peak = result.stdout.rpartition("\n@@peak_rss_kib=")
    result.stdout = output
    result.args = argv[2:]
    if result.returncode != 0:
        raise AssertionError(describe_run(result, "expected exit status 0"))
    return result, int(peak) * 1024


def count(value: int | list) -> int:
    """Read a summary field that may be a number or a list of paths."""
    return len(value) if isinstance(value, list) else int(value)


# ---------------------------------------------------------------- tree state


class Entry(NamedTuple):
    """What a visit must restore for one path; ``None`` where it does not apply."""

    kind: str  # "file", "dir", "symlink", "fifo" or "other"
    mode: int  # permission bits incl. setuid/setgid/sticky
    size: int | None
    mtime_ns: int
    target: bytes | None  # symlink target exactly as readlink returns it
    sha256: str | None
    link_group: bytes | None  # first path (sorted) of its hardlink group


def _kind(st: os.stat_result) -> str:
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if stat.S_ISFIFO(st.st_mode):
        return "fifo"
    return "other"


def _sha256(path: bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _excluded(rel: bytes, exclude: set[bytes]) -> bool:
    return any(rel == e or rel.startswith(e + b"/") for e in exclude)


def _walk(root: bytes, exclude: set[bytes]) -> Iterable[tuple[bytes, bytes]]:
    """Yield (relative path, absolute path) for every entry below ``root``."""
    pending = [b""]
    while pending:
        rel_dir = pending.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        with os.scandir(abs_dir) as it:
            for dirent in it:
                rel = os.path.join(rel_dir, dirent.name) if rel_dir else dirent.name
                if _excluded(rel, exclude):
                    continue
                yield rel, dirent.path
                if dirent.is_dir(follow_symlinks=False):
                    pending.append(rel)


def tree_state(root: PathArg, exclude: Iterable[PathArg] = ()) -> dict[bytes, Entry]:
    """Capture every entry below ``root`` (not ``root`` itself) by relative path.

    ``exclude`` names relative paths to leave out together with everything
    below them.  Hardlink groups are named by their smallest member so that
    two trees with the same grouping compare equal whatever their inodes are;
    a file whose other names all lie outside the tree has no group.
    """
    skip = {os.fsencode(e).rstrip(b"/") for e in exclude}
    state: dict[bytes, Entry] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}

    for rel, path in _walk(os.fsencode(root), skip):
        st = os.lstat(path)
        kind = _kind(st)
        state[rel] = Entry(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            size=st.st_size if kind == "file" else None,
            mtime_ns=st.st_mtime_ns,
            target=os.readlink(path) if kind == "symlink" else None,
            sha256=_sha256(path) if kind == "file" else None,
            link_group=None,
        )
        if kind == "file" and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)

    for names in inodes.values():
        if len(names) > 1:
            first = min(names)
            for rel in names:
                state[rel] = state[rel]._replace(link_group=first)
    return state


def show(rel: bytes) -> str:
    """Render a relative path for a message, escaping bytes that are not UTF-8."""
    return rel.decode("utf-8", "backslashreplace")


def diff_trees(
    expected: Mapping[bytes, Entry], actual: Mapping[bytes, Entry]
) -> list[str]:
    """List the differences between two captured trees, one line each."""
    lines = []
    for rel in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(rel), actual.get(rel)
        if got is None:
            lines.append(f"missing     {show(rel)} ({want.kind})")
        elif want is None:
            lines.append(f"unexpected  {show(rel)} ({got.kind})")
        else:
            for field in Entry._fields:
                a, b = getattr(want, field), getattr(got, field)
                if a != b:
                    if field == "mode":
                        a, b = oct(a), oct(b)
                    lines.append(f"differs     {show(rel)}: {field} {a!r} -> {b!r}")
    return lines


def assert_same_tree(
    expected: PathArg | Mapping[bytes, Entry],
    actual: PathArg | Mapping[bytes, Entry],
    exclude: Iterable[PathArg] = (),
) -> None:
    """Fail with a readable listing unless both trees hold the same entries.

    Either side may be a directory or a state captured by :func:`tree_state`;
    ``exclude`` applies to sides given as directories.
    """
    exclude = tuple(exclude)
    want = expected if isinstance(expected, Mapping) else tree_state(expected, exclude)
    got = actual if isinstance(actual, Mapping) else tree_state(actual, exclude)

    lines = diff_trees(want, got)
    if lines:
        shown = "\n  ".join(lines[:60])
        more = f"\n  ... and {len(lines) - 60} more" if len(lines) > 60 else ""
        raise AssertionError(
            f"trees differ (expected -> actual), {len(lines)} difference(s):\n"
            f"  {shown}{more}"
        )


# -------------------------------------------------------------- tree copying


def _copy_metadata(src: bytes, dst: bytes, st: os.stat_result) -> None:
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_reference(src: PathArg, dst: PathArg, exclude: Iterable[PathArg] = ()) -> None:
    """Copy ``src`` to the new directory ``dst`` the way ``cp -a`` does.

    Symlinks are copied as links, hardlink groups stay groups, FIFOs are
    re-created, and modes and nanosecond mtimes are kept; directories get
    theirs last, after their contents stopped changing them.
    """
    src_b, dst_b = os.fsencode(src), os.fsencode(dst)
    skip = {os.fsencode(e).rstrip(b"/") for e in exclude}
    first_name: dict[tuple[int, int], bytes] = {}
    directories: list[tuple[bytes, bytes, os.stat_result]] = [
        (src_b, dst_b, os.lstat(src_b))
    ]
    os.mkdir(dst_b)

    for rel, path in _walk(src_b, skip):
        target = os.path.join(dst_b, rel)
        st = os.lstat(path)
        inode = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(target)
            directories.append((path, target, st))
            continue
        if stat.S_ISREG(st.st_mode) and inode in first_name:
            os.link(first_name[inode], target)
            continue
        if stat.S_ISREG(st.st_mode):
            shutil.copyfile(path, target, follow_symlinks=False)
            first_name[inode] = target
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), target)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(target)
        else:
            raise ValueError(f"cannot copy {path!r}: unsupported file type")
        _copy_metadata(path, target, st)

    # Deepest first, so that setting a parent's mtime is the last change to it.
    for path, target, st in reversed(directories):
        _copy_metadata(path, target, st)


# ---------------------------------------------------------------- utilities


def write(path: PathArg, data: bytes, mode: int | None = None, mtime_ns=None) -> None:
    """Write ``data`` to ``path`` and optionally set its mode and mtime."""
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def store_size(store: PathArg) -> int:
    """Sum the sizes of the regular files in ``store``, like ``du -sb``."""
    total = 0
    for _, path in _walk(os.fsencode(store), set()):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def store_plaintext(store: PathArg) -> bytes:
    """Return every byte a store holds, with each zstd frame also decompressed.

    Lets a test look for content that must never have been stored, whatever
    the layout of the files, by searching one byte string.
    """
    import pyzstd

    pieces = []
    for _, path in _walk(os.fsencode(store), set()):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            continue
        with open(path, "rb") as f:
            data = f.read()
        pieces.append(data)
        start = data.find(ZSTD_MAGIC)
        while start != -1:
            try:
                pieces.append(pyzstd.ZstdDecompressor().decompress(data[start:]))
            except pyzstd.ZstdError:
                pass
            start = data.find(ZSTD_MAGIC, start + 1)
    return b"\n".join(pieces)


# -------------------------------------------------------------------- visits


class Visits:
    """A source tree, its store and a ``cp -a`` reference of every visit appended.

    ``append`` records a visit and keeps its reference; the ``assert_*``
    methods materialize visits into fresh directories and compare them with
    the references.  ``exclude`` names paths below the source that belong to
    no visit (a store kept inside the source).
    """

    def __init__(
        self,
        base: Path,
        src: Path | None = None,
        store: PathArg | None = None,
        exclude: Iterable[PathArg] = (),
    ) -> None:
        self.base = base
        self.src = src if src is not None else base / "src"
        self.store = store if store is not None else base / "store"
        self.exclude = tuple(exclude)
        self.references: list[Path] = []
        self.summaries: list[dict] = []
        self._fresh = 0
        self.src.mkdir(parents=True, exist_ok=True)

    def append(self, *options: PathArg, **run_options) -> dict:
        """Append a visit of the source, check its number and keep a reference."""
        summary = run_json(
            "append", self.src, "--store", self.store, "--json", *options, **run_options
        )
        number = len(self.references) + 1
        assert summary["visit"] == number, summary

        reference = self.base / f"ref{number}"
        copy_reference(self.src, reference, exclude=self.exclude)
        self.references.append(reference)
        self.summaries.append(summary)
        return summary

    def fresh_path(self, stem: str) -> Path:
        """Return a path below the test's directory that does not exist yet."""
        self._fresh += 1
        return self.base / f"{stem}-{self._fresh}"

    def materialize(self, visit: int) -> Path:
        """Materialize ``visit`` into a new directory and return it."""
        dest = self.fresh_path(f"m{visit}")
        run_cli("materialize", "--store", self.store, "--visit", str(visit), dest)
        return dest

    def compact(self, *options: PathArg) -> None:
        run_cli("compact", "--store", self.store, *options)

    def log(self) -> list[dict]:
        return run_json("log", "--store", self.store, "--json")["visits"]

    def assert_visit_matches_reference(self, visit: int) -> Path:
        dest = self.materialize(visit)
        assert_same_tree(self.references[visit - 1], dest)
        return dest

    def assert_each_visit_matches_reference(self) -> None:
        for visit in range(1, len(self.references) + 1):
            self.assert_visit_matches_reference(visit)


@pytest.fixture
def visits(tmp_path: Path) -> Visits:
    """A fresh source tree ``tmp_path/src`` with its store at ``tmp_path/store``."""
    return Visits(tmp_path)


# ---------------------------------------------------------- raw manifests


def manifest_document(raw: bytes) -> dict:
    """A manifest's JSON lines (docs/format.md) as one dict with ``entries``."""
    lines = [line for line in raw.split(b"\n") if line]
    document = json.loads(lines[0])
    document["entries"] = [json.loads(line) for line in lines[1:]]
    return document


def manifest_lines(document: dict) -> bytes:
    """The inverse of :func:`manifest_document`, for tests that craft manifests."""
    entries = document["entries"]
    header = dict(
        document, entries=len(entries) if isinstance(entries, list) else entries
    )
    lines = [json.dumps(header)]
    if isinstance(entries, list):
        lines += [json.dumps(entry) for entry in entries]
    return ("\n".join(lines) + "\n").encode()
