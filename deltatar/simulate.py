"""A made-up but realistic history of one pipeline node's working directory.

deltatar exists because pipelines return to the same step many times and record
its directory after every visit.  To show what that costs, and to give the demo
and the benchmarks something to record, this module replays such a history
without any pipeline: ``apply_visit`` turns a directory into the state it would
have after a given visit.

Layout of the node directory after visit N::

    worktree/src/pkgNN/*.py     many small source files: edited, added,
                                deleted and renamed every visit; now and then
                                a whole package is renamed
    worktree/data/frozen.bin    incompressible, written once, never touched
    worktree/data/model         a symlink to frozen.bin that never changes
    worktree/data/state.bin     binary state, a small region patched per visit
    worktree/assets/*.png       incompressible images, a few added and removed
    worktree/scripts/*.sh       executables; one loses or regains its x bits
    worktree/notes/             one note per visit, and CURRENT.md, a symlink
                                moved to the newest note every visit
    worktree/build/out          swaps between a file and a directory
    worktree/cache/             an empty directory
    logs/run.log, events.jsonl  append-only, a new tail every visit
    stage/                      this visit's outputs; at the start of a visit
                                the previous outputs move to stage/visit_K/

The same seed gives the same paths, bytes, modes and symlink targets on every
machine: every choice comes from the caller's ``rng`` or from sorted listings.
Only mtimes differ.  Entries the simulator did not create (a store kept inside
the node directory, say) are never touched.

At scale 1.0 the first visit writes about 20 MB and each later visit about
2 MB of genuinely new bytes (moved files and exact copies count nothing).
``scale`` multiplies the counts of bulk files and the sizes of blobs and
streams; single source files keep realistic sizes.  Standard library only, so
benchmarks can import it without pulling in the rest of deltatar.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB

FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755

# Counts and sizes at scale 1.0.
PACKAGES = 20
FILES_PER_PACKAGE = 50
FROZEN_SIZE = 7 * MIB
STATE_SIZE = 1 * MIB
STATE_PATCH = 4 * KIB
IMAGES = 10
IMAGE_SIZE = 200 * KIB
SCRIPTS = 4
LOG_START = 1 * MIB
LOG_GROWTH = 200 * KIB
STREAM_SIZE = 1 * MIB
REPORT_SIZE = 60 * KIB
EDITS = 30
NEW_FILES = 40
DELETES = 12

LOG_NAMES = ("run.log", "events.jsonl")

_WORD_TEXT = (
    "add apply attempt batch branch buffer build cache check child client close "
    "commit config context count create cursor data decode delta diff done edge "
    "emit engine entry error event exec fail file filter flush graph handler "
    "hash index input item key limit line load lock loop merge mode model move "
    "name node open output parse patch path plan pool prompt queue read record "
    "reply reset result retry route run scan send shell size source span stage "
    "state status step stream sum table task test text token tool trace tree "
    "update value verify visit wait walk worker write"
)
_WORDS = _WORD_TEXT.split()


def apply_visit(root: Path, visit: int, rng: random.Random, scale: float = 1.0) -> None:
    """Bring ``root`` to the state it has after ``visit``.

    Visit 1 builds the tree in a missing or empty directory; later visits must
    follow in order, 2, 3, ..., with the same ``rng``.
    """
    if visit < 1:
        raise ValueError(f"visits are numbered from 1, got {visit}")
    root = Path(root)
    worktree = root / "worktree"

    if visit == 1:
        _build_worktree(worktree, rng, scale)
    else:
        _retire_stage_outputs(root / "stage", visit - 1)
        _edit_worktree(worktree, visit, rng, scale)

    _write_note(worktree / "notes", visit, rng)
    _grow_logs(root / "logs", visit, rng, scale)
    _write_stage_outputs(root / "stage", visit, rng, scale)


def tree_digest(root: Path, skip: Sequence[str] = (".deltatar",)) -> str:
    """A sha256 over every path, type, mode, symlink target and file content.

    Mtimes are left out on purpose: they are the one thing a seed does not fix.
    Top-level names in ``skip`` are ignored, so a store inside ``root`` does not
    change the digest.
    """
    digest = hashlib.sha256()
    for path in _walk(root, skip):
        info = path.lstat()
        relative = path.relative_to(root).as_posix()
        digest.update(f"{relative}\0{info.st_mode:o}\0".encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        digest.update(b"\n")
    return digest.hexdigest()


def tree_size(root: Path, skip: Sequence[str] = (".deltatar",)) -> int:
    """Bytes in the regular files below ``root``, leaving out ``skip``."""
    return sum(
        path.lstat().st_size
        for path in _walk(root, skip)
        if path.is_file() and not path.is_symlink()
    )


# --------------------------------------------------------------------------
# visit 1


def _build_worktree(worktree: Path, rng: random.Random, scale: float) -> None:
    """Create the source tree, the data files and the fixed odds and ends."""
    for package in range(_scaled(PACKAGES, scale)):
        for module in range(FILES_PER_PACKAGE):
            path = worktree / "src" / f"pkg{package:02d}" / f"mod{module:03d}.py"
            _write(path, _text(rng, _source_size(rng)))

    data = worktree / "data"
    _write(data / "frozen.bin", rng.randbytes(int(FROZEN_SIZE * scale)))
    _write(data / "state.bin", rng.randbytes(int(STATE_SIZE * scale)))
    os.symlink("frozen.bin", data / "model")

    for image in range(_scaled(IMAGES, scale)):
        _write(worktree / "assets" / f"img{image:03d}.png", _image(rng))

    for script in range(SCRIPTS):
        body = "#!/bin/sh\nset -eu\n" + _text(rng, 400)
        _write(worktree / "scripts" / f"step{script}.sh", body, EXEC_MODE)

    _write(worktree / "build" / "out", _text(rng, 2 * KIB))
    _make_dir(worktree / "cache")


# --------------------------------------------------------------------------
# visits 2, 3, ...


def _retire_stage_outputs(stage: Path, previous: int) -> None:
    """Move the previous visit's outputs under ``visit_<previous>/``.

    Pipelines keep each visit's outputs this way, which is why the node
    directory grows by a full set of outputs per visit even though nothing in
    the moved files is new.
    """
    target = stage / f"visit_{previous}"
    _make_dir(target)
    for entry in sorted(stage.iterdir()):
        if not entry.name.startswith("visit_"):
            entry.rename(target / entry.name)


def _edit_worktree(
    worktree: Path, visit: int, rng: random.Random, scale: float
) -> None:
    """One visit's worth of work by whatever agent runs in the node."""
    src = worktree / "src"
    _edit_sources(src, rng, _scaled(EDITS, scale))
    _add_sources(src, visit, rng, _scaled(NEW_FILES, scale))
    _delete_sources(src, rng, _scaled(DELETES, scale))
    _move_one_source(src, visit, rng)

    if visit % 4 == 0:
        _rename_one_package(src, visit, rng)
    if visit % 3 == 0:
        _toggle_exec_bits(worktree / "scripts", rng)
    if visit % 3 == 1:
        _swap_file_and_directory(worktree / "build" / "out", rng)

    _patch_state(worktree / "data" / "state.bin", rng)
    _churn_images(worktree / "assets", visit, rng)


