"""Layerlog's registry against CNCF Distribution on the same S3 server: `python -m bench.versus`.

Three figures, each from the same client against both registries, runs interleaved (Layerlog,
Distribution, Layerlog, ...) so a slow spell of the shared machine falls on both:
  push   `crane append` of one 256 MiB gzip layer onto an empty image, timed until crane returns
         (the manifest PUT answered); MB/s of the layer's bytes
  pull   `crane blob` of that layer to a file; MB/s
  commit a 64 KiB blob, monolithic (POST a session, PUT the bytes with the digest), p50 and p99
         over 50 with aiohttp
Each push uses bytes of its own (a unique gzip member appended), because both registries skip
a blob they already hold. Writes bench/out/versus-*.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from bench.common import load_average, log
from bench.data import MIB, gzip_layer, unique_suffix
from bench.peer import Distribution
from bench.stack import OUT, ROOT, Pipeline, free_port, new_tag, run_settings, wait_for_url

LAYER_BYTES = 256 * MIB
BLOB_BYTES = 64 * 1024
ROUNDS = 50
MB = 1_000_000  # MB/s in decimal megabytes, as crane and most tools print them
# digest -> size of the pushed file, to check each pull got the whole layer.
LAYER_BYTES_ON_DISK: dict[str, int] = {}


@dataclass
class Target:
    name: str
    url: str  # http://host:port
    host: str  # host:port, the way crane names a registry


def crane_binary() -> str:
    done = subprocess.run(
        [str(ROOT / "deploy" / "clients"), "which", "crane"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or "deploy/clients which crane failed")
    return done.stdout.strip()


def crane(binary: str, *args: str, stdout: Any = subprocess.DEVNULL) -> float:
    """Runs crane and returns its wall time; crane's own startup is part of what a user waits."""
    started = time.perf_counter()
    done = subprocess.run(
        [binary, *args, "--insecure"], stdout=stdout, stderr=subprocess.PIPE, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"crane {' '.join(args)} failed: {done.stderr.decode()[-2000:]}")
    return seconds


def layer_file(work: Path, base: bytes, label: str) -> tuple[Path, str]:
    """The base layer plus a unique gzip member, on disk for crane; its digest, computed here
    so neither registry's figure includes it."""
    data = base + unique_suffix(label)
    path = work / f"layer-{label}.tar.gz"
    path.write_bytes(data)
    return path, "sha256:" + hashlib.sha256(data).hexdigest()


def push(binary: str, target: Target, path: Path, tag: str) -> float:
    return crane(binary, "append", "-f", str(path), "-t", f"{target.host}/bench/versus:{tag}")


def pull(binary: str, target: Target, digest: str, work: Path) -> float:
    out = work / "pulled.tar.gz"
    with out.open("wb") as sink:
        seconds = crane(binary, "blob", f"{target.host}/bench/versus@{digest}", stdout=sink)
    size = out.stat().st_size
    out.unlink()
    if size != LAYER_BYTES_ON_DISK[digest]:
        raise RuntimeError(f"{target.name}: pulled {size} bytes of {digest}")
    return seconds


def with_digest(location: str, digest: str) -> str:
    # Distribution's Location already carries a query (_state); Layerlog's may not.
    return location + ("&" if "?" in location else "?") + "digest=" + digest


async def commit_latencies(target: Target) -> list[float]:
    """POST then monolithic PUT of a fresh 64 KiB blob, timed from the POST to the PUT's 201."""
    seconds = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for round_ in range(ROUNDS):
            data = os.urandom(BLOB_BYTES)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            started = time.perf_counter()
            async with http.post(target.url + "/v2/bench/latency/blobs/uploads/") as response:
                assert response.status == 202, await response.text()
                # Location may be absolute (Distribution) or a path (Layerlog).
                location = str(response.url.join(URL(response.headers["Location"])))
            async with http.put(with_digest(location, digest), data=data) as response:
                assert response.status == 201, f"round {round_}: {await response.text()}"
            seconds.append(time.perf_counter() - started)
    return sorted(seconds)


async def blob_get_status(target: Target, digest: str) -> int:
    """The status of a blob GET not followed: 307 means the pull read S3 directly, 200 that the
    registry streamed the bytes itself. Recorded so the pull figure says which path it measured."""
    async with aiohttp.ClientSession() as http:
        url = f"{target.url}/v2/bench/versus/blobs/{digest}"
        async with http.get(url, allow_redirects=False) as response:
            return response.status


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[int(fraction * (len(sorted_values) - 1))]


