"""What compaction reads and writes, against the size of the store.

Records a copy of a real tree (the Python standard library by default) as a
base, then visits that each edit a few files and add a small log, and
measures compactions on it: merging the small delta layers (``max-chain``),
dropping old visits (``keep-last``) while the base is still mostly read,
dropping it once most of it has been rewritten, and a new base for the
latest visit (``max-delta-percent``).  Bytes read and written are the
process's ``rchar``/``wchar`` from /proc/self/io around each call, so they
count every byte compaction moved through the kernel, cached or not.

    python -m bench.compact_io [TREE] [--work DIR]
"""

from __future__ import annotations

import argparse
import base64
import random
import shutil
import tempfile
from pathlib import Path

from deltatar import Store
from deltatar.policy import Policy

HOUR = 3600 * 10**9
T0 = 1_767_571_200 * 10**9


def io_counters() -> tuple[int, int]:
    fields = dict(
        line.split(": ") for line in Path("/proc/self/io").read_text().splitlines()
    )
    return int(fields["rchar"]), int(fields["wchar"])


def measured(store: Store, label: str, **options) -> None:
    before_size = store.disk_usage()
    read0, written0 = io_counters()
    report = store.compact(auto=True, **options)
    read1, written1 = io_counters()
    print(
        f"{label:28s} store {before_size / 1e6:8.1f} MB -> "
        f"{store.disk_usage() / 1e6:8.1f} MB  read {(read1 - read0) / 1e6:8.2f} MB  "
        f"written {(written1 - written0) / 1e6:8.2f} MB  ({report['did']}; "
        f"{'; '.join(report['reasons'])})"
    )


def edit_some(
    src: Path, rng: random.Random, share: float, visit: int, new: bool = False
) -> None:
    """Edit a share of the files and write a log.

    An edit reverses the file's lines (stored as a small patch), or with
    ``new`` replaces the file with new text of the same size (stored whole).
    """
    # Regular files only: the copied tree keeps its symlinks, and one may
    # lead out of it (Debian's sitecustomize.py points into /etc).
    files = sorted(
        path for path in src.rglob("*.py") if path.is_file() and not path.is_symlink()
    )
    for path in rng.sample(files, max(1, int(share * len(files)))):
        data = path.read_bytes()
        if new:
            data = base64.b64encode(rng.randbytes(len(data) * 3 // 4 + 1))
        else:
            data = b"".join(reversed(data.splitlines(keepends=True)))
        path.write_bytes(data + b"# visit %d\n" % visit)
    (src / "run.log").write_text(f"visit {visit}\n" * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", nargs="?", default="/usr/lib/python3.11")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="compact-io-"))
    src = work / "src"
    shutil.copytree(
        args.tree, src, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    store = Store.open_or_create(work / "store")
    rng = random.Random(7)

    store.append(src, visit_time_ns=T0)
    for visit in range(2, 13):
        edit_some(src, rng, 0.01, visit)
        store.append(src, visit_time_ns=T0 + visit * HOUR)
    print(
        f"tree {sum(p.stat().st_size for p in src.rglob('*') if p.is_file()) / 1e6:.1f} MB, 12 visits"
    )
    measured(store, "merge (max-chain 4)", policy=Policy(max_chain=4))
    measured(store, "drop 6 visits (keep-last 6)", policy=Policy(keep_last=6))
    for visit in range(13, 17):
        edit_some(src, rng, 0.3, visit, new=True)
        store.append(src, visit_time_ns=T0 + visit * HOUR)
    measured(store, "drop 6 more (keep-last 4)", policy=Policy(keep_last=4))
    for visit in range(17, 20):
        edit_some(src, rng, 0.6, visit, new=True)
        store.append(src, visit_time_ns=T0 + visit * HOUR)
    measured(store, "drop the base (keep-last 2)", policy=Policy(keep_last=2))
    measured(store, "rebase (max-delta-percent 5)", policy=Policy(max_delta_percent=5))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
