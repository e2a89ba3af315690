"""`python -m bench` (`make bench`): every figure, RESULTS.md and the plots.

  python -m bench                 the full run (about 35 minutes here); writes bench/RESULTS.md
                                  and bench/*.png
  python -m bench --quick         small sizes, one run: a smoke check in a few minutes
  python -m bench --only NAME     some figures (repeat, or comma-separate): versus, scaling,
                                  ingest, concurrent, latency, fetch, memory, replay, exists,
                                  snapshots
  python -m bench --profile       run the services under py-spy; collapsed stacks in
                                  bench/out/profiles/ (summarise with `python -m bench.flame`)
  python -m bench --render JSON   rewrite the report from a saved run (bench/out/results-*.json)

Only a full run of every figure writes bench/RESULTS.md and the plots beside it; quick and partial
runs write theirs into bench/out/ (git-ignored), so a smoke check never replaces real results.
The stack must be up (`make bench` starts it); the services run as subprocesses on topics and a
bucket of their own, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import events, fetch, ingest, latency, memory, scaling, snapshots, versus
from bench.common import Context, load_average, log
from bench.report import write_markdown, write_plots
from bench.stack import OUT, ROOT, Pipeline, new_tag, run_settings

NAMES = (
    "versus",
    "scaling",
    "ingest",
    "concurrent",
    "latency",
    "fetch",
    "memory",
    "replay",
    "exists",
    "snapshots",
)
PIPELINE_FIGURES = ("ingest", "concurrent", "latency", "fetch", "memory")
# `make bench` should finish within 45 minutes here; the digest bench gets what the figures leave,
# but never less than its own floor, since its targets are among the ones the run reports.
BUDGET_SECONDS = 45 * 60
DIGEST_FLOOR_SECONDS = 10 * 60

DESCRIPTIONS = [
    "**Ingest, one stream**: one gzip layer written through the SDK (`upload`, `write` in "
    "8 MiB pieces, `finish`), timed until `finish()` returns, i.e. committed: staged in S3, "
    "verified, indexed. Baseline: minio `put_object` of the same bytes to the same S3 server.",
    "**Ingest, concurrent**: that many uploads at once from one SDK client vs as many "
    "concurrent `put_object` calls (threads). The plots sweep the SDK chunk size and the "
    "number of concurrent uploads (one pass per point).",
    "**Commit latency**: `finish()` call to return after `write()` of the whole layer; the "
    "baseline is the latency of `put_object` of the same bytes.",
    "**Exists**: HEAD /v2/<name>/blobs/<digest> for random committed layers, 64 concurrent "
    "aiohttp clients in a separate process (`bench.headload`). Baseline: the same load "
    "generator against a bare aiohttp server answering from a dict (`bench.bare`). The load "
    "generator competes with the server for the same 2 cores, so both numbers are lower than "
    "a server with cores of its own would give; the ratio is the fair comparison.",
    "**Fetch**: the whole layer through the SDK (`fetch`, `read` 1 MiB at a time) vs minio "
    "`get_object` of the same bytes; ranged: a plain HTTP GET with `Range:` for 1 MiB at a "
    "random offset vs `get_object(offset, length)`.",
    "**Replay**: a query service started on an empty index over an events topic of "
    "synthetic uploads (UploadStarted, 7 ChunkAppended, UploadFinished, LayerCommitted each), "
    "timed from its first applied event to its last (/healthz `events_applied`). Baseline: a "
    "Kafka consumer with the projection's settings reading the same events without decoding "
    "or indexing them. Exists runs on the index this builds.",
    "**New replica from a snapshot**: a query replica started on an empty index, timed from "
    "spawn until its /readyz answers 200 (it then listens and serves), over a log of synthetic "
    "uploads (as for Replay) plus a 1% tail written after a snapshot was taken: it fetches and "
    "checks the snapshot (sha256, SQLite integrity_check), then replays the tail. Baseline: the "
    "same replica from the log's start, before the tail (measured once, `bench/snapshots.py`; "
    "the 10,000,000-event run is in the section below).",
    "**Memory**: VmHWM of each service process, reset (`/proc/PID/clear_refs`) before the "
    "phase, during an upload through the SDK and a fetch of the whole layer. Baseline: a Python "
    "process streaming the same bytes to S3 and back with minio (`python -m bench.memory`).",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one run")
    parser.add_argument("--only", action="append", default=[], metavar="NAME")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, help="where RESULTS.md and the plots go")
    parser.add_argument("--profile", action="store_true", help="run the services under py-spy")
    parser.add_argument("--no-digest", action="store_true", help="skip bench/bench_digest.py")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the report")
    args = parser.parse_args(argv)
    only = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {', '.join(NAMES)}")
    args.only = only
    args.runs = args.runs or (1 if args.quick else 3)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _machine() -> str:
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return (
        f"{os.cpu_count()} cores, {memory_kib / (1 << 20):.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def _digest_bench(out: Path, quick: bool, seconds: float) -> dict[str, Any] | None:
    """bench/bench_digest.py (another engineer's), if present: its report and its JSON.

    Never fatal and never waited on past `seconds` (what is left of the run's time budget, at
    least DIGEST_FLOOR_SECONDS): its table is left out if it fails or is slow."""
    script = ROOT / "bench" / "bench_digest.py"
    if not script.exists():
        return None
    if seconds < 60:
        log("no time left in the budget for bench_digest.py; its table is left out")
        return None
    target = out / "digest.json"
    target.unlink(missing_ok=True)
    command = [sys.executable, str(script), "--json", str(target)] + (["--quick"] if quick else [])
    log("running bench/bench_digest.py")
    try:
        done = subprocess.run(
            command, cwd=ROOT, timeout=seconds, check=False, capture_output=True, text=True
        )
    except subprocess.TimeoutExpired:
        log("bench_digest.py did not finish in time; its table is left out")
        return None
    if done.returncode != 0 or not target.exists():
        log(f"bench_digest.py failed ({done.returncode}); its table is left out")
        return None
    try:
        return {"report": done.stdout.strip(), "json": json.loads(target.read_text())}
    except ValueError:
        log("bench_digest.py wrote JSON that does not parse; its table is left out")
        return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    selected = [name for name in NAMES if not args.only or name in args.only]
    tag = new_tag()
    work = OUT / f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    profile_dir = OUT / "profiles" if args.profile else None
    settings = run_settings(work, tag)
    ctx = Context(settings, None, work, args.quick, args.runs, profile_dir)
    load_start = load_average()
    durations: dict[str, float] = {}
    failures: list[str] = []

    async def timed(name: str, step: Callable[[], Awaitable[Any]]) -> Any:
        log(f"--- {name}")
        begin = time.monotonic()
        try:
            return await step()
        except Exception as error:
            failures.append(f"{name}: {type(error).__name__}: {error}")
            log(f"{name} FAILED:\n{traceback.format_exc()}")
            return None
        finally:
            durations[name] = time.monotonic() - begin

    # First, on a quiet stack: the comparison a user weighs (bench.versus, against Distribution).
    against = None
    if "versus" in selected:
        against = await timed("versus", lambda: versus.run(args.runs, args.quick))
    curves = None
    if "scaling" in selected:
        curves = await timed("scaling", lambda: scaling.run(args.quick))
    pipeline_figures = [name for name in selected if name in PIPELINE_FIGURES]
    if pipeline_figures:
        (work / "logs").mkdir(exist_ok=True)
        pipeline = Pipeline(settings, work / "logs", profile_dir=profile_dir)
        ctx.pipeline = pipeline
        await pipeline.start()
        log(f"services up: {', '.join(f'{n} pid {s.pid}' for n, s in pipeline.services.items())}")
        try:
            layer: bytes | None = None
            steps: dict[str, Callable[[], Awaitable[Any]]] = {
                "ingest": lambda: ingest.single_stream(ctx),
                "concurrent": lambda: ingest.concurrent(ctx),
                "latency": lambda: latency.commit_latency(ctx),
                "fetch": lambda: fetch.fetch(ctx, layer),
                "memory": lambda: memory.memory(ctx),
            }
            for name in pipeline_figures:
                pipeline.reset_peak_rss()
                result = await timed(name, steps[name])
                if name == "ingest" and isinstance(result, bytes):
                    layer = result
                pipeline.check_alive()
                if name != "memory":  # memory resets the peaks itself, per phase
                    ctx.peak_rss[name] = pipeline.peak_rss()
        finally:
            pipeline.stop()
            await pipeline.remove_data()
    if "replay" in selected or "exists" in selected:
        await timed(
            "replay + exists",
            lambda: events.events(ctx, replay="replay" in selected, exists="exists" in selected),
        )
    if "snapshots" in selected:
        await timed("snapshots", lambda: snapshots.figure(ctx))
    digest = None
    if not args.no_digest and not args.only:
        begin = time.monotonic()
        left = max(BUDGET_SECONDS - (time.monotonic() - started), DIGEST_FLOOR_SECONDS)
        digest = await asyncio.to_thread(_digest_bench, work, args.quick, left)
        durations["digest bench"] = time.monotonic() - begin
    if failures:
        ctx.notes += [f"FAILED {failure}" for failure in failures]
    dirty = (
        " (with uncommitted changes)"
        if _git("status", "--porcelain", "--", "services", "bench")
        else ""
    )
    return {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": dirty,
            "quick": args.quick,
            "only": args.only,
            "runs": args.runs,
            "machine": _machine(),
            "load_start": load_start,
            "load_end": load_average(),
            "minutes": (time.monotonic() - started) / 60,
            "descriptions": DESCRIPTIONS,
            "failures": failures,
        },
        "figures": [figure.to_json() for figure in ctx.figures],
        "series": ctx.series,
        "peak_rss": ctx.peak_rss,
        "notes": ctx.notes,
        "durations": durations,
        "digest": digest,
        "versus": against,
        "scaling": curves,
    }


def render(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out)
    return write_markdown(results, out, plots)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        path = render(results, args.out or args.render.parent)
        print(path.read_text())
        return 0
    full = not args.quick and not args.only
    out = args.out or (ROOT / "bench" if full else OUT)
    results = asyncio.run(run(args))
    OUT.mkdir(parents=True, exist_ok=True)
    saved = OUT / f"results-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    saved.write_text(json.dumps(results, indent=1))
    path = render(results, out)
    print(path.read_text())
    log(f"wrote {path} (raw results: {saved})")
    return 1 if results["meta"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
