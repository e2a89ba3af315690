"""Where a small layer's commit latency goes: `python -m bench.timeline [UPLOADS] [SIZE_KIB]`.

Starts the three services on topics and a bucket of their own, pushes UPLOADS layers (default 30
of 64 KiB) through the SDK one at a time, each written 0.3 s after upload() so that StartUpload
is committed first, and times finish() from its call to its return. Then it reads every command
and event of those uploads back from Kafka (read_committed) and prints, per stage, the median
time from the finish() call to the record's timestamp (set by its producer when it was sent).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

from bench.data import sha256_digest
from bench.stack import OUT, Pipeline, delete_bucket, delete_topics, new_tag, run_settings
from services.client import LayerService
from services.core import kafka
from services.core.codec import CODEC
from services.core.principals import Principal
from services.core.settings import Settings

STAGES = ("AppendChunk", "FinishUpload", "ChunkAppended", "UploadFinished", "LayerCommitted")


async def push(settings: Settings, uploads: int, size: int) -> list[tuple[str, float, float]]:
    timed = []
    async with LayerService(settings) as service:
        for _ in range(uploads):
            data = os.urandom(size)
            upload = await service.upload("bench/timeline")
            await asyncio.sleep(0.3)
            await upload.write(data)
            called = time.time()
            await upload.finish(size, sha256_digest(data))
            timed.append((upload.uuid, called, time.time()))
    return timed


async def stamps(settings: Settings) -> dict[tuple[str, str], float]:
    """(upload id, record type) -> the record's Kafka timestamp in seconds."""
    consumer = kafka.consumer(
        settings, Principal.AUDITOR, [settings.commands_topic, settings.events_topic], None
    )
    await consumer.start()
    found: dict[tuple[str, str], float] = {}
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 3:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                quiet_since = time.monotonic()
                for record in records:
                    name = type(CODEC.decode(record.value)).__name__
                    found.setdefault((record.key.decode(), name), record.timestamp / 1000)
    finally:
        await consumer.stop()
    return found


async def main(uploads: int, size: int) -> None:
    work = OUT / f"timeline-{new_tag()}"
    work.mkdir(parents=True, exist_ok=True)
    settings = run_settings(work, new_tag())
    pipeline = await Pipeline(settings, work).start()
    try:
        timed = await push(settings, uploads, size)
        found = await stamps(settings)
    finally:
        pipeline.stop()
        await delete_topics(settings)
        await delete_bucket(settings)
    print(f"{uploads} uploads of {size // 1024} KiB; ms from the finish() call, median:")
    for stage in STAGES:
        delays = [
            (found[(u, stage)] - called) * 1000 for u, called, _ in timed if (u, stage) in found
        ]
        if delays:
            print(f"  {stage:15s} sent at {statistics.median(delays):6.1f}")
    returned = [(done - called) * 1000 for _, called, done in timed]
    print(f"  {'finish()':15s} returned at {statistics.median(returned):6.1f}")


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    kib = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    asyncio.run(main(count, kib * 1024))
