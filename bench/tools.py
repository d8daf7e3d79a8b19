"""deltatar and the peers it is measured against, each behind one small interface.

Every tool owns one store directory, outside the tree it records, and is
asked to record the tree once per visit.  The peers are used the way their
manuals suggest for this job, with zstd level 3 wherever a level can be
chosen, so that differences in size come from what each tool stores and not
from a stronger compressor:

- ``full``: a fresh ``tar | zstd -3`` of the whole tree every visit, the
  habit deltatar replaces;
- ``tar-incremental``: GNU tar's ``--listed-incremental`` chain (a level-0
  archive, then one incremental per visit), each piped through ``zstd -3``;
- ``nested-tgz``: the naive habit that motivated deltatar: every visit a
  ``tar | gzip`` of the directory that also holds the earlier archives, so
  each archive contains all the ones before it; stopped at a size cap;
- ``restic``, ``borg``, ``zpaq``: deduplicating archivers, when installed.

Every tool can also restore any visit it recorded, so that restores are
timed and checked the same way for all of them.

A tool whose program is missing is reported as missing with a note; no size
is ever made up for it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .measure import Timed, ToolFailed, disk_bytes, output_of, quote, run, run_shell


class Tool:
    """One archiver with its own store; subclasses say how to call it."""

    name = ""
    programs: tuple[str, ...] = ()
    # The Debian package that provides the programs, for notes and scripts/bench.
    package = ""

    def __init__(self, work: Path) -> None:
        self.store = work / "stores" / self.name
        self.work = work
        self.started = False
        # The last visit recorded; restores of later visits are not possible.
        self.recorded = 0

    def missing(self) -> str | None:
        """Why this tool cannot run here, or None when it can."""
        absent = [program for program in self.programs if shutil.which(program) is None]
        if not absent:
            return None
        return f"{', '.join(absent)} not installed (apt package {self.package})"

    def version(self) -> str:
        raise NotImplementedError

    def append(self, tree: Path, visit: int) -> Timed:
        """Record ``tree`` as ``visit``; the first call also creates the store."""
        if not self.started:
            self.store.mkdir(parents=True, exist_ok=True)
            self.start()
            self.started = True
        timed = self.record(tree, visit)
        self.recorded = visit
        return timed

    def start(self) -> None:
        """Create an empty store; most tools need nothing here."""

    def record(self, tree: Path, visit: int) -> Timed:
        raise NotImplementedError

    def restore(self, visit: int, destination: Path) -> Timed:
        """Recreate ``visit``'s tree in the new directory ``destination``."""
        raise NotImplementedError

    def store_bytes(self) -> int:
        return disk_bytes(self.store)

    def details(self, timed: Timed) -> dict[str, Any]:
        """Tool-specific facts about one append worth keeping in the results."""
        return {}


class Deltatar(Tool):
    name = "deltatar"
    package = "(this repository)"

    def command(self, *arguments: str | Path) -> list[str]:
        return [sys.executable, "-m", "deltatar", *map(str, arguments)]

    def missing(self) -> str | None:
        return None

    def version(self) -> str:
        return output_of(self.command("--version"))

    def record(self, tree: Path, visit: int) -> Timed:
        return run(self.command("append", tree, "--store", self.store, "--json"))

    def restore(self, visit: int, destination: Path) -> Timed:
        return run(
            self.command(
                "materialize", "--store", self.store, "--visit", str(visit), destination
            )
        )

    def details(self, timed: Timed) -> dict[str, Any]:
        # Kept under its own key: deltatar's figures must not overwrite the
        # benchmark's own measurements of the same things.
        try:
            report = json.loads(timed.stdout)
        except ValueError:
            return {"reported": None, "unparsed_stdout": timed.stdout[-2000:]}
        keys = ("bytes_stored", "layer_bytes", "store_bytes", "stored", "seconds")
        return {"reported": {key: report.get(key) for key in keys}}


class FullArchives(Tool):
    name = "full"
    programs = ("tar", "zstd")
    package = "tar zstd"

    def version(self) -> str:
        return _tar_and_zstd_versions()

    def record(self, tree: Path, visit: int) -> Timed:
        target = self.archive(visit)
        return run_shell(
            f"tar -cf - -C {quote(tree)} . | zstd -3 -q -o {quote(target)}"
        )

    def archive(self, visit: int) -> Path:
        return self.store / f"visit_{visit:04d}.tar.zst"

    def restore(self, visit: int, destination: Path) -> Timed:
        # This is also the floor of any restore: one sequential stream.
        return run_shell(
            f"mkdir -p {quote(destination)} && zstd -dc {quote(self.archive(visit))} "
            f"| tar -xf - -C {quote(destination)}"
        )


