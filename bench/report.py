"""Turn ``results.json`` into ``bench/RESULTS.md`` and its plots.

The report is regenerated whole on every run, so it never mixes numbers from
different runs.  It opens with how the numbers were made (command, date,
machine, tool versions), then gives the final ratios against the targets,
then one table per workload, the restore timings, and where deltatar's bytes
went according to its own log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .targets import cumulative_ideal, store_after

PEERS = ("tar-incremental", "full", "nested-tgz", "restic", "borg", "zpaq")
TARGET_LABELS = {
    "append_vs_floor": "append / floor (stat + read + zstd of new bytes)",
    "append_vs_restic": "restic append / deltatar append",
    "append_vs_borg": "borg append / deltatar append",
    "restore_vs_floor": "restore / zstd -dc \\| tar -x floor, worst visit",
    "restore_spread": "restore / floor, highest over lowest of first, middle, last",
    "peak_rss": "peak RSS of append and materialize",
    "smallest_store": "deltatar store / smallest peer store",
    "store_vs_ideal": "deltatar / ideal",
    "store_vs_tar_incremental": "deltatar / tar incremental",
}


METHOD = """\
## How the numbers are made

- Sizes: `scripts/bench --quick` (scale 0.1, 6 visits, the last 4 releases,
  one restore run each), the default (scale 1.0, 50 visits, 12 releases,
  three restore runs), `--large` (generic at scale 170, over 200,000 files and
  several GB, 5 visits, no ideal). Workloads: `simulate` (deltatar's own
  simulator), `attractor` and `generic` (shared generators) and `releases`
  (successive sdists of pip, unpacked without their versioned top directory,
  each replacing the tree).
- Store bytes: the apparent sizes of all regular files in a tool's store
  directory after the append. tar-incremental includes its `.snar` listing,
  which continuing the chain needs. The caches restic and borg keep outside
  their repositories are not counted.
- Ideal: visit 1 is a zstd-3 stream of a tar of the tree; each later visit is
  one zstd-3 stream of the bytes no earlier visit held (content seen anywhere
  before is free, grown files add their tail), plus a zstd-3 patch-from of each
  edited file against its previous version when that beats compressing it
  plainly. Metadata is free. See `bench/ideal.py`.
- Floors, measured on the same tree right after each visit (`bench/limits.py`):
  GNU find stats every entry; the files whose path is new or whose size or
  mtime changed are read once and compressed with zstd-3 in one stream. The
  append floor is the sum of the three.
- Peers: `full` is `tar -cf - -C TREE . | zstd -3` every visit.
  `nested-tgz` is the naive habit: `tar | gzip -6` of the tree together with
  every earlier archive, so each archive holds all before it; it stops when
  the next archive would pass 256 MiB. `tar-incremental` is GNU tar
  `--listed-incremental` through `zstd -3` (a renamed directory costs it
  nothing, as tar follows directories by device and inode; where a tree is
  deleted and unpacked anew, as in `releases`, reused inode numbers look like
  renames to it, and restoring its chain can fail). restic uses a
  version-2 repository with its default compression; borg `init -e none` and
  `create --compression zstd,3`; zpaq `add` with its default method (zpaq
  does not store symbolic links, so its restores lack them and are marked
  not exact).
- Times: wall seconds around the whole command (for deltatar this includes
  Python start-up); CPU seconds from `getrusage(RUSAGE_CHILDREN)` deltas; peak
  RSS from GNU time `%M`.
- Restores: every tool restores the first, the middle and the last visit
  after the last one was appended (tar-incremental extracts its chain up to
  the visit, zpaq `-until`, restic by tag, borg by archive), deltatar also
  after `compact`. Each is compared with a copy of the tree taken right after
  the visit was appended. The floor of a visit is `zstd -dc | tar -x` of that
  visit's full archive; its mtime differences are expected (GNU tar's default
  format keeps whole seconds).
- Targets are ratios of figures from the same run (`bench/targets.py`); the
  append ratios use the sums over visits 2 on.
