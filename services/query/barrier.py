"""A read barrier for upload state: answer only once the index reflects every command that Kafka
had accepted when the request arrived.

The SDK's upload() and write() return once Kafka acknowledges the commands, well before the upload
worker has turned them into events and the projection has applied those. So before reading an
upload's row, GET /uploads/<uuid>:

1. notes the end offset (high watermark) of the commands partition the upload id maps to: every
   acknowledged command of that upload is below it;
2. waits until the upload worker's consumer group has committed at least that offset there. The
   worker commits its input offsets in the Kafka transaction that publishes the events they
   caused, so from then on those events are in the events log (written, their transaction
   decided);
3. notes the end offset (high watermark, not the last stable offset) of the upload's events
   partition, and waits until the projection has stored its position at or past it. The high
   watermark is taken because the group's offsets and the events' commit marker are written to
   different partitions by the transaction coordinator, in no promised order: just after step 2
   the last stable offset may still stop short of the events, while the high watermark is past
   them already. A read_committed position can only reach it once every transaction that wrote
   below it has ended, so the wait is for those (short) transactions at most.

Each step's Kafka request is single-flight (`Fresh`): a burst of requests shares one request per
step instead of sending one each. A barrier that does not complete within `wait_seconds` raises
`Behind`, which the API answers with 503 and Retry-After rather than a wrong 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, NotCoordinatorForGroupError
from aiokafka.structs import OffsetAndMetadata

from services.core import kafka
from services.core.eventlog import partition_for
from services.core.principals import Principal
from services.core.settings import Settings
from services.query.projection import Projection

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_WAIT_SECONDS = 5.0
POLL_SECONDS = 0.005  # between reads of the group's committed offsets while the worker works
PARTITIONS_TTL_SECONDS = 30.0  # partitions can be added; the partitioner follows the count


class Behind(Exception):
    """The upload worker or the projection did not catch up within the barrier's wait."""


class Fresh(Generic[T]):
    """Single-flight calls of `fetch` whose result was fetched after the caller asked.

    A caller joins the next round; a round starts when the previous one ends. However many
    callers wait, at most one fetch runs and one more is queued."""

    def __init__(self, fetch: Callable[[], Awaitable[T]]) -> None:
        self._fetch = fetch
        self._next: asyncio.Future[T] | None = None
        self._runner: asyncio.Task[None] | None = None

    async def get(self) -> T:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # A round whose callers all went away (a client hung up) must not leave an
            # unretrieved exception behind.
            self._next.add_done_callback(lambda done: done.cancelled() or done.exception())
        round_ = self._next
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await asyncio.shield(round_)

    async def _run(self) -> None:
        while self._next is not None:
            round_, self._next = self._next, None
            try:
                round_.set_result(await self._fetch())
            except Exception as error:
                round_.set_exception(error)

    async def close(self) -> None:
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)


