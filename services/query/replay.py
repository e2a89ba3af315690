"""Rebuilding an index from the event log, up to now or up to a cut (time travel)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.core import kafka
from services.core.principals import Principal
from services.core.settings import Settings
from services.query.index import Index
from services.query.projection import Projection


async def cut_offsets(
    settings: Settings, *, until_time: datetime | None = None, until: dict[int, int] | None = None
) -> dict[int, int]:
    """Per partition, the first offset past the cut: the log's end, the first record at or after
    until_time, or the offsets given (partitions not named are cut at their end)."""
    # Replays are the audit tools' (`layerlog replay`): they read as the auditor.
    consumer = AIOKafkaConsumer(**kafka.connection(settings, Principal.AUDITOR))
    await consumer.start()
    try:
        partitions = await kafka.topic_partitions(
            settings, Principal.AUDITOR, settings.events_topic
        )
        tps = [TopicPartition(settings.events_topic, p) for p in partitions]
        ends = await consumer.end_offsets(tps)
        cut = {tp.partition: offset for tp, offset in ends.items()}
        if until_time is not None:
            found = await consumer.offsets_for_times(
                {tp: int(until_time.timestamp() * 1000) for tp in tps}
            )
            for tp, at in found.items():
                if at is not None:
                    cut[tp.partition] = at.offset
        for partition, offset in (until or {}).items():
            if partition not in cut:
                raise ValueError(f"{settings.events_topic} has no partition {partition}")
            cut[partition] = min(offset, cut[partition])
        return cut
    finally:
        await consumer.stop()


async def rebuild(settings: Settings, out: str | Path, cut: dict[int, int]) -> int:
    """Projects the log up to `cut` into a new index file; returns the events applied."""
    path = Path(out)
    if await asyncio.to_thread(path.exists):
        raise FileExistsError(f"{path} exists; replay writes a new index")
    projection = Projection(settings, await asyncio.to_thread(Index, str(path)), Principal.AUDITOR)
    await projection.run(asyncio.Event(), until=cut)
    return projection.applied
