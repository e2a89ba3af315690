"""`layerlog gc-service`: the collector's own index, kept projected from the log, and a sweep
every LAYERLOG_GC_INTERVAL_SECONDS (the first one as soon as the index has caught up).
`layerlog gc` runs one sweep through the same pieces (open_collector)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.core import metrics
from services.core.objectstore import ObjectStore
from services.core.settings import Settings
from services.gc.follower import LogFollower
from services.gc.ledger import Ledger
from services.gc.publisher import Publisher
from services.gc.sweep import Report, Sweeper
from services.query.index import Index

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_collector(
    settings: Settings, index_path: str, *, keep_ledger: bool = True
) -> AsyncIterator[Sweeper]:
    """A sweeper whose index (at index_path) follows the log until the block ends.

    keep_ledger=False is for a throwaway index: it has no record of what earlier runs finished,
    so it does not try to finish them (the service, whose ledger lasts, does)."""
    stop = asyncio.Event()
    index = await asyncio.to_thread(Index, index_path)
    follower = LogFollower(settings, index)
    publisher = Publisher(settings)
    ledger = await asyncio.to_thread(Ledger, index_path) if keep_ledger else None
    await follower.start(stop)
    try:
        yield Sweeper(settings, ObjectStore(settings), follower, publisher, ledger)
    finally:
        stop.set()
        await follower.close()
        await publisher.close()


def summary(report: Report) -> str:
    return (
        f"gc: sweep {report.sweep_id}: reclaimed {len(report.reclaimed)} copies "
        f"({report.bytes} bytes), kept {len(report.kept)}, restored {len(report.restored)} "
        f"manifest copies, released {report.holds_released} holds, finished {report.finished} "
        f"earlier reclaims, in {report.seconds:.1f}s"
    )


async def run(settings: Settings, stop: asyncio.Event) -> None:
    stop_metrics = metrics.serve(settings.gc_metrics_listen, "gc")
    try:
        async with open_collector(settings, settings.gc_index_path) as sweeper:
            log.info(
                "gc: sweeping every %ds, grace period %ds, index %s",
                settings.gc_interval_seconds,
                settings.gc_grace_seconds,
                settings.gc_index_path,
            )
            while not stop.is_set():
                problem = sweeper.follower.failed()
                if problem is not None:
                    raise problem  # the projection died: stop loudly rather than sweep blind
                try:
                    log.info(summary(await sweeper.sweep()))
                except Exception:
                    # Kafka or S3 away, a fenced publish: nothing was deleted that the log does
                    # not explain; the next sweep decides again.
                    log.exception(
                        "gc: the sweep failed; trying again in %ds", settings.gc_interval_seconds
                    )
                try:
                    await asyncio.wait_for(stop.wait(), settings.gc_interval_seconds)
                except TimeoutError:
                    pass
    finally:
        stop_metrics()
