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
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import ConsumerRecord

from services.core import kafka, logs, metrics
from services.core.codec import CODEC, DecodeError
from services.core.principals import Principal
from services.core.records import (
    ChunkAppended,
    CommandRejected,
    DeadLetter,
    Event,
    LayerCommitted,
    LayerValidationFailed,
    RepositoryCommandRejected,
    RepositoryEvent,
)
from services.core.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 10.0
# A batch whose effects cannot be made durable for this long is abandoned and applied again
# later: meanwhile the partition's revocation waits, and another replica may take it over.
SETTLE_GIVE_UP_SECONDS = 60.0
# Consumer lag is a gauge for dashboards; refreshing it once a second is plenty.
LAG_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes


Handler = Callable[[ConsumerRecord], Awaitable[list[Output]]]


async def _nothing_to_settle(partition: int) -> None:
    return None


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
        principal: Principal,
        input_topic: str,
        group_id: str,
        handle: Handler,
        is_transient: Callable[[BaseException], bool],
        on_error: Callable[[ConsumerRecord, Exception], list[Output]],
        on_revoked: Callable[[set[TopicPartition]], None] = lambda _: None,
        settle: Callable[[int], Awaitable[None]] = _nothing_to_settle,
        abandon: Callable[[int], None] = lambda _: None,
        max_records: int = 200,
    ) -> None:
        self.settings = settings
        self.name = name
        self.principal = principal
        self.input_topic = input_topic
        self.group_id = group_id
        self.handle = handle
        self.is_transient = is_transient
        self.on_error = on_error
        self.on_revoked = on_revoked
        # A handler may defer its writes: settle(partition) makes the applied records' effects
        # durable before their outputs are published; abandon(partition) drops what was not
        # settled when the records will be applied again instead.
        self.settle = settle
        self.abandon = abandon
        self.max_records = max_records
        self.consumer: AIOKafkaConsumer | None = None
        self.producers: dict[int, AIOKafkaProducer] = {}
        # The partitions taken over and not released, with the offset of the next record to
        # apply (None: no committed offset, start where the consumer starts). A batch fetched
        # before a take-over or a release may still be handed out after it: records of a
        # partition not in here, or before its next offset, were applied already or are not
        # ours, and applying them again would publish their outputs twice.
        self.positions: dict[TopicPartition, int | None] = {}
        # Held while a batch is applied and committed: a revocation waits for the commit, so the
        # next owner reads offsets that include it.
        self.in_flight = asyncio.Lock()
        self.stop = asyncio.Event()
        self.lag_noted_at = 0.0

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
        consumer = kafka.consumer(self.settings, self.principal, [], self.group_id)
        self.consumer = consumer
        consumer.subscribe([self.input_topic], listener=_Rebalance(self))
        await start_with_retry(consumer.start, f"{self.name} consumer")
        log.info("%s: consuming %s in group %s", self.name, self.input_topic, self.group_id)
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
                await self._note_lag()
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
        # Under the lock: a batch being applied finishes first, and none starts half-way.
        async with self.in_flight:
            for tp in assigned:
                # A fresh producer every time: one kept from an earlier turn may have been
                # fenced by the replica that owned the partition in between. Starting it fences
                # that one, and settles its open transaction, before the offset is read.
                await self._forget_producer(tp.partition)
                committed = await self._init_and_read_offset(tp)
                if self.stop.is_set():
                    return
                if committed is not None:
                    self.consumer.seek(tp, committed)
                self.positions[tp] = committed

    async def _init_and_read_offset(self, tp: TopicPartition) -> int | None:
        """Starts the partition's producer (settling whatever its transactional id left open),
        then reads the partition's committed offset; retries until Kafka answers. None: no
        committed offset, or stopping (the caller tells them apart by self.stop)."""
        assert self.consumer is not None
        attempt = 0
        while not self.stop.is_set():
            try:
                await self._producer(tp.partition)
                return await self.consumer.committed(tp)
            except KafkaError as error:
                if kafka.refused(error):
                    raise kafka.KafkaRefused(
                        f"{self.name}: Kafka refused principal {self.principal} taking partition "
                        f"{tp.partition} over: {error!r}"
                    ) from error
                attempt += 1
                log.warning("%s: taking partition %d over: %r", self.name, tp.partition, error)
                await self._forget_producer(tp.partition)
                await asyncio.sleep(backoff(attempt))
        return None

    async def release(self, revoked: set[TopicPartition]) -> None:
        async with self.in_flight:
            self.on_revoked(revoked)
            for tp in revoked:
                self.positions.pop(tp, None)
                await self._forget_producer(tp.partition)
                # Another replica reports this partition's lag now; a stale value here would
                # add to it on the dashboard.
                try:
                    metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
                except KeyError:
                    pass

    async def _producer(self, partition: int) -> AIOKafkaProducer:
        producer = self.producers.get(partition)
        if producer is None:
            producer = kafka.producer(
                self.settings,
                self.principal,
                # Its ACL is granted by this prefix (services/core/access.py).
                transactional_id=kafka.transactional_id(self.name, self.input_topic, partition),
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
        if tp not in self.positions:
            return  # not ours (any more): its new owner applies these records
        after = self.positions[tp]
        if after is not None:
            records = [record for record in records if record.offset >= after]
        if not records:
            return
        outputs: list[Output] = []
        applied: list[tuple[float, list[Output]]] = []
        for record in records:
            # Log lines written while applying the record name its upload (the record key).
            with logs.bound(upload_id=_key_text(record.key)):
                timed = await self._apply_one(record)
            if timed is None:  # stopping: nothing committed, the records replay
                self.abandon(tp.partition)
                return
            applied.append(timed)
            outputs += timed[1]
        if await self._settle(tp, records[0].offset) and await self._commit(tp, records, outputs):
            self._observe(tp.topic, applied)

    async def _settle(self, tp: TopicPartition, first_offset: int) -> bool:
        """True once the handler's deferred effects are durable; False when the batch was
        abandoned instead (stopping, or storage failing for too long), to be applied again."""
        attempt = 0
        give_up_at = time.monotonic() + SETTLE_GIVE_UP_SECONDS
        while True:
            try:
                await self.settle(tp.partition)
                return True
            except Exception as error:
                if self.stop.is_set() or time.monotonic() > give_up_at:
                    self.abandon(tp.partition)
                    self._rewind(tp, first_offset)
                    return False
                attempt += 1
                delay = backoff(attempt)
                if self.is_transient(error):
                    log.warning(
                        "%s: settling partition %d: %s; retrying in %.1fs",
                        self.name,
                        tp.partition,
                        error,
                        delay,
                    )
                else:
                    log.exception(
                        "%s: settling partition %d failed; retrying in %.1fs",
                        self.name,
                        tp.partition,
                        delay,
                    )
                await asyncio.sleep(delay)

    async def _apply_one(self, record: ConsumerRecord) -> tuple[float, list[Output]] | None:
        """The record's outputs and how long the handle() call that produced them took."""
        attempt = 0
        while True:
            try:
                started = time.perf_counter()
                outputs = await self.handle(record)
                return time.perf_counter() - started, outputs
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
                    return 0.0, self.on_error(record, error)
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
    ) -> bool:
        """Publishes outputs and commits the input offset; True when they are known committed."""
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
            self.positions[tp] = next_offset
            return True
        except ProducerFenced:
            # Our transaction was aborted: by a replica that owns the partition now (the
            # rebalance that follows revokes it from us), or by the coordinator after the
            # transaction timed out. Either way the batch is applied again, by its owner.
            log.warning("%s: fenced on partition %d", self.name, tp.partition)
            metrics.COMMIT_FAILURES.labels(tp.topic, "fenced").inc()
            await self._forget_producer(tp.partition)
            # Another replica may be applying this partition now: what we cached of its state
            # (uploads, repositories) may be behind that replica's writes, so read it afresh.
            self.on_revoked({tp})
            self._rewind(tp, records[0].offset)
            return False
        except KafkaError as error:
            log.warning("%s: commit on partition %d failed: %r", self.name, tp.partition, error)
            metrics.COMMIT_FAILURES.labels(tp.topic, "error").inc()
            await self._forget_producer(tp.partition)
        finally:
            # The sends share the transaction's fate; collect their errors so none goes unread.
            await asyncio.gather(*sends, return_exceptions=True)
        # The commit's outcome is unknown. Initialising the transactional id again settles it
        # (completes or aborts it); the committed offset then says which, and an aborted batch is
        # applied again from its first record rather than its outputs being sent blindly twice.
        committed = await self._init_and_read_offset(tp)
        if self.stop.is_set():
            return False  # the outcome stays unknown; whoever starts next settles it the same way
        if (committed or 0) < next_offset:
            self._rewind(tp, records[0].offset)
            return False
        self.positions[tp] = next_offset
        return True

    def _rewind(self, tp: TopicPartition, offset: int) -> None:
        """The records from offset on are applied again (their batch did not commit)."""
        assert self.consumer is not None
        if tp in self.consumer.assignment():
            self.consumer.seek(tp, offset)
            self.positions[tp] = offset

    # Metrics

    def _observe(self, topic: str, applied: list[tuple[float, list[Output]]]) -> None:
        """Counts what a committed batch published. The outputs say what each record did, so
        neither the handlers nor the verifier need to know about metrics."""
        for seconds, outputs in applied:
            metrics.RECORDS_HANDLED.labels(topic).inc()
            metrics.HANDLE_SECONDS.labels(topic).observe(seconds)
            for output in outputs:
                try:
                    record = CODEC.decode(output.value)
                except DecodeError:  # ours to write, so never expected; metrics must not crash
                    continue
                _count(record, seconds)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "%s: published %s",
                        self.name,
                        type(record).__name__,
                        extra={
                            "upload_id": getattr(record, "upload_id", None),
                            "command_id": getattr(record, "caused_by", None),
                        },
                    )

    async def _note_lag(self) -> None:
        """Consumer lag per owned partition: the high watermark the last fetch saw minus the
        position. Only partitions fetched at least once have a high watermark."""
        moment = time.monotonic()
        if self.consumer is None or moment - self.lag_noted_at < LAG_INTERVAL_SECONDS:
            return
        self.lag_noted_at = moment
        for tp in self.consumer.assignment():
            try:
                highwater = self.consumer.highwater(tp)
                if highwater is None:
                    continue
                # A valid position is there once fetched; the timeout guards a reassignment.
                position = await asyncio.wait_for(self.consumer.position(tp), 1.0)
            except Exception as error:  # informational; never worth stopping the loop for
                log.debug("%s: no lag for %s: %r", self.name, tp, error)
                continue
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                max(0, highwater - position)
            )