class ReadBarrier:
    def __init__(
        self,
        settings: Settings,
        projection: Projection,
        principal: Principal,
        *,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
    ) -> None:
        self.settings = settings
        self.projection = projection
        self.wait_seconds = wait_seconds
        self.group = kafka.upload_worker_group(settings)
        self.admin: AIOKafkaAdminClient = kafka.admin(settings, principal)
        # read_uncommitted: end_offsets is then the high watermark (see step 3 above).
        self.offsets: AIOKafkaConsumer = kafka.consumer(
            settings, principal, [], None, isolation_level="read_uncommitted"
        )
        self._started = False
        self._coordinator: int | None = None
        self._partitions: dict[str, list[int]] = {}
        self._partitions_at = 0.0
        self._command_ends = Fresh(lambda: self._ends(settings.commands_topic))
        self._event_ends = Fresh(lambda: self._ends(settings.events_topic))
        self._committed = Fresh(self._group_offsets)
        self._starting = asyncio.Lock()

    async def wait(self, upload_id: str) -> None:
        """Returns once the index reflects the upload's acknowledged commands; raises Behind."""
        deadline = time.monotonic() + self.wait_seconds
        await self._retrying(self._start, deadline, bounded=False)
        commands = await self._retrying(self._partition_counts, deadline)
        command_partition = partition_for(upload_id, commands[0])
        events_partition = partition_for(upload_id, commands[1])
        target = (await self._retrying(self._command_ends.get, deadline))[command_partition]
        while target > 0:  # 0: Kafka holds no command there, so there is nothing to wait for
            committed = (await self._retrying(self._committed.get, deadline))[command_partition]
            if committed >= target:
                break
            if time.monotonic() > deadline:
                raise Behind(
                    f"the upload worker has committed offset {committed} of commands partition "
                    f"{command_partition}, not yet {target}"
                )
            await asyncio.sleep(POLL_SECONDS)
        events_end = (await self._retrying(self._event_ends.get, deadline))[events_partition]
        if not await self.projection.reach(
            events_partition, events_end, max(0.0, deadline - time.monotonic())
        ):
            raise Behind(
                f"the index has not applied events partition {events_partition} up to "
                f"{events_end} yet"
            )

    async def caught_up(self, repository: str | None = None) -> None:
        """Returns once the index holds every event the log had when called; raises Behind.

        With a repository, only its events partition: its manifests, tags and links are keyed
        by its name. A registry read takes this before it answers, so a write another replica
        acknowledged a moment ago is seen here too (a blob's commit is keyed by its upload, so
        a blob lookup that misses waits for every partition)."""
        deadline = time.monotonic() + self.wait_seconds
        await self._retrying(self._start, deadline, bounded=False)
        events_count = (await self._retrying(self._partition_counts, deadline))[1]
        ends = await self._retrying(self._event_ends.get, deadline)
        if repository is not None:
            partition = partition_for(repository, events_count)
            ends = {partition: ends[partition]}
        for partition, end in ends.items():
            if not await self.projection.reach(
                partition, end, max(0.0, deadline - time.monotonic())
            ):
                raise Behind(f"the index has not applied events partition {partition} up to {end}")

    async def close(self) -> None:
        for fresh in (self._command_ends, self._event_ends, self._committed):
            await fresh.close()
        if self._started:
            await self.offsets.stop()
            await self.admin.close()

    async def _retrying(
        self, call: Callable[[], Awaitable[T]], deadline: float, *, bounded: bool = True
    ) -> T:
        """Kafka being briefly away is worth a retry within the barrier's wait, no longer.
        (Starting the clients is not cut short: a client half started is worse than a wait.)"""
        while True:
            try:
                if not bounded:
                    return await call()
                # Bounded by the barrier's own wait, not the client's request timeout (40 s).
                return await asyncio.wait_for(call(), max(0.05, deadline - time.monotonic()))
            except TimeoutError as error:
                raise Behind("Kafka did not answer within the barrier's wait") from error
            except LookupError as error:  # the topic does not exist (yet)
                raise Behind(str(error)) from error
            except (KafkaError, OSError) as error:
                if time.monotonic() > deadline:
                    # Behind's text reaches clients (503): the error's own, naming brokers and
                    # addresses, stays in the log.
                    log.warning("read barrier: Kafka is not answering: %r", error)
                    raise Behind("Kafka is not answering") from error
                log.debug("read barrier: %r; retrying", error)
                await asyncio.sleep(0.1)

    async def _start(self) -> None:
        async with self._starting:
            if not self._started:
                await self.admin.start()
                try:
                    await self.offsets.start()
                except BaseException:
                    await self.admin.close()
                    raise
                self._started = True

    async def _partition_counts(self) -> tuple[int, int]:
        if time.monotonic() - self._partitions_at > PARTITIONS_TTL_SECONDS:
            for topic in (self.settings.commands_topic, self.settings.events_topic):
                self._partitions[topic] = await kafka.describe_partitions(self.admin, topic)
            self._partitions_at = time.monotonic()
        return (
            len(self._partitions[self.settings.commands_topic]),
            len(self._partitions[self.settings.events_topic]),
        )

    async def _ends(self, topic: str) -> dict[int, int]:
        tps = [TopicPartition(topic, p) for p in self._partitions[topic]]
        ends = await self.offsets.end_offsets(tps)
        return {tp.partition: offset for tp, offset in ends.items()}

    async def _group_offsets(self) -> dict[int, int]:
        topic = self.settings.commands_topic
        if self._coordinator is None:
            self._coordinator = await self.admin.find_coordinator(self.group)
        try:
            found = await self.admin.list_consumer_group_offsets(
                self.group,
                self._coordinator,
                [TopicPartition(topic, p) for p in self._partitions[topic]],
            )
        except KafkaError:
            self._coordinator = None  # it may have moved: look it up again next time
            raise
        committed = committed_offsets(topic, self._partitions[topic], found)
        if committed is None:
            self._coordinator = None
            raise NotCoordinatorForGroupError(
                f"the coordinator of {self.group} answered without the offsets asked for"
            )
        return committed


def committed_offsets(
    topic: str, asked: list[int], found: dict[TopicPartition, OffsetAndMetadata]
) -> dict[int, int] | None:
    """The group's committed offset of each asked partition of `topic`, or None when the
    answer left one out.

    aiokafka 0.14 raises an OffsetFetch error only when a partition carries it. An error at the
    top of the answer (v2 and later: the coordinator moved or is still loading, as after a
    broker restart) comes back as no partitions at all; read as offset 0 it kept a barrier
    waiting on a coordinator that no longer was one."""
    answered = {tp.partition: meta.offset for tp, meta in found.items() if tp.topic == topic}
    if any(partition not in answered for partition in asked):
        return None
    # -1: the group has committed nothing there yet.
    return {partition: max(0, answered[partition]) for partition in asked}