def _edit_sources(src: Path, rng: random.Random, count: int) -> None:
    """Splice new lines into a few files, sometimes dropping old ones."""
    files = _files(src)
    for path in rng.sample(files, min(count, len(files))):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        at = rng.randrange(len(lines) + 1)
        dropped = rng.choice((0, 0, 1, 3))
        new_lines = _text(rng, rng.randint(80, 900)).splitlines(keepends=True)
        lines[at : at + dropped] = new_lines
        path.write_text("".join(lines), encoding="utf-8")


def _add_sources(src: Path, visit: int, rng: random.Random, count: int) -> None:
    packages = _dirs(src)
    if visit % 5 == 0:
        fresh = src / f"feature_v{visit:03d}"
        _make_dir(fresh)
        packages.append(fresh)

    for index in range(count):
        path = rng.choice(packages) / f"new_v{visit:03d}_{index:03d}.py"
        _write(path, _text(rng, _source_size(rng)))


def _delete_sources(src: Path, rng: random.Random, count: int) -> None:
    files = _files(src)
    for path in rng.sample(files, max(0, min(count, len(files) - 1))):
        path.unlink()


def _move_one_source(src: Path, visit: int, rng: random.Random) -> None:
    """Move a file, bytes untouched, into another package under a new name."""
    files = _files(src)
    if files:
        source = rng.choice(files)
        target = rng.choice(_dirs(src)) / f"moved_v{visit:03d}_{source.name}"
        source.rename(target)


