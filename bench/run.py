"""Run the benchmark: replay each workload, record it with every tool, report.

For each workload the tree is rebuilt from visit 1 in a scratch directory.
After each visit the floors (``bench.limits``) and the ideal price are
computed and deltatar and every peer record the tree into their own stores;
one line per visit shows how they compare.  After the last visit deltatar's
start-up is timed and every tool restores the first, a middle and the last
visit.  Everything measured goes to ``results.json``; ``bench.report`` turns
it into ``RESULTS.md`` and the plots.

Three sizes: ``--quick`` (a couple of minutes), the default, and ``--large``
(generic scaled past 200,000 files and several GB, which checks the disk
first).
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as ``python bench/run.py``: make ``bench`` importable as a package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import report
from bench.ideal import IdealTracker
from bench.limits import FloorTracker
from bench.measure import (
    ToolFailed,
    copy_tree,
    disk_bytes,
    gnu_time_available,
    output_of,
    run,
)
from bench.releases import RELEASES, ReleaseDownloadFailed
from bench.restore import measure_restores
from bench.targets import cumulative_ideal, final_numbers, store_after
from bench.tools import ALL_TOOLS, TOOL_NAMES, Deltatar, Tool
from bench.workloads import REPO_ROOT, Workload, discover

BENCH_DIR = REPO_ROOT / "bench"
SIZES = {
    "quick": {"scale": 0.1, "visits": 6, "releases": 4, "ideal": True, "repeats": 1},
    "default": {
        "scale": 1.0,
        "visits": 50,
        "releases": 12,
        "ideal": True,
        "repeats": 3,
    },
    # generic grows by about 1,230 files and 20 MiB per unit of scale, so
    # scale 170 starts near 209,000 files and 3.4 GiB.
    "large": {
        "scale": 170.0,
        "visits": 5,
        "releases": 12,
        "ideal": False,
        "repeats": 1,
    },
}
LARGE_WORKLOADS = ["generic"]
# Bytes of generic's first visit at scale 1, and how many trees' worth of disk
# a run needs at most: the tree, three kept copies, a restore and the
# incremental stores take about nine, and the per-visit full archives about
# one more per visit (a large run of 5 visits peaked at 47 GiB, 14 trees).
GENERIC_BYTES_PER_SCALE = 20 * 2**20
FIXED_TREES = 9


def main(argv: list[str] | None = None) -> int:
    options = _parse(argv)
    if options.report_only:
        results = json.loads((options.out / "results.json").read_text())
        for name, data in results["workloads"].items():
            data.setdefault("name", name)
            # Judged again, so a change to the targets shows without a rerun.
            data["final"] = final_numbers(data, list(results["tools"]))
        report.write(results, options.report)
        print(f"report: {options.report} (from {options.out / 'results.json'})")
        return 0

    _compile_package()
    workloads, notes = discover(options.cache, RELEASES[-options.releases :])
    chosen = _choose(workloads, options.workload, notes)
    tools = _tool_table(options.tool, notes)
    for note in notes:
        print(f"note: {note}", flush=True)
    if not chosen:
        print("nothing to run: no workload was available", file=sys.stderr)
        return 2

    problem = _disk_problem(options, chosen)
    if problem:
        print(problem, file=sys.stderr)
        return 1

    results = _header(options, tools, notes)
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix="deltatar-bench-", dir=options.scratch
    ) as work:
        for workload in chosen:
            scratch = Path(work) / workload.name
            try:
                data = _run_workload(workload, options, tools, scratch)
            except ReleaseDownloadFailed as error:
                results["notes"].append(f"workload {workload.name} skipped: {error}")
                print(f"note: {results['notes'][-1]}", flush=True)
                continue
            results["workloads"][workload.name] = data
            _save(results, options.out)

    report.write(results, options.report)
    print(f"results: {options.out / 'results.json'}; report: {options.report}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="Size and speed benchmark of deltatar."
    )
    size = parser.add_mutually_exclusive_group()
    for name in ("quick", "large"):
        preset = SIZES[name]
        size.add_argument(
            f"--{name}",
            dest="size",
            action="store_const",
            const=name,
            help=f"scale {preset['scale']}, {preset['visits']} visits, "
            f"{preset['releases']} releases",
        )
    parser.add_argument(
        "--workload",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this workload (repeatable)",
    )
    parser.add_argument(
        "--tool",
        action="append",
        default=[],
        metavar="NAME",
        choices=TOOL_NAMES,
        help="run only this tool (repeatable)",
    )
    parser.add_argument("--visits", type=int, help="override the number of visits")
    parser.add_argument("--scale", type=float, help="override the workload scale")
    parser.add_argument(
        "--releases", type=int, help="how many of the latest releases to replay"
    )
    parser.add_argument(
        "--no-ideal",
        dest="ideal",
        action="store_false",
        default=None,
        help="skip the ideal price (it holds every tree in memory)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cache",
        type=Path,
        default=BENCH_DIR / "cache",
        help="where downloaded releases are kept (default: bench/cache)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="directory for results.json (default: bench/out, bench/out-large)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="markdown report to write, its plots beside it "
        "(default: bench/RESULTS.md, bench/large/RESULTS.md)",
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="where trees and stores are built (default: the temp dir)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from OUT/results.json; run nothing",
    )
    options = parser.parse_args(argv)

    options.size = options.size or "default"
    preset = SIZES[options.size]
    # A large run reports on its own, so it never replaces the default one.
    large = options.size == "large"
    options.out = options.out or BENCH_DIR / ("out-large" if large else "out")
    options.report = options.report or (
        BENCH_DIR / "large" / "RESULTS.md" if large else BENCH_DIR / "RESULTS.md"
    )
    options.visits = options.visits or preset["visits"]
    options.scale = options.scale or preset["scale"]
    options.releases = min(options.releases or preset["releases"], len(RELEASES))
    options.ideal = preset["ideal"] if options.ideal is None else options.ideal
    options.repeats = preset["repeats"]
    if options.size == "large" and not options.workload:
        options.workload = list(LARGE_WORKLOADS)
    options.command = os.environ.get("BENCH_COMMAND") or shlex.join(
        ["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)]
    )
    return options


def _compile_package() -> None:
    """Write deltatar's bytecode once, as an installed package has it.

    With ``PYTHONDONTWRITEBYTECODE`` set (some machines set it globally),
    every timed command would otherwise compile the package's sources again,
    about 30 ms that no installed copy pays.
    """
    compileall.compile_dir(REPO_ROOT / "deltatar", quiet=1)


def _choose(
    workloads: dict[str, Workload], wanted: list[str], notes: list[str]
) -> list[Workload]:
    if not wanted:
        return list(workloads.values())
    chosen = []
    for name in wanted:
        if name in workloads:
            chosen.append(workloads[name])
        else:
            notes.append(
                f"workload {name} not available; known: {', '.join(workloads)}"
            )
    return chosen


def _tool_table(wanted: list[str], notes: list[str]) -> dict[str, dict[str, Any]]:
    """Each tool's version, or why it is missing; every tool is listed."""
    table = {}
    for tool_class in ALL_TOOLS:
        tool = tool_class(Path("/nonexistent"))
        if wanted and tool.name not in wanted:
            table[tool.name] = {"version": None, "missing": "not selected (--tool)"}
            continue
        missing = tool.missing()
        if missing:
            notes.append(
                f"{tool.name} is missing: {missing}; it is recorded as missing"
            )
        table[tool.name] = {
            "version": None if missing else tool.version(),
            "missing": missing,
        }
    return table


