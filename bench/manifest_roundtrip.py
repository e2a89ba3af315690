"""`python -m bench.manifest_roundtrip [N]`: the upload worker's PutManifest round trip.

Each of N PutManifest commands (to one tag of one repository, one at a time) is timed from
just before it is produced until a read_committed consumer has both its ManifestStored and its
TagMoved. The worker runs as its own process on topics and a bucket of their own, removed at
the end; the stack must be up. Prints each time and the median.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.stack import Pipeline, new_tag, run_settings
from services.core.codec import CODEC
from services.core.eventlog import partition_for
from services.core.kafka import connection
from services.core.principals import Principal
from services.core.records import ManifestStored, PutManifest, TagMoved
from services.oci.manifest import OCI_MANIFEST
from tests.repository_log import image_manifest, sha256

REPOSITORY = "bench/roundtrip"


async def measure(count: int) -> list[float]:
    with tempfile.TemporaryDirectory() as work:
        settings = run_settings(Path(work), new_tag())
        pipeline = await Pipeline(settings, Path(work), services=("upload-worker",)).start()
        producer = AIOKafkaProducer(**connection(settings, Principal.CLIENT), acks="all")
        consumer = AIOKafkaConsumer(
            **connection(settings, Principal.AUDITOR),
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        await producer.start()
        await consumer.start()
        try:
            await consumer._client.add_topic(settings.events_topic)
            while not (partitions := consumer.partitions_for_topic(settings.events_topic)):
                await consumer._client.force_metadata_update()
            tp = TopicPartition(settings.events_topic, partition_for(REPOSITORY, len(partitions)))
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            await consumer.position(tp)  # resolved now, before the first command is produced
            times = []
            # One more than asked: the first also waits for the worker to join its group.
            for n in range(count + 1):
                body = image_manifest(f"roundtrip-{n}")
                command = PutManifest(
                    repository=REPOSITORY,
                    reference="latest",
                    digest=sha256(body),
                    media_type=OCI_MANIFEST,
                    body=body,
                )
                started = time.perf_counter()
                await producer.send_and_wait(
                    settings.commands_topic, CODEC.encode(command), key=REPOSITORY.encode()
                )
                await _both_events(consumer, command.command_id)
                times.append(time.perf_counter() - started)
                pipeline.check_alive()
            return times[1:]
        finally:
            await consumer.stop()
            await producer.stop()
            pipeline.stop()
            await pipeline.remove_data()


async def _both_events(consumer: AIOKafkaConsumer, command_id: str) -> None:
    seen: set[type] = set()
    while seen != {ManifestStored, TagMoved}:
        for messages in (await consumer.getmany(timeout_ms=1000)).values():
            for message in messages:
                event = CODEC.decode(message.value or b"")
                if getattr(event, "caused_by", None) == command_id:
                    seen.add(type(event))


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 20
    times = asyncio.run(measure(count))
    for n, seconds in enumerate(times, 1):
        print(f"{n:3d} {seconds * 1000:8.1f} ms")
    print(
        f"PutManifest round trip, median of {len(times)}: "
        f"{statistics.median(times) * 1000:.1f} ms "
        f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
