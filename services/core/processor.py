"""Consume, apply, publish: the loop the upload worker and the verifier share.

Records are applied partition by partition (the effects on object storage are idempotent, so
applying a record twice changes nothing); then the resulting records and the partition's input
offset are committed in one Kafka transaction. A crash before that commit replays the records; a
crash after it never does. So each input record's outputs appear once in the read_committed log.

Zombies are fenced the pre-KIP-447 way, which is what aiokafka supports: one transactional id per
input partition. Whoever takes a partition over initialises that id first, which aborts (or
completes) whatever the previous owner left open and makes any later commit of the previous owner
fail; only then does it read the partition's committed offset and start from there.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import ConsumerRecord

from services.core import kafka
from services.core.codec import CODEC
from services.core.records import DeadLetter
from services.core.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 10.0


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes


Handler = Callable[[ConsumerRecord], Awaitable[list[Output]]]


def backoff(attempt: int) -> float:
    """Capped exponential backoff with jitter, so replicas do not retry in lockstep."""
    ceiling = min(MAX_BACKOFF_SECONDS, 0.1 * 2**attempt)
    return ceiling / 2 + random.random() * ceiling / 2


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.processor.release(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.processor.take_over(set(assigned))


class Processor:
    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
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
        self.input_topic = input_topic
        self.group_id = group_id
        self.handle = handle
        self.is_transient = is_transient
        self.on_error = on_error
        self.on_revoked = on_revoked
        self.max_records = max_records
        self.consumer: AIOKafkaConsumer | None = None
        self.producers: dict[int, AIOKafkaProducer] = {}
        # Held while a batch is applied and committed: a revocation waits for the commit, so the
        # next owner reads offsets that include it.
        self.in_flight = asyncio.Lock()
        self.stop = asyncio.Event()

    def owned_partitions(self) -> set[int]:
        """The input partitions this replica owns right now."""
        if self.consumer is None:
            return set()
        return {tp.partition for tp in self.consumer.assignment()}

    def partition_count(self) -> int:
        if self.consumer is None:
            return 0
        return len(self.consumer.partitions_for_topic(self.input_topic) or ())

    async def run(self, stop: asyncio.Event) -> None:
        self.stop = stop
        consumer = kafka.consumer(self.settings, [], self.group_id)
        self.consumer = consumer
        consumer.subscribe([self.input_topic], listener=_Rebalance(self))
        await start_with_retry(consumer.start, f"{self.name} consumer")
        log.info("%s: consuming %s in group %s", self.name, self.input_topic, self.group_id)
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
                if not batch:
                    continue
                async with self.in_flight:
                    await asyncio.gather(
                        *(self._process(tp, records) for tp, records in batch.items())
                    )
        finally:
            await consumer.stop()
            for producer in self.producers.values():
                await _stop_quietly(producer)

    # Partition ownership

    async def take_over(self, assigned: set[TopicPartition]) -> None:
        log.info("%s: assigned partitions %s", self.name, sorted(tp.partition for tp in assigned))
        assert self.consumer is not None
        for tp in assigned:
            # A fresh producer every time: one kept from an earlier turn may have been fenced
            # by the replica that owned the partition in between. Starting it fences that one.
            await self._forget_producer(tp.partition)
            await self._producer(tp.partition)
            committed = await self.consumer.committed(tp)
            if committed is not None:
                self.consumer.seek(tp, committed)

    async def release(self, revoked: set[TopicPartition]) -> None:
        async with self.in_flight:
            self.on_revoked(revoked)
            for tp in revoked:
                await self._forget_producer(tp.partition)

    async def _producer(self, partition: int) -> AIOKafkaProducer:
        producer = self.producers.get(partition)
        if producer is None:
            producer = kafka.producer(
                self.settings,
                transactional_id=f"layerlog-{self.name}-{self.input_topic}-{partition}",
                transaction_timeout_ms=30_000,
            )
            await start_with_retry(producer.start, f"{self.name} producer {partition}")
            self.producers[partition] = producer
        return producer

    async def _forget_producer(self, partition: int) -> None:
        producer = self.producers.pop(partition, None)
        if producer is not None:
            await _stop_quietly(producer)

    # Applying and committing

    async def _process(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        outputs: list[Output] = []
        for record in records:
            result = await self._apply_one(record)
            if result is None:  # stopping: nothing committed, the records replay
                return
            outputs += result
        await self._commit(tp, records, outputs)

    async def _apply_one(self, record: ConsumerRecord) -> list[Output] | None:
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
                if self.stop.is_set():
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

    async def _commit(
        self, tp: TopicPartition, records: list[ConsumerRecord], outputs: list[Output]
    ) -> None:
        assert self.consumer is not None
        next_offset = records[-1].offset + 1
        producer = await self._producer(tp.partition)
        sends: list[asyncio.Future[object]] = []
        try:
            async with producer.transaction():
                for output in outputs:
                    sends.append(await producer.send(output.topic, output.value, key=output.key))
                await producer.send_offsets_to_transaction({tp: next_offset}, self.group_id)
            await asyncio.gather(*sends)
            return
        except ProducerFenced:
            # Another replica owns the partition now and has aborted our transaction.
            log.warning("%s: fenced on partition %d; leaving it", self.name, tp.partition)
            await self._forget_producer(tp.partition)
            return
        except KafkaError as error:
            log.warning("%s: commit on partition %d failed: %r", self.name, tp.partition, error)
            await self._forget_producer(tp.partition)
        finally:
            # The sends share the transaction's fate; collect their errors so none goes unread.
            await asyncio.gather(*sends, return_exceptions=True)
        # The commit's outcome is unknown. Initialising the transactional id again settles it
        # (completes or aborts it); the committed offset then says which, and an aborted batch is
        # applied again from its first record rather than its outputs being sent blindly twice.
        attempt = 0
        while not self.stop.is_set():
            try:
                await self._producer(tp.partition)
                committed = await self.consumer.committed(tp)
                break
            except KafkaError as error:
                attempt += 1
                await asyncio.sleep(backoff(attempt))
                log.warning("%s: settling partition %d: %r", self.name, tp.partition, error)
        else:
            return
        if (committed or 0) < next_offset and tp in self.consumer.assignment():
            self.consumer.seek(tp, records[0].offset)


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await producer.stop()
    except Exception as error:
        log.debug("ignored while stopping a producer: %r", error)


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
