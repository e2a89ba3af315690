"""RESULTS.md and the PNG plots, from a run's results (a dict, also saved as JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.stats import Figure, percentile

PROFILING_NOTES = Path(__file__).resolve().parent / "PROFILING.md"
# Measured by `python -m bench.snapshots` on a log too long for `make bench`'s time budget.
SNAPSHOT_NOTES = Path(__file__).resolve().parent / "SNAPSHOTS.md"
BEFORE = Path(__file__).resolve().parent / "results-before.json"


def _number(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit in ("req/s", "events/s"):
        return f"{value:,.0f}"
    if unit == "MiB":
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _ratio(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def table(figures: list[Figure]) -> str:
    lines = [
        "| figure | median | min | max | baseline (median) | ratio | target | met |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for figure in figures:
        unit = figure.unit
        met = {True: "**yes**", False: "no", None: "-"}[figure.met]
        values = figure.values or [math.nan]
        baseline = figure.baselines and sorted(figure.baselines)[len(figure.baselines) // 2]
        lines.append(
            f"| {figure.title} | {_number(figure.median, unit)} {unit} "
            f"| {_number(min(values), unit)} | {_number(max(values), unit)} "
            f"| {_number(baseline or math.nan, unit)} {unit} ({figure.baseline_label}) "
            f"| {_ratio(figure.ratio)} | {figure.target.text if figure.target else '-'} | {met} |"
        )
    return "\n".join(lines)


def _records_table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, (dict, list)):
            return json.dumps(value)[:80]
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def digest_section(digest: dict[str, Any]) -> str:
    """The digest bench's own report, and the tables in its --json output (its format, not
    ours: lists of records become tables, other values a list)."""
    parts = []
    if digest.get("report"):
        parts += ["Its own report:", "", "```", digest["report"], "```"]
    data = digest.get("json")
    if isinstance(data, dict):
        scalars = []
        for key, value in data.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                parts += ["", f"`{key}` from its JSON:", "", _records_table(value)]
            elif not (isinstance(value, str) and value in (digest.get("report") or "")):
                scalars.append(f"- {key}: {json.dumps(value)}")
        if scalars:
            parts += ["", *scalars]
    elif isinstance(data, list) and all(isinstance(v, dict) for v in data):
        parts += ["", _records_table(data)]
    return "\n".join(parts)


def before_and_after(before: dict[str, Any], figures: list[Figure]) -> str:
    """This run beside the run before the latest round of changes (bench/results-before.json)."""
    earlier = {f["key"]: Figure.from_json(f) for f in before["figures"]}
    meta = before["meta"]
    lines = [
        "## Before and after the latest round of changes",
        "",
        f'"Before" is the full run of {meta["date"]} at commit `{meta["commit"]}` (its raw '
        'results are bench/results-before.json); "after" is this run. Machines here are '
        "shared, so compare the ratios to the same-run baselines rather than the absolute values.",
        "",
        "| figure | before | before ratio | after | after ratio | target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for figure in figures:
        old = earlier.get(figure.key)
        if old is None:
            before_cells = "(not measured) | -"
        else:
            before_cells = f"{_number(old.median, old.unit)} {old.unit} | {_ratio(old.ratio)}"
        lines.append(
            f"| {figure.title} | {before_cells} | {_number(figure.median, figure.unit)} "
            f"{figure.unit} | {_ratio(figure.ratio)} "
            f"| {figure.target.text if figure.target else '-'} |"
        )
    return "\n".join(lines)


def versus_section(result: dict[str, Any] | None) -> list[str]:
    """bench.versus' table: Layerlog against CNCF Distribution, with each goal met or missed."""
    if not result:
        return []
    from bench.versus import DESCRIPTION, cpu_table, goals_met, table, why_missed

    met, missed = goals_met(result)
    reasons = why_missed(result, missed)
    looked = result["lookups"]
    seeding = looked["seeding_s"]
    return [
        "## Against CNCF Distribution v3.1.2 (`bench/versus.py`)",
        "",
        f"Measured {result['when']} at commit `{result['commit']}`, {result['runs']} run(s) per "
        f"registry, interleaved, median taken; {result['minutes']:.1f} minutes. Load average "
        f"(1/5/15 min) before {result['load_before']}, after {result['load_after']}.",
        "",
        *([result["note"], ""] if result.get("note") else []),
        table(result),
        "",
        f"Goals met: {met} of {met + len(missed)}"
        + (f"; missed: {', '.join(missed)}." if missed else "."),
        "",
        *(["Why each miss:", "", *reasons, ""] if reasons else []),
        *DESCRIPTION,
        "",
        cpu_table(result),
        "",
        f"Lookups ran on {looked['layers']:,} layers in {looked['repositories']:,} repositories "
        f"and {looked['tags']:,} tags, {looked['concurrency']} clients, "
        f"{looked['seconds_per_load']:.0f} s per load. Seeding: Layerlog's events "
        f"{seeding['layerlog_events_s']:.0f} s, indexed in {seeding['layerlog_index_s']:.0f} s, "
        f"{looked['tags']:,} manifest PUTs {seeding['layerlog_tags_s']:.0f} s; Distribution's "
        f"blobs {seeding['distribution_blobs_s']:.0f} s "
        f"({seeding['distribution_blobs_written_as']}), {looked['tags']:,} manifest PUTs "
        f"{seeding['distribution_tags_s']:.0f} s.",
        f"Blob GET, not followed: {result['blob_get_status']} (307: the client reads S3 "
        "directly; 200: the registry streams the bytes).",
        "",
    ]


