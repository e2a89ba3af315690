"""The registry's write path, measured: `python -m bench.registry_write`.

1. Commit latency of a 64 KiB blob pushed the common way (POST a session, PUT the bytes with the
   digest), p50 and p99 over 50, each timed from the POST to the PUT's 201.
2. The registry's peak RSS (VmHWM) over one streamed 1 GiB PATCH (chunked transfer encoding, no
   Content-Range): the body must pass through in a bounded window, not be buffered.
3. The same over 16 streamed PATCHes of 64 MiB at once: the window is the process's, not each
   request's.

Runs its own upload worker, verifier and registry on topics and a bucket of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from bench.stack import (
    Pipeline,
    free_port,
    new_tag,
    peak_rss_mib,
    run_settings,
    wait_for_url,
)

MIB = 1 << 20
ROUNDS = 50
STREAM_BYTES = 1 << 30
CONCURRENT_BYTES = 64 * MIB


async def commit_latencies(http: aiohttp.ClientSession) -> list[float]:
    seconds = []
    for round_ in range(ROUNDS):
        data = os.urandom(64 * 1024)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        started = time.perf_counter()
        async with http.post("/v2/bench/latency/blobs/uploads/") as response:
            assert response.status == 202, await response.text()
            location = response.headers["Location"]
        async with http.put(location, params={"digest": digest}, data=data) as response:
            assert response.status == 201, f"round {round_}: {await response.text()}"
        seconds.append(time.perf_counter() - started)
    return seconds


async def streamed_patch(http: aiohttp.ClientSession, size: int = STREAM_BYTES) -> float:
    piece = os.urandom(MIB)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // MIB):
            yield piece

    async with http.post("/v2/bench/stream/blobs/uploads/") as response:
        location = response.headers["Location"]
    started = time.perf_counter()
    async with http.patch(location, data=body()) as response:
        assert response.status == 202, await response.text()
        assert response.headers["Range"] == f"0-{size - 1}"
    return time.perf_counter() - started


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    port = free_port()
    settings = run_settings(
        work,
        new_tag(),
        registry_listen=f"127.0.0.1:{port}",
        registry_url=f"http://127.0.0.1:{port}",
        registry_index_path=str(work / "registry-index.sqlite"),
    )
    pipeline = Pipeline(settings, work, services=("upload-worker", "verifier", "registry"))
    await pipeline.start()
    try:
        await wait_for_url(settings.registry_url + "/v2/")
        registry_pid = pipeline.services["registry"].service_pid()
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(settings.registry_url, timeout=timeout) as http:
            latencies = sorted(await commit_latencies(http))
            before = peak_rss_mib(registry_pid)
            stream_seconds = await streamed_patch(http)
            after = peak_rss_mib(registry_pid)
            started = time.perf_counter()
            await asyncio.gather(*(streamed_patch(http, CONCURRENT_BYTES) for _ in range(16)))
            concurrent_seconds = time.perf_counter() - started
            after_concurrent = peak_rss_mib(registry_pid)
        pipeline.check_alive()
        result = {
            "commit_64k_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "commit_64k_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
            "commit_64k_max_ms": round(latencies[-1] * 1000, 1),
            "registry_vmhwm_before_stream_mib": round(before, 1),
            "registry_vmhwm_after_1gib_patch_mib": round(after, 1),
            "stream_1gib_seconds": round(stream_seconds, 1),
            "registry_vmhwm_after_16x64mib_patches_mib": round(after_concurrent, 1),
            "concurrent_16x64mib_seconds": round(concurrent_seconds, 1),
            "max_chunk_bytes": settings.max_chunk_bytes,
        }
        print(json.dumps(result, indent=2))
    finally:
        pipeline.stop()
        await pipeline.remove_data()


if __name__ == "__main__":
    asyncio.run(main())