class NestedTarGz(Tool):
    """Each visit's archive covers the tree and every earlier archive."""

    name = "nested-tgz"
    programs = ("tar", "gzip")
    package = "tar gzip"
    # Archives double in size every visit; stop before they eat the disk.
    CAP_BYTES = 256 * 2**20

    def version(self) -> str:
        tar = output_of(["tar", "--version"]).splitlines()[0]
        gzip = output_of(["gzip", "--version"]).splitlines()[0]
        return f"{tar}; {gzip} (level 6), size cap {self.CAP_BYTES // 2**20} MiB"

    def record(self, tree: Path, visit: int) -> Timed:
        # The next archive holds at least all earlier ones: refuse before
        # writing when that alone would pass the cap.
        if 2 * self.store_bytes() > self.CAP_BYTES:
            raise ToolFailed(
                f"stopped: the next archive would pass the size cap of "
                f"{self.CAP_BYTES // 2**20} MiB"
            )
        self.tree_name = tree.name
        partial = self.work / "nested-tgz.partial"
        timed = run_shell(
            f"tar -cf - -C {quote(tree.parent)} {quote(tree.name)} "
            f"-C {quote(self.store.parent)} {quote(self.store.name)} "
            f"| gzip -6 > {quote(partial)}"
        )
        partial.rename(self.archive(visit))
        return timed

    def archive(self, visit: int) -> Path:
        return self.store / f"visit_{visit:04d}.tgz"

    def restore(self, visit: int, destination: Path) -> Timed:
        # Only the tree's members, not the earlier archives nested inside.
        return run_shell(
            f"mkdir -p {quote(destination)} && tar -xzf {quote(self.archive(visit))} "
            f"-C {quote(destination)} --strip-components=1 {quote(self.tree_name)}"
        )


class TarIncremental(Tool):
    name = "tar-incremental"
    programs = ("tar", "zstd")
    package = "tar zstd"

    def version(self) -> str:
        return _tar_and_zstd_versions()

    def record(self, tree: Path, visit: int) -> Timed:
        # The snapshot file lives in the store and is counted with it: the
        # chain cannot be continued without it.
        listing = self.store / "chain.snar"
        target = self.store / f"visit_{visit:04d}.tar.zst"
        return run_shell(
            f"tar --listed-incremental={quote(listing)} -cf - -C {quote(tree)} . "
            f"| zstd -3 -q -o {quote(target)}"
        )

    def restore(self, visit: int, destination: Path) -> Timed:
        # Every archive of the chain up to the visit, in order; tar's
        # incremental mode deletes what a later listing no longer has.
        steps = [f"mkdir -p {quote(destination)}"]
        for step in range(1, visit + 1):
            archive = self.store / f"visit_{step:04d}.tar.zst"
            steps.append(
                f"zstd -dc {quote(archive)} | tar --listed-incremental=/dev/null "
                f"-xf - -C {quote(destination)}"
            )
        return run_shell(" && ".join(steps))


class Restic(Tool):
    name = "restic"
    programs = ("restic",)
    package = "restic"

    def environment(self) -> dict[str, str]:
        # restic 0.14 has no --insecure-no-password; a fixed password is the
        # documented way to run it unattended.  The cache is kept out of the
        # store so that only the repository is counted.
        return {
            "RESTIC_REPOSITORY": str(self.store),
            "RESTIC_PASSWORD": "deltatar-bench",
            "RESTIC_CACHE_DIR": str(self.work / "cache" / "restic"),
        }

    def version(self) -> str:
        return output_of(["restic", "version"])

    def start(self) -> None:
        run(["restic", "init", "--repository-version", "2"], env=self.environment())

    def record(self, tree: Path, visit: int) -> Timed:
        argv = ["restic", "backup", "--quiet", "--host", "bench"]
        argv += ["--tag", f"visit-{visit}", "."]
        return run(argv, cwd=tree, env=self.environment())

    def restore(self, visit: int, destination: Path) -> Timed:
        argv = ["restic", "restore", "latest", "--tag", f"visit-{visit}"]
        argv += ["--quiet", "--target", destination]
        return run(argv, env=self.environment())


class Borg(Tool):
    name = "borg"
    programs = ("borg",)
    package = "borgbackup"

    def environment(self) -> dict[str, str]:
        # Borg keeps its cache and security files under BORG_BASE_DIR; they
        # are not part of the repository and are not counted.
        return {
            "BORG_BASE_DIR": str(self.work / "cache" / "borg"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        }

    def version(self) -> str:
        return output_of(["borg", "--version"])

    def start(self) -> None:
        run(["borg", "init", "-e", "none", self.store], env=self.environment())

    def record(self, tree: Path, visit: int) -> Timed:
        argv = [
            "borg",
            "create",
            "--compression",
            "zstd,3",
            f"{self.store}::visit-{visit:04d}",
            ".",
        ]
        return run(argv, cwd=tree, env=self.environment())

    def restore(self, visit: int, destination: Path) -> Timed:
        destination.mkdir(parents=True)
        argv = ["borg", "extract", f"{self.store}::visit-{visit:04d}"]
        return run(argv, cwd=destination, env=self.environment())


class Zpaq(Tool):
    name = "zpaq"
    programs = ("zpaq",)
    package = "zpaq"

    def version(self) -> str:
        # zpaq has no version flag; its usage text starts with the version.
        return output_of(["zpaq"]).splitlines()[0]

    def record(self, tree: Path, visit: int) -> Timed:
        return run(["zpaq", "add", self.store / "chain.zpaq", "."], cwd=tree)

    def restore(self, visit: int, destination: Path) -> Timed:
        # zpaq numbers its versions 1, 2, ... in the order they were added.
        archive = self.store / "chain.zpaq"
        argv = ["zpaq", "extract", archive, "-until", str(visit), "-to", destination]
        return run(argv)


PEERS = (FullArchives, NestedTarGz, TarIncremental, Restic, Borg, Zpaq)
ALL_TOOLS = (Deltatar, *PEERS)
TOOL_NAMES = tuple(tool.name for tool in ALL_TOOLS)


def _tar_and_zstd_versions() -> str:
    tar = output_of(["tar", "--version"]).splitlines()[0]
    zstd = output_of(["zstd", "--version"]).splitlines()[0].strip("* ")
    return f"{tar}; {zstd}"
