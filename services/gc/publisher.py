"""The collector's events onto the log: one Kafka transaction per batch of reclaims, under one
transactional id, so a sweeper that starts fences the one before it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import ProducerFenced

from services.core import kafka
from services.core.codec import CODEC
from services.core.principals import Principal
from services.core.processor import start_with_retry
from services.core.records import StorageEvent
from services.core.settings import Settings

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None

    async def publish(self, events: Sequence[StorageEvent]) -> None:
        """Returns once the events are committed; raises when that is not known (the sweep
        then deletes nothing: a later sweep finds them in the log, or decides again).

        Fenced (another sweeper, `layerlog gc` say, started its producer since), the events
        were not committed: they are sent once more through a fresh producer, fencing that one.
        The sweep's decisions do not depend on which sweeper publishes them."""
        if not events:
            return
        try:
            await self._publish(events)
        except ProducerFenced:
            log.info("gc: another sweeper's producer fenced ours; publishing again")
            await self._publish(events)

    async def _publish(self, events: Sequence[StorageEvent]) -> None:
        producer = await self._started()
        sends: list[asyncio.Future[object]] = []
        try:
            async with producer.transaction():
                for event in events:
                    sends.append(
                        await producer.send(
                            self.settings.events_topic,
                            CODEC.encode(event),
                            # By digest: every reclaim of one digest is in one partition.
                            key=event.digest.encode(),
                        )
                    )
            await asyncio.gather(*sends)
        except BaseException:
            # Fenced (another sweeper started), or the outcome is unknown: a fresh producer
            # next time settles whatever this one left open.
            await self.close()
            raise
        finally:
            await asyncio.gather(*sends, return_exceptions=True)

    async def _started(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = kafka.producer(
                self.settings,
                Principal.GC,
                transactional_id=kafka.gc_transactional_id(self.settings),
                transaction_timeout_ms=30_000,
            )
            await start_with_retry(producer.start, "gc producer")
            self._producer = producer
        return self._producer

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except Exception as error:  # stopping a fenced producer may complain; nothing to do
                log.debug("ignored while stopping the gc producer: %r", error)
