"""Run the benchmark: replay each workload, record it with every tool, report.

For each workload the tree is rebuilt from visit 1 in a scratch directory.
After each visit the ideal price is computed and deltatar and every peer
record the tree into their own stores; one line per visit shows how they
compare.  After the last visit the restores are timed.  Everything measured
goes to ``results.json``; ``bench.report`` turns it into ``RESULTS.md`` and
the plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
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
from bench.measure import (
    ToolFailed,
    copy_tree,
    disk_bytes,
    gnu_time_available,
    output_of,
)
from bench.restore import measure_restores
from bench.targets import cumulative_ideal, final_numbers, store_after
from bench.tools import ALL_TOOLS, TOOL_NAMES, Deltatar, FullArchives, Tool
from bench.workloads import REPO_ROOT, Workload, discover

BENCH_DIR = REPO_ROOT / "bench"
QUICK = {"scale": 0.1, "visits": 10}
FULL = {"scale": 1.0, "visits": 20}


def main(argv: list[str] | None = None) -> int:
    options = _parse(argv)
    if options.report_only:
        results = json.loads((options.out / "results.json").read_text())
        for data in results["workloads"].values():
            # Judged again, so a change to the targets shows without a rerun.
            data["final"] = final_numbers(data["visits"], list(results["tools"]))
        report.write(results, options.report)
        print(f"report: {options.report} (from {options.out / 'results.json'})")
        return 0

    workloads, notes = discover()
    chosen = _choose(workloads, options.workload, notes)
    tools = _tool_table(options.tool, notes)
    for note in notes:
        print(f"note: {note}", flush=True)
    if not chosen:
        print("nothing to run: no workload was available", file=sys.stderr)
        return 2

    results = _header(options, tools, notes)
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix="deltatar-bench-", dir=options.scratch
    ) as work:
        for workload in chosen:
            scratch = Path(work) / workload.name
            results["workloads"][workload.name] = _run_workload(
                workload, options, tools, scratch
            )
            _save(results, options.out)

    report.write(results, options.report)
    print(f"results: {options.out / 'results.json'}; report: {options.report}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="Size and speed benchmark of deltatar."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"scale {QUICK['scale']}, {QUICK['visits']} visits "
        f"(default: scale {FULL['scale']}, {FULL['visits']} visits)",
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
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR / "out",
        help="directory for results.json (default: bench/out)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=BENCH_DIR / "RESULTS.md",
        help="markdown report to write (default: bench/RESULTS.md)",
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

    preset = QUICK if options.quick else FULL
    options.visits = options.visits or preset["visits"]
    options.scale = options.scale or preset["scale"]
    options.command = os.environ.get("BENCH_COMMAND") or shlex.join(
        ["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)]
    )
    return options


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
            "visits": options.visits,
            "scale": options.scale,
            "seed": options.seed,
        },
        "tools": tools,
        "notes": notes,
        "workloads": {},
    }


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
    tools = [cls(scratch) for cls in ALL_TOOLS if _runnable(table[cls.name])]
    ideal, rng = IdealTracker(), random.Random(options.seed)
    kept_visits = {1, max(1, options.visits // 2), options.visits}
    copies: dict[int, Path] = {}
    rows: list[dict[str, Any]] = []
    print(
        f"== {workload.name}: {options.visits} visits at scale {options.scale}",
        flush=True,
    )

    for visit in range(1, options.visits + 1):
        workload.apply_visit(tree, visit, rng, options.scale)
        row = {"visit": visit, "tree_bytes": disk_bytes(tree)}
        row["ideal"] = ideal.add_visit(tree).as_dict()
        row["tools"] = {tool.name: _append(tool, tree, visit) for tool in tools}
        tools = [tool for tool in tools if "error" not in row["tools"][tool.name]]
        if visit in kept_visits:
            copies[visit] = scratch / "copies" / f"visit_{visit}"
            copy_tree(tree, copies[visit])
        rows.append(row)
        _print_row(workload.name, rows)

    return {
        "origin": workload.origin,
        "visits": rows,
        "restore": _restores(tools, copies, scratch),
        "deltatar_log": _deltatar_log(tools),
        "final": final_numbers(rows, list(table)),
    }


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


def _restores(
    tools: list[Tool], copies: dict[int, Path], scratch: Path
) -> dict[str, Any]:
    deltatar = next((tool for tool in tools if isinstance(tool, Deltatar)), None)
    if deltatar is None:
        return {"error": "deltatar did not record every visit; restores not timed"}
    full = next((tool for tool in tools if isinstance(tool, FullArchives)), None)
    print("   timing restores", flush=True)
    return measure_restores(deltatar, full, copies, scratch / "restores")


def _deltatar_log(tools: list[Tool]) -> list[dict[str, Any]] | None:
    """The store's own account of each visit (kinds, stored-bytes breakdown)."""
    deltatar = next((tool for tool in tools if isinstance(tool, Deltatar)), None)
    if deltatar is None:
        return None
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
    ]
    for name, outcome in row["tools"].items():
        size = store_after(row, name)
        if size is None:
            parts.append(f"{name} FAILED")
            continue
        parts.append(f"{name} {report.mib(size)} ({outcome['seconds']:.2f}s)")
    store = store_after(row, "deltatar")
    if store:
        parts.append(f"ratio {store / ideal:.3f}")
    print("  ".join(parts), flush=True)


def _save(results: dict[str, Any], out: Path) -> None:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