async def run(runs: int) -> dict[str, Any]:
    binary = crane_binary()
    work = Path(tempfile.mkdtemp(prefix="versus-bench-"))
    log(f"building a {LAYER_BYTES // MIB} MiB gzip layer (cached in bench/out/)")
    base = gzip_layer(LAYER_BYTES)
    tag = new_tag()
    port = free_port()
    settings = run_settings(
        work,
        tag,
        registry_listen=f"127.0.0.1:{port}",
        registry_url=f"http://127.0.0.1:{port}",
        registry_index_path=str(work / "registry-index.sqlite"),
    )
    pipeline = Pipeline(settings, work, services=("upload-worker", "verifier", "registry"))
    peer = Distribution(settings, tag)
    figures: dict[str, dict[str, list[float]]] = {
        name: {"push_s": [], "pull_s": [], "commit_p50_ms": [], "commit_p99_ms": []}
        for name in ("layerlog", "distribution")
    }
    blob_get: dict[str, int] = {}
    load_before = load_average()
    try:
        await pipeline.start()
        await wait_for_url(settings.registry_url + "/v2/")
        await peer.start()
        targets = [
            Target("layerlog", settings.registry_url, settings.registry_url.split("//", 1)[1]),
            Target("distribution", peer.url, peer.host),
        ]
        for number in range(runs):
            for target in targets:
                label = f"{target.name}-{number}"
                path, digest = layer_file(work, base, label)
                LAYER_BYTES_ON_DISK[digest] = path.stat().st_size
                pushed = push(binary, target, path, label)
                path.unlink()
                pulled = pull(binary, target, digest, work)
                blob_get[target.name] = await blob_get_status(target, digest)
                latencies = await commit_latencies(target)
                figure = figures[target.name]
                figure["push_s"].append(pushed)
                figure["pull_s"].append(pulled)
                figure["commit_p50_ms"].append(statistics.median(latencies) * 1000)
                figure["commit_p99_ms"].append(percentile(latencies, 0.99) * 1000)
                log(
                    f"run {number + 1}/{runs} {target.name}: push {pushed:.2f} s, "
                    f"pull {pulled:.2f} s, commit p50 {figure['commit_p50_ms'][-1]:.1f} ms "
                    f"p99 {figure['commit_p99_ms'][-1]:.1f} ms"
                )
            pipeline.check_alive()
            if not peer.alive():
                raise RuntimeError(f"Distribution exited; its log ends:\n{peer.tail()}")
    finally:
        load_after = load_average()
        pipeline.stop()
        peer.stop()
        await pipeline.remove_data()
        await peer.remove_data()
    size = len(base) + len(unique_suffix("x"))
    summary: dict[str, dict[str, float]] = {}
    for name, figure in figures.items():
        summary[name] = {
            "push_mb_s": size / MB / statistics.median(figure["push_s"]),
            "pull_mb_s": size / MB / statistics.median(figure["pull_s"]),
            "commit_p50_ms": statistics.median(figure["commit_p50_ms"]),
            "commit_p99_ms": statistics.median(figure["commit_p99_ms"]),
        }
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_before": load_before,
        "load_after": load_after,
        "runs": runs,
        "layer_bytes": size,
        "blob_bytes": BLOB_BYTES,
        "commit_rounds": ROUNDS,
        "layerlog_blob_redirect": settings.blob_redirect,
        "blob_get_status": blob_get,
        "raw": figures,
        "summary": summary,
    }


def table(result: dict[str, Any]) -> str:
    layerlog, peer = result["summary"]["layerlog"], result["summary"]["distribution"]
    rows = [
        ("Push 256 MiB layer (`crane append`)", "push_mb_s", "MB/s"),
        ("Pull that layer (`crane blob`)", "pull_mb_s", "MB/s"),
        ("Commit 64 KiB blob, p50", "commit_p50_ms", "ms"),
        ("Commit 64 KiB blob, p99", "commit_p99_ms", "ms"),
    ]
    lines = [
        "| Figure | Layerlog | Distribution | Layerlog / Distribution |",
        "|---|---:|---:|---:|",
    ]
    for label, key, unit in rows:
        lines.append(
            f"| {label} | {layerlog[key]:.1f} {unit} | {peer[key]:.1f} {unit} "
            f"| {layerlog[key] / peer[key]:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per registry (median taken)")
    args = parser.parse_args()
    result = asyncio.run(run(args.runs))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"versus-{int(time.time())}.json"
    path.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(
        f"\nload average before {result['load_before']}, after {result['load_after']}; "
        f"{result['machine']}; {result['runs']} runs each; blob GET status (unfollowed) "
        f"{result['blob_get_status']}; JSON in {path.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