def _count(record: object, seconds: float) -> None:
    if isinstance(record, (Event, RepositoryEvent)):
        metrics.EVENTS_PUBLISHED.labels(type(record).__name__).inc()
    if isinstance(record, ChunkAppended):
        metrics.INGESTED_BYTES.inc(record.length)
        metrics.INGESTED_CHUNKS.inc()
        metrics.CHUNK_APPEND_SECONDS.observe(seconds)
    elif isinstance(record, LayerCommitted):
        metrics.VERIFICATION_SECONDS.labels("committed").observe(seconds)
    elif isinstance(record, LayerValidationFailed):
        metrics.VERIFICATION_SECONDS.labels("failed").observe(seconds)
        metrics.VERIFICATION_FAILURES.labels(record.reason).inc()
    elif isinstance(record, (CommandRejected, RepositoryCommandRejected)):
        metrics.COMMANDS_REJECTED.labels(record.command_type, record.reason).inc()
    elif isinstance(record, DeadLetter):
        metrics.DEAD_LETTERS.labels(record.reason).inc()


def _key_text(key: bytes | None) -> str | None:
    # Commands and events are keyed by upload id; a hostile key is still shown, not trusted.
    return None if key is None else key[:100].decode("utf-8", errors="replace")


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
            if kafka.refused(error):
                raise kafka.KafkaRefused(
                    f"{what}: Kafka refused it: {error!r}; check the principal's password file "
                    "and the ACLs `layerlog provision` grants"
                ) from error
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
