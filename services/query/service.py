"""The query service: the index projection and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.auth.http import Gate
from services.core.objectstore import ObjectStore
from services.core.principals import Principal
from services.core.settings import Settings
from services.core.waits import WaitLimit
from services.query.barrier import ReadBarrier
from services.query.http import QueryApi
from services.query.index import Index
from services.query.projection import Projection
from services.query.replica import Replica, supervise

log = logging.getLogger(__name__)


async def run(
    settings: Settings,
    stop: asyncio.Event,
    *,
    index_path: str | None = None,
    read_only: bool = False,
) -> None:
    # First: a missing key or a broken policy stops the service before it holds any resource.
    gate = Gate(settings, issues_tokens=False) if settings.auth else None
    path = index_path or settings.index_path
    replica = Replica(
        settings,
        service="query",
        principal=Principal.QUERY,
        index_path=path,
        listen=settings.query_host_port,
        status_listen=settings.query_status_listen,
    )
    await replica.start_status()
    runner: web.AppRunner | None = None
    barrier: ReadBarrier | None = None
    try:
        if not read_only:
            await replica.prepare_index(stop)  # a new index may start from a snapshot
        index = Index(path, read_only=read_only)
        projection = None if read_only else Projection(settings, index, Principal.QUERY)
        replica.readiness.follow(projection)
        barrier = None if projection is None else ReadBarrier(settings, projection, Principal.QUERY)
        api = QueryApi(
            index,
            ObjectStore(settings),
            projection,
            redirect=settings.blob_redirect,
            barrier=barrier,
            gate=gate,
            waits=WaitLimit(settings.max_waiting_requests),
            readiness=replica.readiness,
        )
        # Long request lines must reach the handlers, which answer them with a JSON 400, rather
        # than the HTTP parser's plain-text refusal.
        runner = web.AppRunner(
            api.app(), access_log=None, max_line_size=65536, max_field_size=65536
        )
        await runner.setup()
        essential = []
        helpers = [asyncio.create_task(replica.open(runner))]
        if projection is not None:
            # A projection that dies must take the service down, loudly.
            essential.append(asyncio.create_task(projection.run(stop)))
            if settings.snapshot_interval_seconds:
                helpers.append(asyncio.create_task(replica.snapshot_every(projection, stop)))
        await supervise(stop, essential, helpers)
    finally:
        stop.set()
        if runner is not None:
            await runner.cleanup()
        if barrier is not None:
            await barrier.close()
        await replica.close()
