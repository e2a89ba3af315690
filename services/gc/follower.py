"""The collector's index, projected from the events log by the collector itself, and a way to
catch it up to the log's end before a decision."""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import TopicPartition

from services.core import kafka
from services.core.principals import Principal
from services.core.processor import start_with_retry
from services.core.settings import Settings
from services.gc.plan import Cut
from services.query.index import Index
from services.query.projection import Projection

log = logging.getLogger(__name__)

# A catch-up gives up when the index has not moved for this long (a first catch-up replays the
# whole log, which may take long; one that makes no progress at all is stuck).
STALL_SECONDS = 60.0


class Behind(Exception):
    """The index did not reach the log's end: the sweep decides nothing."""


class LogFollower:
    def __init__(self, settings: Settings, index: Index, principal: Principal = Principal.GC):
        self.settings = settings
        self.index = index
        self.principal = principal
        self.projection = Projection(settings, index, principal)
        # read_uncommitted: end_offsets is then the high watermark. A transaction committed
        # before the call has all its records below it, and a read_committed position reaches
        # it only once every transaction below it has ended (services/query/barrier.py).
        self._ends = kafka.consumer(
            settings, principal, [], None, isolation_level="read_uncommitted"
        )
        self._partitions: list[TopicPartition] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self, stop: asyncio.Event) -> None:
        await start_with_retry(self._ends.start, "gc log follower")
        found = await kafka.topic_partitions(
            self.settings, self.principal, self.settings.events_topic
        )
        self._partitions = [TopicPartition(self.settings.events_topic, p) for p in found]
        self._task = asyncio.create_task(self.projection.run(stop))

    async def close(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self._ends.stop()

    def failed(self) -> BaseException | None:
        """The projection's failure, if it stopped with one."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            return self._task.exception()
        return None

    async def catch_up(self) -> Cut:
        """Waits until the index holds every event the log had when called; returns the cut it
        holds (per partition, the offset applied up to)."""
        ends = await self._ends.end_offsets(self._partitions)
        progress, moved_at = dict(self.projection.positions), time.monotonic()
        for tp, end in ends.items():
            while not await self.projection.reach(tp.partition, end, 1.0):
                problem = self.failed()
                if problem is not None or (self._task is not None and self._task.done()):
                    raise Behind(f"the collector's projection stopped: {problem!r}")
                if self.projection.positions != progress:
                    progress, moved_at = dict(self.projection.positions), time.monotonic()
                elif time.monotonic() - moved_at > STALL_SECONDS:
                    raise Behind(
                        f"the index has not applied events partition {tp.partition} up to "
                        f"{end} and made no progress for {STALL_SECONDS:.0f}s"
                    )
        return Cut({tp.partition: self.projection.positions.get(tp.partition, 0) for tp in ends})