def scaling_section(result: dict[str, Any] | None) -> list[str]:
    """bench.scaling's curves: push MB/s by upload-worker replicas and concurrent pushes."""
    if not result:
        return []
    from bench.scaling import flattening, table

    return [
        "## Scaling: upload-worker replicas and concurrent pushes (`bench/scaling.py`)",
        "",
        f"Measured {result['when']} at commit `{result['commit']}` on {result['cores']} cores: "
        f"N `crane append` processes at once, {result['push_bytes'] / (1 << 20):.1f} MiB gzip "
        f"layer each, through the registry, with 1, 2 and 4 upload workers on "
        f"{result['partitions']} partitions; one pass per point. CPU busy: CPU seconds of every "
        "process on the path (services, Kafka broker, versitygw, crane) over wall time x cores. "
        f"Load average before {result['load_before']}, after {result['load_after']}.",
        "",
        table(result),
        "",
        flattening(result),
        "",
        "Why it flattens: every process on the path (crane, the registry, the Kafka broker, the "
        "upload workers, the verifier, versitygw) shares these cores, so once the CPU-busy "
        "column reaches its ceiling more concurrent pushes only queue, and more upload-worker "
        "replicas split the same CPU among more processes (each with Kafka fetches of its own). "
        "Replicas can only add throughput where they bring cores with them, on other machines.",
        "",
    ]


