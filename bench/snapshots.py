"""Time until a new replica serves, from the log's start and from a snapshot.

  python -m bench.snapshots [--events N] [--runs R] [--tail-percent P] [--check]

On topics and a bucket of its own: writes N synthetic events (bench.events' generator: 10 a
layer), starts a query replica on an empty index and times it from spawn until its /readyz
answers 200 (it then listens and serves: "from zero"). Takes a snapshot of that index
(services.query.snapshots, as `layerlog snapshot` does), writes P% more events (the tail), then
R times starts another replica on an empty index and times it the same way: it fetches and
checks the newest snapshot, then replays only the tail ("from a snapshot"). With --check, the
index from snapshot + tail is compared with the one the first replica built from the whole log
(canonical dumps, services.query.index.canonical_digest).

`python -m bench` (make bench) runs it as the figure `snapshots` on 1,000,000 events; the
10,000,000-event run is recorded in bench/SNAPSHOTS.md. Writes bench/out/snapshots-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Context, load_average, log
from bench.events import EVENTS_PER_LAYER, SyntheticLog
from bench.stack import (
    OUT,
    ServiceProcess,
    delete_bucket,
    delete_topics,
    free_port,
    new_tag,
    peak_rss_mib,
    run_settings,
)
from bench.stats import Figure
from services.core.provision import provision
from services.core.settings import Settings
from services.query.index import canonical_digest
from services.query.snapshots import Snapshots, index_offsets

POLL_SECONDS = 0.2


def replica_settings(settings: Settings, work: Path, label: str) -> Settings:
    port = free_port()
    return replace(
        settings,
        index_path=str(work / f"replica-{label}.sqlite"),
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
        query_status_listen=f"127.0.0.1:{free_port()}",
    )


async def until_serving(service: ServiceProcess, timeout: float) -> tuple[float, float, dict]:
    """From now (the spawn): seconds until /readyz on the status address leaves `restoring` (the
    snapshot is fetched and checked, or there is none), seconds until it says 200, and its body."""
    started = time.perf_counter()
    restored: float | None = None
    url = f"http://{service.settings.query_status_listen}/readyz"
    async with aiohttp.ClientSession() as http:
        while True:
            if not service.alive():
                raise RuntimeError(f"the replica exited; its log ends:\n{service.tail()}")
            try:
                async with http.get(url) as response:
                    body = await response.json()
                    if restored is None and body["status"] not in ("starting", "restoring"):
                        restored = time.perf_counter() - started
                    if response.status == 200:
                        return restored or 0.0, time.perf_counter() - started, body
            except aiohttp.ClientError:
                pass
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"no replica ready within {timeout:.0f} s:\n{service.tail()}")
            await asyncio.sleep(POLL_SECONDS)


async def events_applied(service: ServiceProcess) -> int:
    async with aiohttp.ClientSession() as http:
        url = f"http://{service.settings.query_status_listen}/healthz"
        async with http.get(url) as response:
            return int((await response.json())["events_applied"])


def _remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)


async def measure(
    settings: Settings, work: Path, events: int, runs: int, tail_percent: float, check: bool
) -> dict[str, Any]:
    layers = events // EVENTS_PER_LAYER
    tail_layers = max(1, int(layers * tail_percent / 100))
    result: dict[str, Any] = {
        "events": layers * EVENTS_PER_LAYER,
        "tail_events": tail_layers * EVENTS_PER_LAYER,
        "partitions": settings.partitions,
        "load_start": load_average(),
    }
    await provision(settings, timeout=60)
    main = SyntheticLog(layers, new_tag())
    main.check()
    log(f"producing {main.events:,} events")
    result["produce_seconds"] = await main.produce(settings)
    log(f"produced {main.events:,} events in {result['produce_seconds']:.0f} s")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    zero = ServiceProcess(
        "query", replica_settings(settings, work, "zero"), work / "logs", profile_dir=None
    )
    zero.start()
    try:
        _, seconds, _ = await until_serving(zero, timeout=6 * 3600)
        result["from_zero_seconds"] = seconds
        result["from_zero_peak_rss_mib"] = peak_rss_mib(zero.pid)
        log(f"from zero: serving after {seconds:.1f} s ({main.events / seconds:,.0f} events/s)")
        index = zero.settings.index_path
        result["index_bytes"] = (await asyncio.to_thread(Path(index).stat)).st_size
        snapshots = Snapshots(settings)
        begin = time.perf_counter()
        taken = await snapshots.take(index)
        result["snapshot_seconds"] = time.perf_counter() - begin
        result["snapshot_bytes"] = taken.manifest.size
        log(
            f"snapshot {taken.manifest.snapshot_id}: {taken.manifest.size / 2**20:,.0f} MiB in "
            f"{result['snapshot_seconds']:.1f} s (copy, sha256, upload)"
        )
        tail = SyntheticLog(tail_layers, new_tag())
        await tail.produce(settings)
        log(f"wrote a tail of {tail.events:,} events after the snapshot")
        result["from_snapshot_seconds"] = []
        for run in range(runs):
            restored = ServiceProcess(
                "query",
                replica_settings(settings, work, f"snapshot-{run}"),
                work / "logs",
                profile_dir=None,
            )
            restored.start()
            try:
                restore, seconds, ready = await until_serving(restored, timeout=3600)
                applied = await events_applied(restored)
                if ready.get("snapshot") != taken.manifest.snapshot_id:
                    raise RuntimeError(f"run {run + 1} did not start from the snapshot: {ready}")
                if applied != tail.events:
                    raise RuntimeError(f"run {run + 1} applied {applied}, not {tail.events}")
                result["from_snapshot_seconds"].append(seconds)
                # Spawn, then fetching and checking the snapshot; the rest is the tail's replay.
                result.setdefault("restored_after_seconds", []).append(restore)
                result.setdefault("from_snapshot_peak_rss_mib", []).append(
                    peak_rss_mib(restored.pid)
                )
                log(
                    f"from a snapshot, run {run + 1}: serving after {seconds:.1f} s (snapshot "
                    f"fetched and checked {restore:.1f} s after spawn, then replayed "
                    f"{applied:,} events of the tail)"
                )
                if check and run == runs - 1:
                    result["identical"] = await _compare(zero, restored, settings)
            finally:
                restored.stop()
                _remove(restored.settings.index_path)
    finally:
        zero.stop()
        _remove(zero.settings.index_path)
        await delete_topics(settings)
        await delete_bucket(settings)
    result["load_end"] = load_average()
    return result


async def _compare(zero: ServiceProcess, restored: ServiceProcess, settings: Settings) -> bool:
    """Whether the index from snapshot + tail equals the one built from the whole log."""
    topic = settings.events_topic
    target = await asyncio.to_thread(index_offsets, restored.settings.index_path, topic)
    deadline = time.monotonic() + 3600
    while await asyncio.to_thread(index_offsets, zero.settings.index_path, topic) != target:
        if time.monotonic() > deadline:
            raise TimeoutError("the from-zero replica never applied the tail")
        await asyncio.sleep(1)
    restored.stop()
    zero.stop()
    begin = time.perf_counter()
    ours = await asyncio.to_thread(canonical_digest, restored.settings.index_path)
    theirs = await asyncio.to_thread(canonical_digest, zero.settings.index_path)
    log(
        f"canonical dumps ({sum(ours[1].values()):,} rows each, {time.perf_counter() - begin:.0f}"
        f" s): {'identical' if ours == theirs else 'DIFFERENT'}"
    )
    return ours == theirs


async def figure(ctx: Context) -> None:
    """The `snapshots` figure of `python -m bench`: from a snapshot vs from zero."""
    events = 100_000 if ctx.quick else 1_000_000
    tag = new_tag()
    settings = run_settings(ctx.work, f"sn-{tag}", partitions=ctx.settings.partitions)
    result = await measure(settings, ctx.work, events, ctx.runs, 1.0, check=False)
    serve = ctx.figure(
        Figure(
            "snapshot_serve",
            f"New replica: seconds until it serves, from a snapshot ({result['events']:,}-event "
            f"log, {result['tail_events']:,}-event tail)",
            "s",
            "the same replica from the log's start",
            higher_is_better=False,
        )
    )
    for seconds in result["from_snapshot_seconds"]:
        serve.add(seconds, result["from_zero_seconds"])
    restored = ", ".join(f"{t:.1f}" for t in result["restored_after_seconds"])
    serve.note = (
        f"from zero once ({result['from_zero_seconds']:.0f} s) as every run's baseline; snapshot "
        f"{result['snapshot_bytes'] / 2**20:,.0f} MiB, taken in {result['snapshot_seconds']:.1f} s;"
        f" fetched and checked {restored} s after spawn"
    )
    ctx.series["snapshots"] = result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshots", description=__doc__)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3, help="replicas started from the snapshot")
    parser.add_argument("--tail-percent", type=float, default=1.0)
    parser.add_argument("--check", action="store_true", help="compare the two indexes")
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args(argv)
    tag = new_tag()
    work = OUT / f"snapshots-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    settings = run_settings(work, f"sn-{tag}", partitions=args.partitions)
    result = asyncio.run(
        measure(settings, work, args.events, args.runs, args.tail_percent, args.check)
    )
    result["command"] = "python -m bench.snapshots " + " ".join(argv or sys.argv[1:])
    saved = OUT / f"snapshots-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    saved.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    log(f"wrote {saved}")
    return 0 if result.get("identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())
