"""Reading the log back: one upload's records, found in the one partition its key maps to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from services.core.codec import CODEC, DecodeError
from services.core.kafka import connection, topic_partitions
from services.core.principals import Principal
from services.core.settings import Settings

_PARTITIONER = DefaultPartitioner()


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as in the Java client) picks."""
    every = list(range(partitions))
    return _PARTITIONER(key.encode(), every, every)


@dataclass(frozen=True)
class LoggedRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    record: Any  # a records.* dataclass, or None when the bytes do not decode
    raw: bytes
    key: bytes | None = None


async def read_partition(
    settings: Settings, topic: str, partition: int, *, start: int = 0, end: int | None = None
) -> AsyncIterator[LoggedRecord]:
    """Every committed record of one partition from start up to (not including) end or the
    end of the log as it was when reading began."""
    consumer = AIOKafkaConsumer(
        # Reading the log back is auditing it: as the read-only auditor.
        **connection(settings, Principal.AUDITOR),
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=70 << 20,
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        last = (await consumer.end_offsets([tp]))[tp] if end is None else end
        consumer.seek(tp, start)
        while await consumer.position(tp) < last:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for message in batch.get(tp, []):
                if message.offset >= last:
                    return
                try:
                    record = CODEC.decode(message.value or b"")
                except DecodeError:
                    record = None
                yield LoggedRecord(
                    topic,
                    partition,
                    message.offset,
                    message.timestamp,
                    record,
                    message.value or b"",
                    message.key,
                )
    finally:
        await consumer.stop()


async def upload_records(settings: Settings, topic: str, upload_id: str) -> list[LoggedRecord]:
    """The records of one upload in one topic, in log order: those keyed by its id. A
    repository's records that name the upload (BlobLinked) are keyed by the repository, and share
    the partition only when the two keys hash alike, so the key, not the field, decides."""
    partitions = await topic_partitions(settings, Principal.AUDITOR, topic)
    partition = partition_for(upload_id, len(partitions))
    key = upload_id.encode()
    return [
        logged
        async for logged in read_partition(settings, topic, partition)
        if logged.record is not None and logged.key == key
    ]
