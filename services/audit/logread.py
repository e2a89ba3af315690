"""Reading parts of a topic back: offset ranges of some partitions, filtered before decoding.

The audit tools read logs that grow forever (events) or carry megabytes per record (commands
with chunk bytes). So they read only the offset ranges they need, and they look at the key (or
the raw bytes) before decoding anything: a record of another upload costs its transfer, not its
decoding.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.core.kafka import MAX_RECORD_BYTES, connection, topic_partitions
from services.core.principals import Principal
from services.core.settings import Settings

# Raised when a range cannot be read to its end (a transaction stays open longer than this).
READ_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes


Keep = Callable[[bytes | None, bytes], bool]


class LogReader:
    """Reads of one topic through one consumer (no group, nothing committed):
    `async with LogReader(settings, topic) as reader`.

    One topic per reader because the consumer's client keeps metadata only for the topics it
    tracks, and assign() narrows those to the assigned partitions' topics: a reader shared by
    two topics would lose the other topic's partitions and leaders at the next refresh.
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            # The audit tools' reader: read-only on every topic.
            **connection(settings, Principal.AUDITOR),
            enable_auto_commit=False,
            # Only what committed transactions wrote: the log as the services' readers see it.
            isolation_level="read_committed",
            # A seek below the log start (retention deleted it) resumes at the oldest record.
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=MAX_RECORD_BYTES,
            fetch_max_bytes=2 * MAX_RECORD_BYTES,
        )

    async def __aenter__(self) -> LogReader:
        # Offset requests for a topic the consumer does not track yet make it fetch the topic's
        # metadata and retry, so nothing needs tracking here.
        await self.consumer.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.consumer.stop()

    async def partitions(self) -> list[int]:
        return await topic_partitions(self.settings, Principal.AUDITOR, self.topic)

    async def bounds(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        """Per partition, (first offset still kept, end offset of committed records)."""
        tps = [TopicPartition(self.topic, p) for p in partitions]
        first = await self.consumer.beginning_offsets(tps)
        last = await self.consumer.end_offsets(tps)
        return {tp.partition: (first[tp], last[tp]) for tp in tps}

    async def offset_at(self, partition: int, moment_ms: int) -> int | None:
        """The first offset whose timestamp is at or after moment_ms; None when there is none."""
        tp = TopicPartition(self.topic, partition)
        found = await self.consumer.offsets_for_times({tp: max(0, moment_ms)})
        at = found.get(tp)
        return None if at is None else at.offset

    async def read(
        self, ranges: dict[int, tuple[int, int]], keep: Keep
    ) -> AsyncIterator[RawRecord]:
        """Records with start <= offset < end of each partition's (start, end), in offset order
        within a partition, that keep(key, value) accepts."""
        topic = self.topic
        remaining = {
            TopicPartition(topic, p): end for p, (start, end) in ranges.items() if end > start
        }
        if not remaining:
            return
        self.consumer.assign(list(remaining))
        for tp in remaining:
            self.consumer.seek(tp, ranges[tp.partition][0])
        idle_since = asyncio.get_running_loop().time()
        while remaining:
            batch = await self.consumer.getmany(*remaining, timeout_ms=500)
            if batch:
                idle_since = asyncio.get_running_loop().time()
            for tp, messages in batch.items():
                end = remaining.get(tp)
                if end is None:
                    continue
                for message in messages:
                    if message.offset >= end:
                        break
                    value = message.value or b""
                    if keep(message.key, value):
                        yield RawRecord(
                            topic,
                            tp.partition,
                            message.offset,
                            message.timestamp,
                            message.key,
                            value,
                        )
            for tp in list(remaining):
                # The position passes commit markers and aborted records too, so it reaches the
                # end even when the last records are not data.
                if await self.consumer.position(tp) >= remaining[tp]:
                    self.consumer.pause(tp)
                    del remaining[tp]
            if remaining and asyncio.get_running_loop().time() - idle_since > READ_TIMEOUT_SECONDS:
                stuck = ", ".join(f"{tp.partition}" for tp in remaining)
                raise TimeoutError(f"{topic}: partitions {stuck} stopped short of their end")


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)
