"""The upload worker: consumes upload commands, stages chunks in object storage, emits events.

Replicas share the commands topic's partitions through the consumer group `layerlog-upload-worker`;
each needs its own instance id (it names the Kafka transactional id).
"""

from __future__ import annotations

import asyncio
import logging

from services.core import objectstore
from services.core.objectstore import ObjectStore
from services.core.processor import Processor
from services.core.settings import Settings
from services.upload_worker.handler import CommandHandler
from services.upload_worker.staging import StagingArea

log = logging.getLogger(__name__)

GROUP_ID = "layerlog-upload-worker"


async def run(settings: Settings, instance_id: str, stop: asyncio.Event) -> None:
    handler = CommandHandler(settings, StagingArea(ObjectStore(settings), settings.part_size))
    processor = Processor(
        settings,
        name="upload-worker",
        instance_id=instance_id,
        input_topic=settings.commands_topic,
        group_id=GROUP_ID,
        handle=handler.handle,
        is_transient=objectstore.is_transient,
        on_error=handler.on_error,
        on_revoked=handler.forget,
    )
    await processor.run(stop)