def _rename_one_package(src: Path, visit: int, rng: random.Random) -> None:
    package = rng.choice(_dirs(src))
    package.rename(package.with_name(f"{package.name}_r{visit:03d}"))


def _toggle_exec_bits(scripts: Path, rng: random.Random) -> None:
    """A change to the mode alone: same bytes, yet the visit must record it."""
    path = rng.choice(_files(scripts))
    path.chmod(path.stat().st_mode & 0o777 ^ 0o111)


def _swap_file_and_directory(path: Path, rng: random.Random) -> None:
    """Replace a file with a directory of the same name, or the reverse."""
    if path.is_dir():
        shutil.rmtree(path)
        _write(path, _text(rng, 2 * KIB))
    else:
        path.unlink()
        _write(path / "part-0.txt", _text(rng, 1 * KIB))
        _make_dir(path / "pending")


def _patch_state(path: Path, rng: random.Random) -> None:
    """Overwrite a small region in place; the size never changes."""
    size = path.stat().st_size
    patch = rng.randbytes(min(STATE_PATCH, size))
    with open(path, "r+b") as state:
        state.seek(rng.randrange(size - len(patch) + 1))
        state.write(patch)


def _churn_images(assets: Path, visit: int, rng: random.Random) -> None:
    if visit % 2 == 0:
        _write(assets / f"img_v{visit:03d}.png", _image(rng))
    if visit % 5 == 0:
        rng.choice(_files(assets)).unlink()


# --------------------------------------------------------------------------
# every visit


def _write_note(notes: Path, visit: int, rng: random.Random) -> None:
    """Add this visit's note and point CURRENT.md at it."""
    name = f"visit_{visit:03d}.md"
    _write(notes / name, f"# Visit {visit}\n\n" + _text(rng, 3 * KIB))

    current = notes / "CURRENT.md"
    if current.is_symlink():
        current.unlink()
    os.symlink(name, current)


def _grow_logs(logs: Path, visit: int, rng: random.Random, scale: float) -> None:
    """Append a tail to each log; the first visit writes a longer head."""
    _make_dir(logs)
    for name in LOG_NAMES:
        size = LOG_START if visit == 1 else LOG_GROWTH
        size = int(size * scale * rng.uniform(0.7, 1.3))
        path = logs / name
        with open(path, "a", encoding="utf-8") as log:
            log.write(_log_lines(rng, name, visit, size))
        path.chmod(FILE_MODE)


def _write_stage_outputs(
    stage: Path, visit: int, rng: random.Random, scale: float
) -> None:
    """The files a node leaves behind, including a byte-for-byte copy.

    ``events.ndjson`` repeats ``stdout.log`` exactly, as agent runners often
    do; a store that keys content by hash keeps those bytes once.
    """
    size = int(STREAM_SIZE * scale * rng.uniform(0.7, 1.3))
    stream = _log_lines(rng, "stdout.jsonl", visit, size)
    _write(stage / "stdout.log", stream)
    _write(stage / "events.ndjson", stream)

    report = f"# Report for visit {visit}\n\n" + _text(rng, int(REPORT_SIZE * scale))
    _write(stage / "report.md", report)
    status = {"visit": visit, "outcome": rng.choice(("success", "retry", "fail"))}
    _write(stage / "status.json", json.dumps(status, indent=2) + "\n")
    _make_dir(stage / "tmp")


