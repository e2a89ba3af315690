"""Expiry of idle uploads: each worker looks only at the uploads of the partitions it owns.

It does not discard anything itself: it puts an ExpireUpload command on the upload's partition,
so the expiry is applied in order with the upload's own commands (a chunk that arrives first
wins) and inside the same transactional loop as every other command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaProducer

from services.core import kafka
from services.core.codec import CODEC
from services.core.eventlog import partition_for
from services.core.objectstore import ObjectStore
from services.core.principals import Principal
from services.core.records import UPLOAD_WORKER, ExpireUpload
from services.core.settings import Settings
from services.upload_worker.staging import STATE_PREFIX, StagingArea, Status

log = logging.getLogger(__name__)


class Expiry:
    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        staging: StagingArea,
        owned: Callable[[], set[int]],
        partition_count: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.store = store
        self.staging = staging
        self.owned = owned
        self.partition_count = partition_count

    async def run(self, stop: asyncio.Event) -> None:
        producer = kafka.producer(self.settings, Principal.UPLOAD_WORKER)
        await producer.start()
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.settings.expiry_interval_seconds)
                    return
                except TimeoutError:
                    pass
                try:
                    expired = await self.scan(producer)
                except Exception as error:  # S3 or Kafka away: the next round tries again
                    log.warning("expiry scan failed: %r", error)
                    continue
                if expired:
                    log.info("asked to expire %d idle uploads", expired)
        finally:
            await producer.stop()

    async def scan(self, producer: AIOKafkaProducer) -> int:
        ttl = self.settings.upload_ttl_seconds
        owned, partitions = self.owned(), self.partition_count()
        if not owned or not partitions:
            return 0
        cutoff = time.time() - ttl
        sent = 0
        for key, modified in await self.store.list_modified(STATE_PREFIX):
            upload_id = key[len(STATE_PREFIX) :].removesuffix(".json")
            if modified > cutoff or partition_for(upload_id, partitions) not in owned:
                continue
            state = await self.staging.load(upload_id)
            if state is None or state.status != Status.OPEN:
                continue
            if time.time() * 1000 - state.updated_ms < ttl * 1000:
                continue
            command = ExpireUpload(
                upload_id=upload_id,
                repository=state.repository,
                ttl_seconds=ttl,
                subject=UPLOAD_WORKER,
            )
            await producer.send_and_wait(
                self.settings.commands_topic, CODEC.encode(command), key=upload_id.encode()
            )
            sent += 1
        return sent
