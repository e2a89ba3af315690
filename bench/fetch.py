"""Figure 5: reading a layer back through the query service against get_object from S3.

The whole-layer read goes through the SDK (fetch(), then read() in 1 MiB pieces); ranged reads
are plain HTTP GETs with a `Range: bytes=a-b` header for 1 MiB at a random offset, timed until
the last byte arrives. The baselines read a put_object copy of the same bytes with get_object.
"""

from __future__ import annotations

import random
import time

import aiohttp

from bench.common import MIB, Context, get_object, in_thread, log, new_key, sdk_upload
from bench.data import gzip_layer, sha256_digest, unique_suffix
from bench.stats import Figure, Target, percentile, throughput_mib_s


async def fetch(ctx: Context, layer: bytes | None = None) -> None:
    size = 32 * MIB if ctx.quick else 256 * MIB
    if layer is None or len(layer) < size:
        layer = await in_thread(gzip_layer, size)
    data = layer + unique_suffix("fetch")
    digest = await in_thread(sha256_digest, data)
    key = new_key("fetch")
    await in_thread(_put, ctx, key, data)
    ranged = 30 if ctx.quick else 100
    whole = ctx.figure(
        Figure(
            "fetch_whole",
            f"Fetch: GET of a {len(data) // MIB} MiB layer through the query service",
            "MiB/s",
            "get_object of the same bytes",
            target=Target("ratio", ">=", 0.8, ">= 0.8x"),
        )
    )
    p50 = ctx.figure(
        Figure(
            "fetch_range_p50",
            "Fetch: ranged GET of 1 MiB at a random offset, p50",
            "ms",
            "get_object of 1 MiB at a random offset, p50",
            higher_is_better=False,
        )
    )
    p99 = ctx.figure(
        Figure(
            "fetch_range_p99",
            "Fetch: ranged GET of 1 MiB at a random offset, p99",
            "ms",
            "get_object of 1 MiB at a random offset, p99",
            higher_is_better=False,
        )
    )
    rng = random.Random(5)
    async with ctx.service() as service:
        await sdk_upload(service, "bench/fetch", [data], len(data), digest)
        url = f"{ctx.settings.query_url}/v2/bench/fetch/blobs/{digest}"
        async with aiohttp.ClientSession() as http:
            for run in range(ctx.runs):
                started = time.perf_counter()
                total = await _read_layer(service, digest)
                layerlog = throughput_mib_s(total, time.perf_counter() - started)
                seconds, read = await in_thread(get_object, ctx.minio, ctx.settings.bucket, key)
                baseline = throughput_mib_s(read, seconds)
                assert total == read == len(data), (total, read, len(data))
                whole.add(layerlog, baseline)
                ours: list[float] = []
                theirs: list[float] = []
                for _ in range(ranged):
                    offset = rng.randrange(0, len(data) - MIB)
                    ours.append(await _ranged_get(http, url, offset) * 1000)
                    seconds, read = await in_thread(
                        get_object, ctx.minio, ctx.settings.bucket, key, offset, MIB
                    )
                    assert read == MIB
                    theirs.append(seconds * 1000)
                p50.add(percentile(ours, 50), percentile(theirs, 50))
                p99.add(percentile(ours, 99), percentile(theirs, 99))
                log(
                    f"fetch run {run + 1}: {layerlog:.0f} MiB/s vs get_object {baseline:.0f} MiB/s;"
                    f" 1 MiB range p50 {percentile(ours, 50):.1f} ms p99 "
                    f"{percentile(ours, 99):.1f} ms (get_object p50 {percentile(theirs, 50):.1f})"
                )


def _put(ctx: Context, key: str, data: bytes) -> None:
    import io

    ctx.minio.put_object(ctx.settings.bucket, key, io.BytesIO(data), len(data))


async def _read_layer(service: object, digest: str) -> int:
    from services.client import LayerService

    assert isinstance(service, LayerService)
    layer = await service.fetch("bench/fetch", digest)
    total = 0
    try:
        while chunk := await layer.read(MIB):
            total += len(chunk)
    finally:
        await layer.close()
    return total


async def _ranged_get(http: aiohttp.ClientSession, url: str, offset: int) -> float:
    started = time.perf_counter()
    headers = {"Range": f"bytes={offset}-{offset + MIB - 1}"}
    async with http.get(url, headers=headers) as response:
        body = await response.read()
        if response.status != 206 or len(body) != MIB:
            raise RuntimeError(f"ranged GET answered {response.status} with {len(body)} bytes")
    return time.perf_counter() - started
