"""Figure 5: reading a layer back through the query service against get_object from S3.

The whole-layer read goes through the SDK (fetch(), then read() in 1 MiB pieces); ranged reads
are plain HTTP GETs with a `Range: bytes=a-b` header for 1 MiB at a random offset, timed until
the last byte arrives. The baselines read a put_object copy of the same bytes with get_object.

Both ways the query service can answer are measured: streaming the bytes itself (the default),
and with LAYERLOG_BLOB_REDIRECT a 307 to a presigned S3 URL, which the client follows. The
second way runs in a second query service projecting the same events into an index of its own.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import aiohttp

from bench.common import (
    MIB,
    Context,
    get_object,
    in_thread,
    log,
    new_key,
    read_whole_layer,
    sdk_upload,
)
from bench.data import gzip_layer, sha256_digest, unique_suffix
from bench.stack import ServiceProcess, free_port, wait_for_query
from bench.stats import Figure, Target, percentile, throughput_mib_s
from services.client import LayerService
from services.core.settings import Settings

MODES = {"": "streamed by the query service", "_redirect": "307 to a presigned S3 URL"}


async def fetch(ctx: Context, layer: bytes | None = None) -> None:
    size = 32 * MIB if ctx.quick else 256 * MIB
    if layer is None or len(layer) < size:
        layer = await in_thread(gzip_layer, size)
    data = layer + unique_suffix("fetch")
    digest = await in_thread(sha256_digest, data)
    key = new_key("fetch")
    await in_thread(_put, ctx, key, data)
    ranged = 30 if ctx.quick else 100
    whole: dict[str, Figure] = {}
    p50: dict[str, Figure] = {}
    p99: dict[str, Figure] = {}
    for mode, how in MODES.items():
        whole[mode] = ctx.figure(
            Figure(
                f"fetch_whole{mode}",
                f"Fetch: GET of a {len(data) // MIB} MiB layer, {how}",
                "MiB/s",
                "get_object of the same bytes",
                target=Target("ratio", ">=", 0.8, ">= 0.8x"),
            )
        )
        for p, figures in ((50, p50), (99, p99)):
            figures[mode] = ctx.figure(
                Figure(
                    f"fetch_range{mode}_p{p}",
                    f"Fetch: ranged GET of 1 MiB at a random offset, {how}, p{p}",
                    "ms",
                    f"get_object of 1 MiB at a random offset, p{p}",
                    higher_is_better=False,
                )
            )
    rng = random.Random(5)
    async with ctx.service() as service:
        await sdk_upload(service, "bench/fetch", [data], len(data), digest)
    redirecting = _redirecting_settings(ctx)
    query = ServiceProcess("query", redirecting, ctx.work, profile_dir=None).start()
    try:
        await wait_for_query(redirecting)
        await _wait_until_known(redirecting, digest)
        for run in range(ctx.runs):
            for mode, settings in (("", ctx.settings), ("_redirect", redirecting)):
                async with LayerService(settings) as service:
                    started = time.perf_counter()
                    total = await read_whole_layer(service, "bench/fetch", digest)
                layerlog = throughput_mib_s(total, time.perf_counter() - started)
                seconds, read = await in_thread(get_object, ctx.minio, ctx.settings.bucket, key)
                baseline = throughput_mib_s(read, seconds)
                assert total == read == len(data), (total, read, len(data))
                whole[mode].add(layerlog, baseline)
                ours: list[float] = []
                theirs: list[float] = []
                url = f"{settings.query_url}/v2/bench/fetch/blobs/{digest}"
                async with aiohttp.ClientSession() as http:
                    for _ in range(ranged):
                        offset = rng.randrange(0, len(data) - MIB)
                        ours.append(await _ranged_get(http, url, offset) * 1000)
                        seconds, read = await in_thread(
                            get_object, ctx.minio, ctx.settings.bucket, key, offset, MIB
                        )
                        assert read == MIB
                        theirs.append(seconds * 1000)
                p50[mode].add(percentile(ours, 50), percentile(theirs, 50))
                p99[mode].add(percentile(ours, 99), percentile(theirs, 99))
                log(
                    f"fetch{mode} run {run + 1}: {layerlog:.0f} MiB/s vs get_object "
                    f"{baseline:.0f} MiB/s; 1 MiB range p50 {percentile(ours, 50):.1f} ms p99 "
                    f"{percentile(ours, 99):.1f} ms (get_object p50 {percentile(theirs, 50):.1f})"
                )
    finally:
        query.stop()


def _redirecting_settings(ctx: Context) -> Settings:
    port = free_port()
    return replace(
        ctx.settings,
        blob_redirect=True,
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
        index_path=str(ctx.work / "index-redirect.sqlite"),
    )


async def _wait_until_known(settings: Settings, digest: str, timeout: float = 120) -> None:
    """The second query service projects the events from the start: wait for the layer."""
    deadline = time.monotonic() + timeout
    async with LayerService(settings) as service:
        while not await service.exists("bench/fetch", digest):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the redirecting query service has no {digest}")
            await asyncio.sleep(0.2)


def _put(ctx: Context, key: str, data: bytes) -> None:
    import io

    ctx.minio.put_object(ctx.settings.bucket, key, io.BytesIO(data), len(data))


async def _ranged_get(http: aiohttp.ClientSession, url: str, offset: int) -> float:
    started = time.perf_counter()
    headers = {"Range": f"bytes={offset}-{offset + MIB - 1}"}
    async with http.get(url, headers=headers) as response:
        body = await response.read()
        if response.status != 206 or len(body) != MIB:
            raise RuntimeError(f"ranged GET answered {response.status} with {len(body)} bytes")
    return time.perf_counter() - started