def _header(options, tools: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    return {
        "command": options.command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(),
        "revision": _revision(),
        "options": {
            "size": options.size,
            "visits": options.visits,
            "scale": options.scale,
            "releases": options.releases,
            "ideal": options.ideal,
            "restore_repeats": options.repeats,
            "seed": options.seed,
        },
        "tools": tools,
        "notes": notes,
        "workloads": {},
    }


def _disk_problem(options, chosen: list[Workload]) -> str | None:
    """Why the chosen run would not fit on the scratch disk, or None."""
    generated = [w for w in chosen if w.max_visits is None]
    if not generated:
        return None
    scratch = options.scratch or Path(tempfile.gettempdir())
    trees = FIXED_TREES + options.visits
    needed = trees * GENERIC_BYTES_PER_SCALE * options.scale
    free = shutil.disk_usage(scratch).free
    if free >= needed:
        return None
    return (
        f"not enough disk under {scratch}: scale {options.scale} needs about "
        f"{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free (use --scratch)"
    )


def _machine() -> dict[str, Any]:
    memory = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = int(line.split()[1]) * 1024
    return {
        "nproc": os.cpu_count(),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "peak_rss_source": "GNU time %M"
        if gnu_time_available()
        else "unknown: no /usr/bin/time",
    }


def _revision() -> str:
    """The commit measured, flagged when deltatar's sources differ from it."""
    git = ["git", "-C", str(REPO_ROOT)]
    commit = output_of([*git, "rev-parse", "--short", "HEAD"])
    changed = output_of([*git, "status", "--porcelain", "--", "deltatar"])
    count = len(changed.splitlines())
    return commit + (
        f" plus uncommitted changes to {count} deltatar files" if count else ""
    )


# -- one workload -------------------------------------------------------------


def _run_workload(
    workload: Workload, options, table: dict[str, Any], scratch: Path
) -> dict[str, Any]:
    tree = scratch / "tree"
    visits = min(options.visits, workload.max_visits or options.visits)
    tools = [cls(scratch) for cls in ALL_TOOLS if _runnable(table[cls.name])]
    active = list(tools)
    ideal = IdealTracker() if options.ideal else None
    floors, rng = FloorTracker(), random.Random(options.seed)
    kept_visits = {1, max(1, (visits + 1) // 2), visits}
    copies: dict[int, Path] = {}
    rows: list[dict[str, Any]] = []
    print(f"== {workload.name}: {visits} visits at scale {options.scale}", flush=True)

    for visit in range(1, visits + 1):
        workload.apply_visit(tree, visit, rng, options.scale)
        row = {"visit": visit, "tree_bytes": disk_bytes(tree)}
        row["floor"] = floors.measure(tree)
        row["ideal"] = ideal.add_visit(tree).as_dict() if ideal else None
        row["tools"] = {tool.name: _append(tool, tree, visit) for tool in active}
        active = [tool for tool in active if "error" not in row["tools"][tool.name]]
        if visit in kept_visits:
            copies[visit] = scratch / "copies" / f"visit_{visit}"
            copy_tree(tree, copies[visit])
        rows.append(row)
        _print_row(workload.name, rows)

    data = {"name": workload.name, "origin": workload.origin, "visits": rows}
    deltatar = next((tool for tool in active if isinstance(tool, Deltatar)), None)
    if deltatar is None:
        data["restore"] = {"error": "deltatar did not record every visit"}
    else:
        data["deltatar_log"] = _deltatar_log(deltatar)
        data["startup"] = _startup(deltatar, tree, max(3, options.repeats))
        print("   timing restores", flush=True)
        data["restore"] = measure_restores(
            tools, copies, scratch / "restores", options.repeats
        )
    shutil.rmtree(scratch, ignore_errors=True)
    data["final"] = final_numbers(data, list(table))
    return data


def _startup(deltatar: Deltatar, tree: Path, repeats: int) -> dict[str, Any]:
    """Seconds of ``--version`` and of an append that finds nothing changed."""
    outcome = {}
    for label, argv in (
        ("version", deltatar.command("--version")),
        (
            "no_change_append",
            deltatar.command("append", tree, "--store", deltatar.store),
        ),
    ):
        try:
            runs = [run(argv) for _ in range(repeats)]
        except ToolFailed as error:
            outcome[label] = {"error": str(error)}
            continue
        median = sorted(runs, key=lambda timed: timed.wall_seconds)[len(runs) // 2]
        outcome[label] = median.summary() | {
            "all_seconds": [round(timed.wall_seconds, 4) for timed in runs]
        }
    return outcome


def _runnable(entry: dict[str, Any]) -> bool:
    return entry["missing"] is None


def _append(tool: Tool, tree: Path, visit: int) -> dict[str, Any]:
    """One append, measured; a failure is recorded and ends this tool's run."""
    try:
        timed = tool.append(tree, visit)
    except ToolFailed as error:
        print(f"   {tool.name} failed at visit {visit}: {error}", flush=True)
        return {"error": str(error)}
    return {"store_bytes": tool.store_bytes(), **timed.summary(), **tool.details(timed)}


def _deltatar_log(deltatar: Deltatar) -> list[dict[str, Any]] | None:
    """The store's own account of each visit (kinds, stored-bytes breakdown)."""
    text = output_of(deltatar.command("log", "--store", deltatar.store, "--json"))
    try:
        return json.loads(text)["visits"]
    except (ValueError, KeyError):
        return [{"error": text[-2000:]}]


def _print_row(workload: str, rows: list[dict[str, Any]]) -> None:
    row, ideal = rows[-1], cumulative_ideal(rows)[-1]
    parts = [
        f"{workload} visit {row['visit']:>2}:",
        f"tree {report.mib(row['tree_bytes'])}",
        f"ideal {report.mib(ideal)}",
        f"floor {row['floor']['floor_seconds']:.2f}s",
    ]
    for name, outcome in row["tools"].items():
        size = store_after(row, name)
        if size is None:
            stopped = outcome.get("error", "").startswith("stopped")
            parts.append(f"{name} {'stopped' if stopped else 'FAILED'}")
            continue
        parts.append(f"{name} {report.mib(size)} ({outcome['seconds']:.2f}s)")
    store = store_after(row, "deltatar")
    if store and ideal:
        parts.append(f"ratio {store / ideal:.3f}")
    print("  ".join(parts), flush=True)


def _save(results: dict[str, Any], out: Path) -> None:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
