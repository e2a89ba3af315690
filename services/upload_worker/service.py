"""The upload worker: consumes upload commands, stages chunks in object storage, emits events.

Replicas share the commands topic's partitions through the consumer group
`layerlog-upload-worker.<commands topic>`.
"""

from __future__ import annotations

import asyncio
import logging

from services.core import kafka, metrics, objectstore
from services.core.checkpoints import Checkpoint, passing
from services.core.objectstore import ObjectStore
from services.core.principals import Principal
from services.core.processor import Processor
from services.core.settings import Settings
from services.upload_worker.expiry import Expiry
from services.upload_worker.handler import CommandHandler
from services.upload_worker.staging import LEDGER_LENGTH, StagingArea

log = logging.getLogger(__name__)


async def run(settings: Settings, stop: asyncio.Event, checkpoint: Checkpoint = passing) -> None:
    store = ObjectStore(settings)
    staging = StagingArea(store, settings.part_size)
    handler = CommandHandler(settings, staging, checkpoint)
    processor = Processor(
        settings,
        name="upload-worker",
        principal=Principal.UPLOAD_WORKER,
        input_topic=settings.commands_topic,
        group_id=kafka.upload_worker_group(settings),
        handle=handler.handle,
        is_transient=objectstore.is_transient,
        on_error=handler.on_error,
        on_revoked=handler.forget,
        settle=handler.settle,
        abandon=handler.abandon,
        # A batch applied again must find each of its chunks in the upload's ledger.
        max_records=LEDGER_LENGTH // 2,
    )
    expiry = Expiry(settings, store, staging, processor.owned_partitions, processor.partition_count)
    stop_metrics = metrics.serve(settings.worker_metrics_listen, "upload-worker")
    scanning = asyncio.create_task(expiry.run(stop))
    try:
        await processor.run(stop)
    finally:
        stop.set()
        await scanning
        stop_metrics()