"""


def mib(count: float | None) -> str:
    """A byte count for people: KiB below one MiB, MiB above."""
    if count is None:
        return "–"
    if abs(count) < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024 / 1024:.2f} MiB"


def write(results: dict[str, Any], path: Path) -> None:
    plots = _plots(results, path.parent / "plots")
    sections = [
        _preamble(results),
        _finals(results),
        _overheads(results),
        *(
            _workload(name, data, plots.get(name), path.parent)
            for name, data in results["workloads"].items()
        ),
        METHOD,
    ]
    path.write_text("\n\n".join(section.rstrip() for section in sections) + "\n")


# -- sections -------------------------------------------------------------------


def _preamble(results: dict[str, Any]) -> str:
    machine, options = results["machine"], results["options"]
    gib = machine["memory_bytes"] / 2**30
    lines = [
        "# deltatar benchmark results",
        "",
        "Generated by `scripts/bench`; rerunning it overwrites this file.",
        "",
        f"- command: `{results['command']}`",
        f"- revision: {results.get('revision', 'unknown')}",
        f"- date: {results['date']}",
        f"- machine: {machine['nproc']} CPUs, {gib:.1f} GiB memory, "
        f"Python {machine['python']}, {machine['platform']}",
        f"- size: {options.get('size', 'default')}; visits: {options['visits']}, "
        f"scale {options['scale']}, releases {options.get('releases', '–')}, "
        f"seed {options['seed']}",
        f"- peak memory from: {machine['peak_rss_source']}",
        "",
        "| tool | version |",
        "| --- | --- |",
    ]
    for name, entry in results["tools"].items():
        shown = entry["version"] or f"missing: {entry['missing']}"
        lines.append(f"| {name} | {shown.replace('|', '/')} |")
    if results["notes"]:
        lines += ["", "Notes from the run:", ""]
        lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines)


def _finals(results: dict[str, Any]) -> str:
    names = list(results["workloads"])
    lines = [
        "## Targets",
        "",
        "Each cell: the measured ratio, the target, and met or missed "
        "(n/a: not judged on this workload or not measurable in this run).",
        "",
        *_header_row(["target", *names]),
    ]
    for key, label in TARGET_LABELS.items():
        cells = [label]
        for name in names:
            target = results["workloads"][name].get("final", {}).get("targets", {})
            cells.append(_verdict(target[key]) if key in target else "n/a")
        lines.append(_row(cells))
    lines += ["", "## Final store sizes", ""]
    lines += _header_row(["workload", "visits", "files", "ideal", "deltatar", *PEERS])
    for name, data in results["workloads"].items():
        final = data["final"]
        sizes = final["store_bytes"]
        cells = [
            name,
            str(final["visits"]),
            str(final.get("files", "–")),
            mib(final["ideal_bytes"]),
            mib(sizes.get("deltatar")),
        ]
        cells += [_final_size(data, peer) for peer in PEERS]
        lines.append(_row(cells))
    return "\n".join(lines)


def _final_size(data: dict[str, Any], tool: str) -> str:
    """A peer's last store size, or why it has none (such as nested-tgz's cap)."""
    size = data["final"]["store_bytes"].get(tool)
    if size is not None:
        return mib(size)
    for row in data["visits"]:
        outcome = row["tools"].get(tool) or {}
        if "error" in outcome:
            before = data["visits"][row["visit"] - 2] if row["visit"] > 1 else None
            last = store_after(before, tool) if before else None
            reason = "stopped" if outcome["error"].startswith("stopped") else "failed"
            return f"{reason} at visit {row['visit']} ({mib(last)} before)"
    return "–"


def _overheads(results: dict[str, Any]) -> str:
    """Split deltatar's final store into layers and everything else.

    Layers hold file bytes and are what the ideal prices; manifests and the
    head are extra, and because every visit gets a full manifest that part
    grows with the number of visits times the size of the tree.
    """
    lines = [
        "## Where deltatar's store goes",
        "",
        "Layers hold the file bytes; the rest (manifests, head, content index) is",
        "listing overhead that the ideal does not price.",
        "",
        *_header_row(
            [
                "workload",
                "layers",
                "rest of store",
                "rest / ideal",
                "layers / ideal",
                "store / ideal",
            ]
        ),
    ]
    for name, data in results["workloads"].items():
        log, final = data.get("deltatar_log") or [], data["final"]
        store, ideal = final["store_bytes"].get("deltatar"), final["ideal_bytes"]
        if not log or "error" in log[0] or not store or not ideal:
            lines.append(_row([name, "n/a", "n/a", "n/a", "n/a", "n/a"]))
            continue
        layers = sum(record["layer_bytes"] for record in log)
        cells = [mib(layers), mib(store - layers)]
        cells += [f"{part / ideal:.3f}" for part in (store - layers, layers, store)]
        lines.append(_row([name, *cells]))
    return "\n".join(lines)


def _verdict(target: dict[str, Any]) -> str:
    if target["ratio"] is None:
        return "n/a"
    unit = f" {target['unit']}" if "unit" in target else ""
    shown = f"{target['ratio']:.3f}{unit} ({target['target']})"
    if target["met"] is None:
        return f"{shown}: n/a, {target.get('note', 'not judged')}"
    mark = "met" if target["met"] else "**missed**"
    note = f" ({target['note']})" if "note" in target else ""
    return f"{shown}: {mark}{note}"


def _workload(name: str, data: dict[str, Any], plot: str | None, base: Path) -> str:
    parts = [f"## Workload `{name}`", "", f"Source: `{data['origin']}`.", ""]
    if plot:
        relative = Path(plot).relative_to(base)
        parts += [f"![{name}: store size, append and restore time]({relative})", ""]
    else:
        parts += ["(No plot: matplotlib is not installed.)", ""]
    parts += [_size_table(data["visits"]), "", _time_table(data["visits"]), ""]
    parts += [_tool_summary(data["visits"]), "", _startup(data.get("startup")), ""]
    parts += [_restore_table(data["restore"]), "", _breakdown(data)]
    return "\n".join(parts)


def _size_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Store size after each visit (ideal: running sum of the per-visit ideal).",
        "",
        *_header_row(
            ["visit", "tree", "ideal, this visit", "ideal", "deltatar", "ratio", *PEERS]
        ),
    ]
    for row, ideal in zip(rows, cumulative_ideal(rows), strict=True):
        store = store_after(row, "deltatar")
        ratio = f"{store / ideal:.3f}" if store and ideal else "–"
        cells = [
            str(row["visit"]),
            mib(row["tree_bytes"]),
            mib((row.get("ideal") or {}).get("ideal_bytes")),
            mib(ideal),
            mib(store),
            ratio,
        ]
        cells += [_size_cell(row, peer) for peer in PEERS]
        lines.append(_row(cells))
    return "\n".join(lines)


def _size_cell(row: dict[str, Any], tool: str) -> str:
    outcome = row["tools"].get(tool)
    if outcome is None:
        return "–"
    return "failed" if "error" in outcome else mib(outcome["store_bytes"])


def _time_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Append wall seconds per visit, next to the floors measured on the same "
        "tree: stat of every entry (GNU find), read and zstd-3 of the new or "
        "changed files.",
        "",
        *_header_row(
            [
                "visit",
                "files",
                "new bytes",
                "stat s",
                "read s",
                "zstd s",
                "floor s",
                "deltatar s",
                "deltatar CPU s",
                "deltatar peak RSS",
                *(f"{tool} s" for tool in PEERS),
            ]
        ),
    ]
    for row in rows:
        floor = row["floor"]
        cells = [
            str(row["visit"]),
            str(floor["files"]),
            mib(floor["new_bytes"]),
            *(
                f"{floor[key]:.3f}"
                for key in (
                    "stat_seconds",
                    "read_seconds",
                    "compress_seconds",
                    "floor_seconds",
                )
            ),
        ]
        for tool in ("deltatar", *PEERS):
            outcome = row["tools"].get(tool)
            if not outcome or "error" in outcome:
                cells += ["–", "–", "–"] if tool == "deltatar" else ["–"]
                continue
            cells.append(f"{outcome['seconds']:.2f}")
            if tool == "deltatar":
                cells += [f"{_cpu(outcome):.2f}", _rss(outcome["peak_rss_kib"])]
        lines.append(_row(cells))
    return "\n".join(lines)


def _cpu(outcome: dict[str, Any]) -> float:
    return outcome["user_seconds"] + outcome["system_seconds"]


def _tool_summary(rows: list[dict[str, Any]]) -> str:
    """Per tool: appends summed over the whole run and the largest peak RSS."""
    lines = [
        "Every tool over all its appends (incremental: visits 2 on).",
        "",
        *_header_row(
            [
                "tool",
                "visits",
                "wall s",
                "CPU s",
                "incremental wall s",
                "incremental CPU s",
                "max peak RSS",
            ]
        ),
    ]
    for tool in ("deltatar", *PEERS):
        done = [
            (row["visit"], row["tools"][tool])
            for row in rows
            if tool in row["tools"] and "error" not in row["tools"][tool]
        ]
        if not done:
            continue
        later = [outcome for visit, outcome in done if visit > 1]
        peaks = [outcome["peak_rss_kib"] or 0 for _, outcome in done]
        cells = [
            tool,
            str(len(done)),
            f"{sum(outcome['seconds'] for _, outcome in done):.2f}",
            f"{sum(_cpu(outcome) for _, outcome in done):.2f}",
            f"{sum(outcome['seconds'] for outcome in later):.2f}",
            f"{sum(_cpu(outcome) for outcome in later):.2f}",
            _rss(max(peaks) or None),
        ]
        lines.append(_row(cells))
    return "\n".join(lines)


def _startup(startup: dict[str, Any] | None) -> str:
    if not startup:
        return "Start-up: not measured."
    parts = []
    for key, label in (
        ("version", "`deltatar --version`"),
        ("no_change_append", "an append that finds nothing changed"),
    ):
        outcome = startup.get(key, {})
        if "error" in outcome:
            parts.append(f"{label}: failed")
        elif outcome:
            runs = " / ".join(f"{value:.3f}" for value in outcome["all_seconds"])
            parts.append(
                f"{label}: {outcome['seconds']:.3f} s median ({runs}), "
                f"peak RSS {_rss(outcome['peak_rss_kib'])}"
            )
    return "Start-up: " + "; ".join(parts) + "."


def _rss(kib: int | None) -> str:
    return "unknown" if kib is None else f"{kib / 1024:.0f} MiB"


def _restore_table(restore: dict[str, Any]) -> str:
    if "error" in restore:
        return f"Restores: not timed ({restore['error']})."
    lines = [
        "Restores after the last visit (exact: paths, types, modes, symlink "
        "targets and bytes equal to the tree that was appended). deltatar and "
        "the floor: median of the runs listed; peers: one run.",
        "",
        *_header_row(
            [
                "restore",
                "visit",
                "median s",
                "all runs s",
                "peak RSS",
                "exact",
                "mtime differences",
            ]
        ),
    ]
    stages = [
        ("before_compact", "deltatar materialize"),
        ("after_compact", "deltatar materialize after compact"),
        ("floor", "floor: zstd -dc \\| tar -x"),
    ]
    for stage, label in stages:
        for visit, outcome in restore.get(stage, {}).items():
            lines.append(_restore_line(label, visit, outcome))
    for tool, outcomes in restore.get("peers", {}).items():
        for visit, outcome in outcomes.items():
            lines.append(_restore_line(tool, visit, outcome))
    compact = restore.get("compact", {})
    if "error" in compact:
        lines += ["", f"compact failed: `{compact['error'].splitlines()[0]}`"]
    elif compact:
        lines += [
            "",
            f"compact took {compact['seconds']:.2f} s; store after it: "
            f"{mib(compact['store_bytes_after'])}.",
        ]
    return "\n".join(lines)


def _restore_line(label: str, visit: Any, outcome: dict[str, Any]) -> str:
    if "error" in outcome:
        # The first line names the command; the tool's own complaint follows.
        lines = outcome["error"].splitlines()
        reason = lines[1] if len(lines) > 1 else lines[0]
        return f"| {label} | {visit} | failed: `{reason}` | | | | |"
    exact = (
        "yes" if outcome["exact"] else f"**no** ({outcome['content_difference_count']})"
    )
    seconds, rss = f"{outcome['seconds']:.2f}", _rss(outcome["peak_rss_kib"])
    runs = " / ".join(f"{value:.2f}" for value in outcome.get("all_seconds", []))
    mtimes = str(outcome["mtime_difference_count"])
    return _row([label, str(visit), seconds, runs or "–", rss, exact, mtimes])


def _breakdown(data: dict[str, Any]) -> str:
    """deltatar's own per-visit accounting next to the ideal, to explain a miss."""
    log = data.get("deltatar_log") or []
    if not log or "error" in log[0]:
        return "deltatar log: not available."
    ideal = {row["visit"]: row.get("ideal") or {} for row in data["visits"]}
    keys = (
        "new_bytes",
        "full_bytes",
        "tail_bytes",
        "patch_source_bytes",
        "block_bytes",
        "deduplicated_bytes",
    )
    lines = [
        "deltatar's own account per visit (`deltatar log --json`): layer bytes "
        "against the ideal price of the visit, and the `stored` breakdown "
        "(uncompressed bytes by how they were stored).",
        "",
        *_header_row(["visit", "kind", "layer", "ideal", "layer / ideal", *keys]),
    ]
    for record in log:
        price = ideal.get(record["visit"], {}).get("ideal_bytes")
        share = f"{record['layer_bytes'] / price:.2f}" if price else "–"
        stored = record.get("stored") or {}
        cells = [
            str(record["visit"]),
            record["kind"],
            mib(record["layer_bytes"]),
            mib(price),
            share,
        ] + [mib(stored.get(key)) for key in keys]
        lines.append(_row(cells))
    return "\n".join(lines)


