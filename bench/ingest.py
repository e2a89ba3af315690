"""Figures 1 and 2: ingest through the SDK against minio's put_object to the same S3 server.

A Layerlog upload is timed from upload() to finish()'s return, that is until the layer is
committed (staged, verified, indexed) and visible to exists(). The baseline is put_object of the
same bytes: what storing them costs on this machine without any of those guarantees.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import MIB, Context, in_thread, log, put_object, sdk_upload
from bench.data import blob_pool, distinct_blob, gzip_layer, sha256_digest, unique_suffix
from bench.stats import Figure, Target, throughput_mib_s


async def single_stream(ctx: Context) -> bytes:
    """Figure 1; returns the layer (the fetch figure reads the same bytes back)."""
    size = 32 * MIB if ctx.quick else 256 * MIB
    layer = await in_thread(gzip_layer, size)
    figure = ctx.figure(
        Figure(
            "ingest_single",
            f"Ingest, one stream: one {size // MIB} MiB gzip layer (write, finish, committed)",
            "MiB/s",
            "minio put_object, same bytes",
            target=Target("ratio", ">=", 0.5, ">= 0.5x"),
        )
    )
    async with ctx.service() as service:
        for run in range(ctx.runs):
            suffix = unique_suffix(f"single-{run}")
            data = layer + suffix  # one copy, outside the timed region
            digest = await in_thread(sha256_digest, data)

            # Alternate which goes first, so neither always gets the quieter moment.
            value = base = 0.0
            for turn in (run % 2, 1 - run % 2):
                if turn == 0:
                    seconds, _ = await sdk_upload(
                        service, "bench/ingest", [data], len(data), digest
                    )
                    value = throughput_mib_s(len(data), seconds)
                else:
                    seconds = await in_thread(put_object, ctx.minio, ctx.settings.bucket, data)
                    base = throughput_mib_s(len(data), seconds)
            figure.add(value, base)
            log(f"ingest_single run {run + 1}: {value:.1f} MiB/s vs put_object {base:.1f} MiB/s")
    return layer


async def concurrent_uploads(
    ctx: Context, count: int, size: int, pool: bytes, label: str, chunk_size: int | None = None
) -> tuple[float, float]:
    """(Layerlog MiB/s, put_object MiB/s) for `count` simultaneous uploads of `size` bytes."""
    blobs = [distinct_blob(pool, index, size) for index in range(count)]
    digests = [sha256_digest(blob) for blob in blobs]
    async with ctx.service(chunk_size=chunk_size) as service:
        started = time.perf_counter()
        await asyncio.gather(
            *(
                sdk_upload(service, f"bench/{label}", [blob], size, digest)
                for blob, digest in zip(blobs, digests, strict=True)
            )
        )
        layerlog = throughput_mib_s(count * size, time.perf_counter() - started)
    # Fresh bytes for the baseline too (S3 does not care, but the comparison stays like for like).
    blobs = [distinct_blob(pool, index, size) for index in range(count)]

    def put_all() -> float:
        with ThreadPoolExecutor(max_workers=count) as threads:
            started = time.perf_counter()
            list(threads.map(lambda blob: put_object(ctx.minio, ctx.settings.bucket, blob), blobs))
            return throughput_mib_s(count * size, time.perf_counter() - started)

    baseline = await in_thread(put_all)
    return layerlog, baseline


async def concurrent(ctx: Context) -> None:
    """Figure 2 and its two sweeps (plots: throughput by chunk size and by concurrency)."""
    count, size = (8, 8 * MIB) if ctx.quick else (32, 8 * MIB)
    pool = await in_thread(blob_pool, 64 * MIB * (1 if ctx.quick else 8))
    figure = ctx.figure(
        Figure(
            "ingest_concurrent",
            f"Ingest, concurrent: {count} uploads of {size // MIB} MiB at once",
            "MiB/s",
            f"{count} concurrent minio put_object calls",
            target=Target("ratio", ">=", 0.5, ">= 0.5x"),
        )
    )
    for run in range(ctx.runs):
        value, base = await concurrent_uploads(ctx, count, size, pool, "concurrent")
        figure.add(value, base)
        log(f"ingest_concurrent run {run + 1}: {value:.1f} MiB/s vs put_object {base:.1f} MiB/s")

    # Sweeps: one pass each (a point per setting), for the shape of the curves.
    layer_size = 16 * MIB if ctx.quick else 32 * MIB
    chunk_sizes = (
        [64 << 10, 1 * MIB, 8 * MIB]
        if ctx.quick
        else [
            64 << 10,
            256 << 10,
            1 * MIB,
            4 * MIB,
            8 * MIB,
        ]
    )
    by_chunk: list[dict[str, float]] = []
    for chunk in chunk_sizes:
        value, base = await concurrent_uploads(ctx, 1, layer_size, pool, "chunks", chunk)
        by_chunk.append({"chunk_size": chunk, "layerlog": value, "baseline": base})
        log(f"chunk size {chunk >> 10} KiB: {value:.1f} MiB/s vs put_object {base:.1f} MiB/s")
    concurrency = [1, 4, 16] if ctx.quick else [1, 2, 4, 8, 16, 32, 64]
    by_concurrency: list[dict[str, float]] = []
    for uploads in concurrency:
        value, base = await concurrent_uploads(ctx, uploads, 8 * MIB, pool, "concurrency")
        by_concurrency.append({"concurrency": uploads, "layerlog": value, "baseline": base})
        log(f"concurrency {uploads}: {value:.1f} MiB/s vs put_object {base:.1f} MiB/s")
    ctx.series["ingest_chunk_size"] = {"layer_size": layer_size, "points": by_chunk}
    ctx.series["ingest_concurrency"] = {"upload_size": 8 * MIB, "points": by_concurrency}
