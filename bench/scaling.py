"""Push throughput against upload-worker replicas and concurrent pushes: `python -m bench.scaling`
(`make bench` runs it too, and plots it in bench/RESULTS.md).

For 1, 2 and 4 upload-worker replicas (a pipeline of its own each, on commands and events topics
of PARTITIONS partitions, so every replica owns some), N `crane append` processes at once, N from
1 to 64, each with an 8 MiB gzip layer of its own, timed until the last returns. Per point: MB/s
of all the layers, and the CPU seconds of every process on the path (the services, the Kafka
broker, versitygw, the crane clients) over the wall time times the cores: where that reaches 1,
the machine is saturated and more replicas or more clients cannot help.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import load_average, log
from bench.data import MIB, gzip_layer, unique_suffix
from bench.stack import (
    OUT,
    Pipeline,
    ServiceProcess,
    free_port,
    new_tag,
    run_settings,
    wait_for_url,
)
from bench.versus import (
    MB,
    CpuSplit,
    Target,
    concurrent_files,
    crane_binary,
    git_commit,
    push_many,
    stack_pids,
)

REPLICAS = (1, 2, 4)
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
QUICK_CONCURRENCY = (1, 4, 16)
PUSH_BYTES = 8 * MIB
# Enough partitions that 4 replicas own 2 each: a replica with none would idle.
PARTITIONS = 8
# Consumers joining one after another rebalance the group; the pushes wait until it has settled.
SETTLE_SECONDS = 8


def pipeline_with(replicas: int, work: Path) -> Pipeline:
    tag = new_tag()
    port = free_port()
    settings = run_settings(
        work,
        tag,
        partitions=PARTITIONS,
        registry_listen=f"127.0.0.1:{port}",
        registry_url=f"http://127.0.0.1:{port}",
        registry_index_path=str(work / f"registry-{tag}.sqlite"),
    )
    pipeline = Pipeline(
        settings, work, services=("upload-worker", "verifier", "registry"), profile_dir=None
    )
    for number in range(2, replicas + 1):
        worker = ServiceProcess("upload-worker", settings, work, profile_dir=None)
        worker.log_path = work / f"upload-worker-{number}-{tag}.log"
        pipeline.services[f"upload-worker-{number}"] = worker
    return pipeline


async def curve(
    binary: str, replicas: int, levels: tuple[int, ...], base: bytes, work: Path
) -> list[dict[str, Any]]:
    pipeline = pipeline_with(replicas, work)
    settings = pipeline.settings
    points = []
    try:
        await pipeline.start()
        await wait_for_url(settings.registry_url + "/v2/")
        target = Target("layerlog", settings.registry_url, settings.registry_url.split("//", 1)[1])
        await asyncio.sleep(SETTLE_SECONDS)
        warm = concurrent_files(work, base, f"warm-{replicas}", 2 * replicas)
        await push_many(binary, target, warm, f"warm-{replicas}")
        for path in warm:
            path.unlink()
        pids = {name: service.service_pid() for name, service in pipeline.services.items()}
        cpu = CpuSplit({**pids, **stack_pids()})
        for concurrency in levels:
            label = f"r{replicas}-c{concurrency}"
            files = concurrent_files(work, base, label, concurrency)
            size = sum(path.stat().st_size for path in files)
            cpu.reset()
            seconds = await push_many(binary, target, files, label)
            split = cpu.read()
            for path in files:
                path.unlink()
            busy = sum(split.values()) / (seconds * (os.cpu_count() or 1))
            workers = sum(v for k, v in split.items() if k.startswith("upload-worker"))
            point = {
                "replicas": replicas,
                "concurrency": concurrency,
                "mb_s": size / MB / seconds,
                "seconds": seconds,
                "cpu_busy": busy,
                "cpu_s": split,
                "worker_cpu_s": workers,
                "load": load_average(),
            }
            points.append(point)
            log(
                f"scaling {replicas} replica(s), {concurrency} pushes: {point['mb_s']:.1f} MB/s, "
                f"CPU {busy:.0%} of the machine, load {point['load']}"
            )
        pipeline.check_alive()
    finally:
        pipeline.stop()
        await pipeline.remove_data()
    return points


async def run(quick: bool = False) -> dict[str, Any]:
    binary = crane_binary()
    work = Path(tempfile.mkdtemp(prefix="scaling-bench-"))
    levels = QUICK_CONCURRENCY if quick else CONCURRENCY
    push_bytes = 2 * MIB if quick else PUSH_BYTES
    base = gzip_layer(push_bytes, seed=3)
    load_before = load_average()
    started = time.perf_counter()
    points = []
    for replicas in REPLICAS:
        points += await curve(binary, replicas, levels, base, work)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cores": os.cpu_count(),
        "push_bytes": len(base) + len(unique_suffix("x")),
        "partitions": PARTITIONS,
        "load_before": load_before,
        "load_after": load_average(),
        "minutes": (time.perf_counter() - started) / 60,
        "points": points,
    }


def table(result: dict[str, Any]) -> str:
    replicas = sorted({p["replicas"] for p in result["points"]})
    levels = sorted({p["concurrency"] for p in result["points"]})
    by = {(p["replicas"], p["concurrency"]): p for p in result["points"]}
    lines = [
        "| concurrent pushes | "
        + " | ".join(f"{r} replica{'s' if r > 1 else ''}: MB/s (CPU busy)" for r in replicas)
        + " |",
        "| ---: |" + " ---: |" * len(replicas),
    ]
    for level in levels:
        cells = []
        for r in replicas:
            point = by.get((r, level))
            cells.append(f"{point['mb_s']:.1f} ({point['cpu_busy']:.0%})" if point else "-")
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flattening(result: dict[str, Any]) -> str:
    """Where each curve stops growing: the first level past which throughput rises < 10%."""
    words = []
    for replicas in sorted({p["replicas"] for p in result["points"]}):
        points = sorted(
            (p for p in result["points"] if p["replicas"] == replicas),
            key=lambda p: p["concurrency"],
        )
        best = max(points, key=lambda p: p["mb_s"])
        flat = next(
            (
                p
                for p in points
                if all(
                    q["mb_s"] < p["mb_s"] * 1.1
                    for q in points
                    if q["concurrency"] > p["concurrency"]
                )
            ),
            points[-1],
        )
        words.append(
            f"{replicas} replica(s): flat from {flat['concurrency']} pushes at "
            f"{flat['mb_s']:.1f} MB/s (CPU {flat['cpu_busy']:.0%} busy), best "
            f"{best['mb_s']:.1f} MB/s at {best['concurrency']}"
        )
    return "; ".join(words) + "."


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 MiB pushes, 1, 4 and 16 at once")
    args = parser.parse_args()
    result = asyncio.run(run(args.quick))
    OUT.mkdir(parents=True, exist_ok=True)
    saved = OUT / f"scaling-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    saved.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(flattening(result))
    log(f"raw results: {saved}")


if __name__ == "__main__":
    main()