def _header_row(names: list[str]) -> list[str]:
    return [_row(names), _row(["---"] * len(names))]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# -- plots ----------------------------------------------------------------------


def _plots(results: dict[str, Any], directory: Path) -> dict[str, str]:
    """One PNG per workload: store size, append time and restore time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, data in results["workloads"].items():
        figure = _figure(pyplot, name, data)
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=110)
        pyplot.close(figure)
        made[name] = str(path)
    return made


def _figure(pyplot, name: str, data: dict[str, Any]):
    """Store size (log) and append time per visit, restore time by visit."""
    from matplotlib import ticker

    rows = data["visits"]
    figure, (sizes, times, restores) = pyplot.subplots(1, 3, figsize=(17, 4.8))
    visits = [row["visit"] for row in rows]
    ideal = cumulative_ideal(rows)
    if ideal[-1] is not None:
        sizes.plot(visits, [b / 2**20 for b in ideal], "k--", label="ideal")
    floors = [row["floor"]["floor_seconds"] for row in rows]
    times.plot(visits, floors, "k--", label="floor")

    for tool in ("deltatar", *PEERS):
        points = [
            (row["visit"], row["tools"][tool])
            for row in rows
            if tool in row["tools"] and "error" not in row["tools"][tool]
        ]
        if not points:
            continue
        xs = [visit for visit, _ in points]
        sizes.plot(
            xs, [o["store_bytes"] / 2**20 for _, o in points], marker=".", label=tool
        )
        times.plot(xs, [o["seconds"] for _, o in points], marker=".", label=tool)

    _restore_bars(restores, data.get("restore") or {})
    for axes in (sizes, times):
        axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    sizes.set(
        yscale="log",
        xlabel="visit",
        ylabel="store MiB (log)",
        title=f"{name}: store size",
    )
    times.set(
        yscale="log",
        xlabel="visit",
        ylabel="seconds (log)",
        title=f"{name}: append time",
    )
    for axes in (sizes, times, restores):
        axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _restore_bars(axes, restore: dict[str, Any]) -> None:
    """One group of bars per restored visit, one bar per tool."""
    series = {
        "deltatar": restore.get("before_compact") or {},
        "deltatar compacted": restore.get("after_compact") or {},
        "floor": restore.get("floor") or {},
        **(restore.get("peers") or {}),
    }
    visits = sorted({int(visit) for outcomes in series.values() for visit in outcomes})
    width = 0.8 / max(1, len(series))
    for index, (label, outcomes) in enumerate(series.items()):
        xs, ys = [], []
        for position, visit in enumerate(visits):
            outcome = outcomes.get(visit, outcomes.get(str(visit), {}))
            if outcome and "error" not in outcome:
                xs.append(position + index * width)
                ys.append(outcome["seconds"])
        if xs:
            axes.bar(xs, ys, width, label=label)
    axes.set_xticks(
        [position + 0.4 - width / 2 for position in range(len(visits))],
        [f"visit {visit}" for visit in visits],
    )
    axes.set(yscale="log", ylabel="seconds (log)", title="restore time by visit")
