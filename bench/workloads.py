"""Where the benchmark's directory histories come from.

A workload is anything with ``apply_visit(root, visit, rng, scale)``: called
with visits 1, 2, 3, ... and one ``random.Random``, it turns ``root`` into the
state after that visit.  deltatar ships one (``deltatar.simulate``).  Two more
live outside the repository, in ``../shared/workloads`` next to the checkout;
they are loaded by file path because that directory is not a package and may
be absent, in which case the benchmark runs without them and says so.
The real history, ``releases``, is successive sdists of a real project
(``bench.releases``), fetched with pip into a cache on first use.
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .releases import PROJECT, RELEASES, ReleaseHistory

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_WORKLOADS = REPO_ROOT.parent / "shared" / "workloads"
SHARED_NAMES = ("attractor", "generic")

ApplyVisit = Callable[[Path, int, random.Random, float], None]
# The shared generators make single blobs in proportion to the scale and
# random.randbytes stops at 256 MiB, so a larger scale runs as shards.
SHARD_SCALE = 8.0


@dataclass(frozen=True)
class Workload:
    name: str
    origin: str
    apply_visit: ApplyVisit
    # A real history has only so many states; generators have no limit.
    max_visits: int | None = None


def discover(
    cache: Path, releases: tuple[str, ...] = RELEASES
) -> tuple[dict[str, Workload], list[str]]:
    """The workloads that can run, and one note for each that cannot."""
    from deltatar import simulate

    found = {
        "simulate": Workload("simulate", "deltatar.simulate", simulate.apply_visit)
    }
    notes: list[str] = []

    for name in SHARED_NAMES:
        path = SHARED_WORKLOADS / f"{name}.py"
        if not path.is_file():
            notes.append(f"workload {name} skipped: {path} does not exist")
            continue
        module = _load_by_path(name, path)
        found[name] = Workload(name, str(path), Sharded(module.apply_visit))

    history = ReleaseHistory(cache / "releases", releases)
    origin = f"sdists of {PROJECT} {releases[0]} to {releases[-1]} from PyPI"
    found["releases"] = Workload(
        "releases", origin, history.apply_visit, history.max_visits
    )
    return found, notes


class Sharded:
    """A generator scaled past SHARD_SCALE as equal shards in subdirectories.

    Each shard is the generator at an equal share of the scale, in its own
    directory ``shard_NN`` with its own random stream drawn from the
    caller's at visit 1, so one seed still gives one history.  At a scale up
    to SHARD_SCALE the generator runs unchanged at the root.
    """

    def __init__(self, apply_visit: ApplyVisit) -> None:
        self.inner = apply_visit
        self.streams: list[random.Random] = []

    def __call__(self, root: Path, visit: int, rng: random.Random, scale: float):
        if scale <= SHARD_SCALE:
            self.inner(root, visit, rng, scale)
            return
        count = math.ceil(scale / SHARD_SCALE)
        if visit == 1:
            self.streams = [random.Random(rng.getrandbits(64)) for _ in range(count)]
        for index, stream in enumerate(self.streams):
            self.inner(root / f"shard_{index:02d}", visit, stream, scale / count)


def _load_by_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_workload_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load workload {name} from {path}")
    module = importlib.util.module_from_spec(spec)
    # Dataclasses defined in the module look themselves up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