# --------------------------------------------------------------------------
# content


def _text(rng: random.Random, size: int) -> str:
    """Code-like lines of about ``size`` bytes; compresses three to four times."""
    words = rng.choices(_WORDS, k=max(1, size // 6))
    lines = []
    start = 0
    while start < len(words):
        count = rng.randint(2, 10)
        indent = "    " * rng.randint(0, 3)
        lines.append(indent + " ".join(words[start : start + count]) + "\n")
        start += count
    return "".join(lines)


def _log_lines(rng: random.Random, name: str, visit: int, size: int) -> str:
    """Timestamped records of about ``size`` bytes; JSON for ``*.jsonl``."""
    lines = []
    produced = 0
    clock = visit * 86_400_000
    while produced < size:
        clock += rng.randint(1, 5000)
        seconds, millis = divmod(clock, 1000)
        message = " ".join(rng.choices(_WORDS, k=rng.randint(3, 8)))
        if name.endswith(".jsonl"):
            record = {"t": seconds, "ms": millis, "visit": visit, "msg": message}
            line = json.dumps(record) + "\n"
        else:
            level = rng.choice(("INFO", "INFO", "DEBUG", "WARN"))
            line = f"{seconds}.{millis:03d} {level} {message} id={rng.getrandbits(32):08x}\n"
        lines.append(line)
        produced += len(line)
    return "".join(lines)


def _image(rng: random.Random) -> bytes:
    size = int(IMAGE_SIZE * rng.uniform(0.5, 1.5))
    return b"\x89PNG\r\n\x1a\n" + rng.randbytes(size)


def _source_size(rng: random.Random) -> int:
    """Mostly a few KiB with a long tail, about 5 KiB on average."""
    return int(min(64 * KIB, max(200, rng.lognormvariate(8.2, 0.8))))


# --------------------------------------------------------------------------
# helpers


def _scaled(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def _files(directory: Path) -> list[Path]:
    """Regular files below ``directory``, sorted so that picks repeat."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file() and not path.is_symlink()
    )


def _dirs(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.is_dir())


def _walk(root: Path, skip: Sequence[str]) -> Iterator[Path]:
    """Every entry below ``root`` in sorted order, not following symlinks."""
    for path in sorted(root.iterdir()):
        if path.parent == root and path.name in skip:
            continue
        yield path
        if path.is_dir() and not path.is_symlink():
            yield from _walk(path, ())


def _make_dir(path: Path) -> None:
    """Create ``path`` and its parents with a fixed mode, whatever the umask."""
    missing = [path, *path.parents]
    missing = [directory for directory in missing if not directory.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(DIR_MODE)


def _write(path: Path, content: str | bytes, mode: int = FILE_MODE) -> None:
    _make_dir(path.parent)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    path.chmod(mode)


# --------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """Apply visits 1..N to ROOT and print the size after each and a digest."""
    parser = argparse.ArgumentParser(
        prog="python -m deltatar.simulate",
        description="Replay a simulated pipeline node history into ROOT.",
    )
    parser.add_argument("root", type=Path, help="node directory to build or extend")
    parser.add_argument("--visits", type=int, default=10, help="number of visits")
    parser.add_argument("--scale", type=float, default=1.0, help="size multiplier")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    for visit in range(1, args.visits + 1):
        apply_visit(args.root, visit, rng, args.scale)
        print(f"visit {visit:4d}  {tree_size(args.root) / MIB:10.2f} MiB")

    print(f"digest {tree_digest(args.root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