def write_markdown(results: dict[str, Any], out: Path, plots: list[str]) -> Path:
    figures = [Figure.from_json(f) for f in results["figures"]]
    meta = results["meta"]
    parts = [
        "# Layerlog benchmark results",
        "",
        f"Measured by `make bench` (`python -m bench{' --quick' if meta['quick'] else ''}`) on "
        f"{meta['date']} at commit `{meta['commit']}`{meta['dirty']}; {meta['runs']} run(s) per "
        f"figure; the run took {meta['minutes']:.1f} minutes.",
        f"Machine: {meta['machine']}. Load average (1/5/15 min) at the start {meta['load_start']},"
        f" at the end {meta['load_end']}: the machine is shared with other engineers' test runs,"
        " so absolute numbers drift from run to run.",
        "",
        *versus_section(results.get("versus")),
        *scaling_section(results.get("scaling")),
        "## Against raw S3 and bare servers",
        "",
        "Every figure is measured next to a baseline that does the same work without Layerlog, "
        "in the same run, one right after the other (alternating which goes first). **ratio** is "
        "Layerlog ÷ baseline, computed per run; the table gives the median of those ratios. For "
        "throughput a ratio below 1 is the cost of Layerlog's guarantees; for latency and "
        "memory a ratio above 1 is. median/min/max are of the Layerlog figure over the runs; the "
        "target is checked on the median (of the value, or of the ratio where the target is a "
        "ratio).",
        "",
        table(figures),
        "",
    ]
    met = [f for f in figures if f.met is True]
    missed = [f for f in figures if f.met is False]
    parts += [
        f"Targets met: {len(met)} of {len(met) + len(missed)}"
        + (f"; missed: {', '.join(f.key for f in missed)}." if missed else "."),
        "",
    ]
    if BEFORE.exists():
        parts += [before_and_after(json.loads(BEFORE.read_text()), figures), ""]
    parts += [
        "## What each figure measures",
        "",
    ]
    parts += [f"- {line}" for line in meta["descriptions"]]
    notes = [f"- `{f.key}`: {f.note}" for f in figures if f.note]
    if notes:
        parts += ["", "Per-figure notes:", "", *notes]
    if results.get("notes"):
        parts += ["", *[f"- {note}" for note in results["notes"]]]
    if results.get("peak_rss"):
        services = sorted({name for peaks in results["peak_rss"].values() for name in peaks})
        parts += [
            "",
            "## Peak RSS of each service per phase (VmHWM, reset at the start of each phase)",
            "",
            "| phase | " + " | ".join(services) + " |",
            "| --- |" + " ---: |" * len(services),
        ]
        for phase, peaks in results["peak_rss"].items():
            cells = [f"{peaks[s]:.0f} MiB" if s in peaks else "-" for s in services]
            parts.append(f"| {phase} | " + " | ".join(cells) + " |")
    if results.get("durations"):
        parts += [
            "",
            "Time per part of the run: "
            + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["durations"].items())
            + ".",
        ]
    if plots:
        parts += ["", "## Plots", ""]
        parts += [f"![{Path(plot).stem}]({plot})" for plot in plots]
    if results.get("digest"):
        parts += [
            "",
            "## Digest bench (bench/bench_digest.py, run after the figures above)",
            "",
            digest_section(results["digest"]),
        ]
    if SNAPSHOT_NOTES.exists():
        parts += ["", SNAPSHOT_NOTES.read_text().strip()]
    if PROFILING_NOTES.exists():
        parts += ["", PROFILING_NOTES.read_text().strip()]
    path = out / "RESULTS.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """PNG plots next to RESULTS.md; returns their file names."""
    try:
        import matplotlib
    except ImportError:  # the `bench` extra is not installed: the table still gets written
        print("bench: matplotlib is not installed (pip install -e '.[bench]'); no plots")
        return []
    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt

    written: list[str] = []
    series = results.get("series", {})

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    curves = results.get("scaling")
    if curves and curves["points"]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for replicas in sorted({p["replicas"] for p in curves["points"]}):
            points = [p for p in curves["points"] if p["replicas"] == replicas]
            x = [p["concurrency"] for p in points]
            label = f"{replicas} upload worker{'s' if replicas > 1 else ''}"
            ax.plot(x, [p["mb_s"] for p in points], "o-", label=label)
        levels = sorted({p["concurrency"] for p in curves["points"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.set_xlabel(f"concurrent crane pushes of {curves['push_bytes'] / (1 << 20):.0f} MiB")
        ax.set_ylabel("MB/s, all pushes")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Push throughput by replicas and concurrency, {curves['cores']} cores")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "scaling.png")

    chunks = series.get("ingest_chunk_size")
    if chunks and chunks["points"]:
        points = chunks["points"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        x = [p["chunk_size"] / 1024 for p in points]
        ax.plot(x, [p["layerlog"] for p in points], "o-", label="Layerlog SDK (to committed)")
        ax.plot(x, [p["baseline"] for p in points], "s--", label="minio put_object, same bytes")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [_size_label(p["chunk_size"]) for p in points])
        ax.set_xlabel("SDK chunk size (bytes per AppendChunk)")
        ax.set_ylabel("MiB/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Ingest throughput by chunk size, one {chunks['layer_size'] >> 20} MiB layer")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "ingest_chunk_size.png")

    concurrency = series.get("ingest_concurrency")
    if concurrency and concurrency["points"]:
        points = concurrency["points"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        x = [p["concurrency"] for p in points]
        ax.plot(x, [p["layerlog"] for p in points], "o-", label="Layerlog SDK (to committed)")
        ax.plot(x, [p["baseline"] for p in points], "s--", label="minio put_object")
        for p in points:
            ratio = p["layerlog"] / p["baseline"] if p["baseline"] else math.nan
            ax.annotate(
                f"{ratio:.2f}x",
                (p["concurrency"], p["layerlog"]),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=8,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(c) for c in x])
        ax.set_xlabel(f"concurrent uploads of {concurrency['upload_size'] >> 20} MiB")
        ax.set_ylabel("aggregate MiB/s")
        ax.set_ylim(bottom=0)
        ax.set_title("Ingest throughput by concurrency (labels: Layerlog ÷ put_object)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "ingest_concurrency.png")

    latency = series.get("commit_latency")
    if latency:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, samples in latency["samples_ms"].items():
            if not samples:
                continue
            ordered = sorted(samples)
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
            ax.axvline(percentile(ordered, 99), ls=":", alpha=0.4)
        ax.axvline(50, color="green", ls="--", alpha=0.6, label="target p50, 64KiB (50 ms)")
        ax.axvline(200, color="red", ls="--", alpha=0.6, label="target p99, 64KiB (200 ms)")
        ax.set_xscale("log")
        ax.set_xlabel("finish() latency, ms (dotted: each size's p99)")
        ax.set_ylabel("fraction of commits")
        ax.set_title("Commit latency, all runs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "commit_latency.png")

    memory = [f for f in results["figures"] if f["key"].startswith("memory_")]
    small = series.get("memory", {})
    if memory and small:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        names = [f["key"].removeprefix("memory_").replace("_", "-") for f in memory]
        large_peaks = [Figure.from_json(f).median for f in memory]
        small_peaks = [
            sorted(small["small_peaks"][n])[len(small["small_peaks"][n]) // 2] for n in names
        ]
        positions = range(len(names))
        ax.bar(
            [p - 0.2 for p in positions],
            small_peaks,
            0.4,
            label=f"{small['small'] >> 20} MiB layer",
        )
        ax.bar(
            [p + 0.2 for p in positions],
            large_peaks,
            0.4,
            label=f"{small['large'] >> 20} MiB layer",
        )
        baseline = Figure.from_json(memory[0]).baselines
        if baseline:
            ax.axhline(
                sorted(baseline)[len(baseline) // 2],
                color="gray",
                ls=":",
                label="python + minio streaming the same bytes",
            )
        ax.axhline(200, color="red", ls="--", alpha=0.6, label="target (200 MiB)")
        ax.set_xticks(list(positions), names)
        ax.set_ylabel("peak RSS, MiB")
        ax.set_title("Peak RSS per service during upload + fetch")
        ax.legend(fontsize=8)
        save(fig, "memory.png")
    return written


def _size_label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
