"""Consume, apply, publish: the loop the upload worker and the verifier share.

Each batch of input records is applied (the effects on object storage are idempotent, so applying
a record twice changes nothing), then the resulting records and the input offsets are committed in
one Kafka transaction. A crash anywhere before that commit replays the batch; a crash after it
never does. So every input record's outputs appear exactly once in the read_committed log.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from services.core import kafka
from services.core.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 10.0


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes


Handler = Callable[[ConsumerRecord], Awaitable[list[Output]]]


class TransientError(Exception):
    """An effect failed for a reason that passes (a server down); the record is retried."""


def backoff(attempt: int) -> float:
    """Capped exponential backoff with jitter, so replicas do not retry in lockstep."""
    ceiling = min(MAX_BACKOFF_SECONDS, 0.1 * 2**attempt)
    return ceiling / 2 + random.random() * ceiling / 2


class _Revocations(ConsumerRebalanceListener):
    def __init__(self, name: str, on_revoked: Callable[[set[TopicPartition]], None]) -> None:
        self.name = name
        self.on_revoked = on_revoked

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        partitions = sorted(tp.partition for tp in assigned)
        log.info("%s: assigned partitions %s", self.name, partitions)


class Processor:
    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        instance_id: str,
        input_topic: str,
        group_id: str,
        handle: Handler,
        is_transient: Callable[[BaseException], bool],
        on_error: Callable[[ConsumerRecord, Exception], list[Output]],
        on_revoked: Callable[[set[TopicPartition]], None] = lambda _: None,
        max_records: int = 200,
    ) -> None:
        self.settings = settings
        self.name = name
        # A stable transactional id lets a restarted instance fence its dead predecessor and abort
        # its open transaction at once, instead of read_committed readers waiting for a timeout.
        self.transactional_id = f"layerlog-{name}-{instance_id}"
        self.input_topic = input_topic
        self.group_id = group_id
        self.handle = handle
        self.is_transient = is_transient
        self.on_error = on_error
        self.listener = _Revocations(name, on_revoked)
        self.max_records = max_records
        self.batches = 0

    async def run(self, stop: asyncio.Event) -> None:
        consumer = kafka.consumer(self.settings, [], self.group_id)
        consumer.subscribe([self.input_topic], listener=self.listener)
        producer = self._producer()
        await start_with_retry(consumer.start, f"{self.name} consumer")
        await start_with_retry(producer.start, f"{self.name} producer")
        log.info("%s: consuming %s as %s", self.name, self.input_topic, self.transactional_id)
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
                if not batch:
                    continue
                outputs = await self._apply(batch, stop)
                if outputs is None:  # stopping mid-batch: nothing committed, the batch replays
                    break
                producer = await self._publish(consumer, producer, batch, outputs)
                self.batches += 1
        finally:
            await producer.stop()
            await consumer.stop()

    def _producer(self):  # type: ignore[no-untyped-def]
        return kafka.producer(
            self.settings, transactional_id=self.transactional_id, transaction_timeout_ms=30_000
        )

    async def _apply(
        self, batch: dict[TopicPartition, list[ConsumerRecord]], stop: asyncio.Event
    ) -> list[Output] | None:
        async def partition(records: list[ConsumerRecord]) -> list[Output] | None:
            produced: list[Output] = []
            for record in records:
                result = await self._apply_one(record, stop)
                if result is None:
                    return None
                produced += result
            return produced

        # Partitions are independent (an upload lives in one), so they are applied concurrently;
        # within a partition, order is the upload's order.
        results = await asyncio.gather(*(partition(records) for records in batch.values()))
        if any(result is None for result in results):
            return None
        return [output for result in results for output in result or []]

    async def _apply_one(self, record: ConsumerRecord, stop: asyncio.Event) -> list[Output] | None:
        attempt = 0
        while True:
            try:
                return await self.handle(record)
            except Exception as error:
                if not self.is_transient(error):
                    # A bug must not stop the partition behind this record: keep the record
                    # (the caller dead-letters it) and go on.
                    log.exception(
                        "%s: cannot apply %s[%d]@%d",
                        self.name,
                        record.topic,
                        record.partition,
                        record.offset,
                    )
                    return self.on_error(record, error)
                if stop.is_set():
                    return None
                attempt += 1
                delay = backoff(attempt)
                log.warning(
                    "%s: %s at %s[%d]@%d; retrying in %.1fs",
                    self.name,
                    error,
                    record.topic,
                    record.partition,
                    record.offset,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _publish(self, consumer, producer, batch, outputs):  # type: ignore[no-untyped-def]
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
        attempt = 0
        while True:
            try:
                async with producer.transaction():
                    sends = [
                        await producer.send(out.topic, out.value, key=out.key) for out in outputs
                    ]
                    await producer.send_offsets_to_transaction(offsets, self.group_id)
                await asyncio.gather(*sends)
                return producer
            except KafkaError as error:
                attempt += 1
                delay = backoff(attempt)
                log.warning(
                    "%s: transaction failed (%r); retrying in %.1fs", self.name, error, delay
                )
                # The producer may be in an unusable state after a failed transaction; a new one
                # with the same transactional id aborts what the old one left open.
                await _stop_quietly(producer)
                await asyncio.sleep(delay)
                producer = self._producer()
                await start_with_retry(producer.start, f"{self.name} producer")
                if not consumer.assignment().issuperset(offsets):
                    # We lost partitions during the outage: their new owner replays the batch.
                    log.warning(
                        "%s: partitions moved during the outage; batch left to them", self.name
                    )
                    for tp in consumer.assignment() & set(offsets):
                        consumer.seek(tp, batch[tp][0].offset)
                    return producer


async def _stop_quietly(producer) -> None:  # type: ignore[no-untyped-def]
    try:
        await producer.stop()
    except Exception as error:
        log.debug("ignored while stopping a failed producer: %r", error)


async def start_with_retry(start: Callable[[], Awaitable[None]], what: str) -> None:
    attempt = 0
    while True:
        try:
            await start()
            return
        except (KafkaError, OSError) as error:
            attempt += 1
            delay = backoff(attempt)
            log.warning("%s: cannot reach Kafka (%r); retrying in %.1fs", what, error, delay)
            await asyncio.sleep(delay)


def dead_letter(topic: str, record: ConsumerRecord, reason: str, detail: str) -> Output:
    """Keeps a record that cannot be applied, byte for byte, with the reason."""
    from services.core.codec import CODEC
    from services.core.records import DeadLetter

    log.warning(
        "dead-lettered %s[%d]@%d: %s", record.topic, record.partition, record.offset, detail
    )
    letter = DeadLetter(
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        key=record.key,
        reason=reason,
        detail=detail,
        original=record.value or b"",
    )
    return Output(topic, record.key, CODEC.encode(letter))
