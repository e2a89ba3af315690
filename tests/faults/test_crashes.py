"""kill -9 of each service at random moments during 50 concurrent uploads: nothing lost, nothing
committed twice, nothing left staged, and the index equals a replay of the log."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from services.client import LayerError, LayerInvalidDigest, LayerService
from tests.faults.audit import Outcomes, assert_consistent
from tests.layers import random_gzip_layer, uneven_pieces

UPLOADS = 50
MIB = 1 << 20


async def run_uploads(settings, seed: int, outcomes: Outcomes, count: int = UPLOADS) -> None:
    rng = random.Random(seed)
    services = [
        LayerService(settings, chunk_size=size, finish_timeout=240)
        for size in (64 * 1024, 300 * 1024, MIB)
    ]
    for service in services:
        await service.start()
    limit = asyncio.Semaphore(count)

    async def one(number: int) -> None:
        async with limit:
            service = services[number % len(services)]
            data = await asyncio.to_thread(
                random_gzip_layer, seed * 1000 + number, rng.randint(MIB, 20 * MIB)
            )
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            upload = await service.upload(f"faults/app-{number % 7}")
            for piece in uneven_pieces(data, seed + number, 1000, 700_000):
                await upload.write(piece)
            if number % 10 == 3:
                await upload.cancel()
                outcomes.cancelled.add(upload.uuid)
            elif number % 10 == 7:
                with pytest.raises(LayerInvalidDigest):
                    await upload.finish(len(data), "sha256:" + "0" * 64)
                outcomes.failed.add(upload.uuid)
            else:
                layer = await upload.finish(len(data), digest)
                assert layer.size == len(data)
                outcomes.committed[upload.uuid] = (upload.name, digest, digest.split(":")[1])

    try:
        await asyncio.gather(*(one(n) for n in range(count)))
    finally:
        for service in services:
            await service.close()


@pytest.mark.timeout(900)
async def test_kill_9_each_service_during_concurrent_uploads(
    pipeline, fault_settings, fault_store, tmp_path
):
    rng = random.Random(20261127)
    outcomes = Outcomes()
    uploads = asyncio.create_task(run_uploads(fault_settings, 7, outcomes))
    killed = []
    for name in ("upload-worker", "verifier", "query"):
        await asyncio.sleep(rng.uniform(1.0, 5.0))
        if uploads.done():
            break
        pipeline[name].kill()
        killed.append(name)
        await asyncio.sleep(rng.uniform(0.1, 1.0))
        pipeline[name].start()
    try:
        await uploads
    except LayerError:
        print(pipeline.logs())
        raise
    assert killed == ["upload-worker", "verifier", "query"], "uploads ended before the kills"
    assert len(outcomes.committed) == 40 and len(outcomes.cancelled) == 5
    await assert_consistent(fault_settings, fault_store, outcomes, tmp_path)
