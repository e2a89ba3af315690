"""Follows the events topic and applies it to the index, batch by batch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.core import kafka, metrics
from services.core.codec import CODEC, DecodeError
from services.core.principals import Principal
from services.core.processor import start_with_retry
from services.core.records import Event, RepositoryEvent, StorageEvent
from services.core.settings import Settings
from services.query.index import Index

log = logging.getLogger(__name__)
T = TypeVar("T")


class Projection:
    def __init__(self, settings: Settings, index: Index, principal: Principal) -> None:
        self.settings = settings
        self.principal = principal  # the Kafka principal it reads the events as
        self.index = index
        self.topic = settings.events_topic
        # Every write goes through one thread, and so through one SQLite connection.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer")
        self.changed = asyncio.Condition()
        self.positions: dict[int, int] = {}
        self.end_offsets: dict[int, int] = {}
        self.applied = 0
        # The log end offsets (last stable offsets: what a read_committed reader reaches) noted
        # when the projection started, and set once the index holds everything below them: a
        # replica takes traffic only then (services.query.replica).
        self.start_target: dict[int, int] | None = None
        self.caught_up = asyncio.Event()
        # The batch being written to the index while the next one is fetched and decoded.
        self._applying: asyncio.Task[None] | None = None

    async def run(self, stop: asyncio.Event, until: dict[int, int] | None = None) -> None:
        """Applies events until stop is set (or, given `until`, up to those offsets)."""
        consumer = kafka.consumer(self.settings, self.principal, [], None, max_poll_records=5000)
        await start_with_retry(consumer.start, "query projection")
        try:
            partitions = await self._partitions()
            consumer.assign(partitions)
            stored = await self._in_writer(self.index.offsets, self.topic)
            for tp in partitions:
                if tp.partition in stored:
                    consumer.seek(tp, stored[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
                self.positions[tp.partition] = stored.get(tp.partition, 0)
            self.start_target = await self._start_offsets(consumer, partitions, stop)
            self._note_progress()
            while not stop.is_set():
                if until is not None:
                    await self._settle()  # the cut is judged on what is stored
                    if self._reached(until):
                        return
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                if until is not None:
                    batch = self._cut(batch, until)
                if not batch:
                    await self._settle()
                    await self._note_end_offsets(consumer, partitions)
                    await self._store_idle_positions(consumer, partitions, until)
                    self._export_lag(consumer, partitions)
                    continue
                rows = [self._decode(r) for records in batch.values() for r in records]
                positions = {}
                for tp, records in batch.items():
                    position = max(records[-1].offset + 1, await consumer.position(tp))
                    if until is not None:
                        position = min(position, until.get(tp.partition, position))
                    positions[tp.partition] = position
                for tp in partitions:
                    # A partition without records in this batch may still have moved past
                    # commit markers; a read barrier waits for exactly that on a busy log.
                    if tp.partition not in positions:
                        position = await consumer.position(tp)
                        if until is not None:
                            position = min(position, until.get(tp.partition, position))
                        if position > self.positions.get(tp.partition, 0):
                            positions[tp.partition] = position
                newest = max(r.timestamp for records in batch.values() for r in records)
                # Decoding (on this loop) and writing (in the writer thread, where SQLite lets go
                # of the GIL) overlap: this batch was decoded while the previous one was written.
                # One batch at a time is written, in log order, each with its offsets.
                await self._settle()
                self._applying = asyncio.create_task(
                    self._apply(rows, positions, newest, consumer, partitions)
                )
            await self._settle()
        finally:
            if self._applying is not None:  # stopping or failing: let the write in flight end
                await asyncio.gather(self._applying, return_exceptions=True)
            await consumer.stop()
            self.writer.shutdown(wait=True)

    async def _apply(
        self,
        rows: list[Event | RepositoryEvent | StorageEvent | None],
        positions: dict[int, int],
        newest: int,
        consumer: AIOKafkaConsumer,
        partitions: list[TopicPartition],
    ) -> None:
        await self._in_writer(self.index.apply, self.topic, rows, positions)
        self.positions.update(positions)
        self._note_progress()
        self.applied += len(rows)
        metrics.PROJECTION_EVENTS_APPLIED.inc(len(rows))
        metrics.PROJECTION_LAST_EVENT_SECONDS.set(newest / 1000)
        self._export_lag(consumer, partitions)
        async with self.changed:
            self.changed.notify_all()  # at once: a client waits for its verdict on this

    async def _settle(self) -> None:
        """Waits for the batch being written; its failure stops the projection, loudly."""
        applying, self._applying = self._applying, None
        if applying is not None:
            await applying

    async def _partitions(self) -> list[TopicPartition]:
        while True:
            try:
                found = await kafka.topic_partitions(self.settings, self.principal, self.topic)
                return [TopicPartition(self.topic, p) for p in found]
            except (LookupError, KafkaError, OSError) as error:
                log.warning("topic %s has no partitions yet (%s); waiting", self.topic, error)
            await asyncio.sleep(1)

    async def _note_end_offsets(
        self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
    ) -> None:
        try:
            ends = await consumer.end_offsets(partitions)
        except Exception as error:  # lag is informational; Kafka being away is logged elsewhere
            log.debug("end offsets unavailable: %r", error)
            return
        self.end_offsets = {tp.partition: offset for tp, offset in ends.items()}

    async def _store_idle_positions(
        self,
        consumer: AIOKafkaConsumer,
        partitions: list[TopicPartition],
        until: dict[int, int] | None,
    ) -> None:
        """With nothing to read, the position still moves past trailing commit markers; storing
        it lets the stored offsets reach the log's end offsets."""
        moved = {}
        for tp in partitions:
            position = await consumer.position(tp)
            if until is not None:
                position = min(position, until.get(tp.partition, position))
            if position > self.positions.get(tp.partition, 0):
                moved[tp.partition] = position
        if moved:
            await self._in_writer(self.index.apply, self.topic, [], moved)
            self.positions.update(moved)
            self._note_progress()
            async with self.changed:
                self.changed.notify_all()  # a read barrier may wait for these positions

    async def _start_offsets(
        self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition], stop: asyncio.Event
    ) -> dict[int, int] | None:
        """The log end offsets now, asked until Kafka answers (None if stopped first)."""
        while not stop.is_set():
            try:
                ends = await consumer.end_offsets(partitions)
                return {tp.partition: offset for tp, offset in ends.items()}
            except (KafkaError, OSError) as error:
                log.warning("end offsets of %s unavailable (%r); asking again", self.topic, error)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
        return None

    def behind_start(self) -> int | None:
        """Events between the index and the end offsets noted at start; None before those are
        known."""
        if self.start_target is None:
            return None
        return sum(
            max(0, end - self.positions.get(partition, 0))
            for partition, end in self.start_target.items()
        )

    def _note_progress(self) -> None:
        behind = self.behind_start()
        if behind is None or self.caught_up.is_set():
            return
        metrics.CATCH_UP_REMAINING.set(behind)
        if behind == 0:
            metrics.REPLICA_READY.set(1)
            log.info(
                "projection of %s caught up with the log as it was at start (%s)",
                self.topic,
                " ".join(f"{p}:{o}" for p, o in sorted((self.start_target or {}).items())),
            )
            self.caught_up.set()

    def _reached(self, until: dict[int, int]) -> bool:
        return all(self.positions.get(p, 0) >= offset for p, offset in until.items())

    @staticmethod
    def _cut(
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]], until: dict[int, int]
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """Drops records at or past the cut, so a replay stops exactly there."""
        kept = {}
        for tp, records in batch.items():
            limit = until.get(tp.partition, 0)
            inside = [r for r in records if r.offset < limit]
            if inside:
                kept[tp] = inside
        return kept

    def _export_lag(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Per-partition lag for /metrics. While busy, end offsets are only noted when idle, so
        the high watermark of the latest fetch (newer, when there is one) is used as well."""
        for tp in partitions:
            end = self.end_offsets.get(tp.partition, 0)
            highwater = consumer.highwater(tp)
            if highwater is not None:
                end = max(end, highwater)
            lag = max(0, end - self.positions.get(tp.partition, 0))
            metrics.PROJECTION_LAG.labels(str(tp.partition)).set(lag)

    async def reach(self, partition: int, offset: int, timeout: float) -> bool:
        """Waits until the index holds the partition's events below offset; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        async with self.changed:
            while self.positions.get(partition, 0) < offset:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except TimeoutError:
                    return False
        return True

    def lag(self) -> int:
        return sum(
            max(0, end - self.positions.get(partition, 0))
            for partition, end in self.end_offsets.items()
        )

    def _decode(
        self, record: ConsumerRecord[bytes, bytes]
    ) -> Event | RepositoryEvent | StorageEvent | None:
        try:
            event = CODEC.decode(record.value or b"")
        except DecodeError as error:
            # A record type this version does not know (a newer writer's) is skipped, not a
            # reason to stop: the offsets still move past it, and the rest of the log applies.
            log.error(
                "skipping undecodable event %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                error,
            )
            return None
        if isinstance(event, Event | RepositoryEvent | StorageEvent):
            return event
        log.error(
            "skipping %s at %s[%d]@%d: not an event",
            type(event).__name__,
            record.topic,
            record.partition,
            record.offset,
        )
        return None

    async def _in_writer(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.writer, function, *args)
