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
    index = Index(index_path or settings.index_path, read_only=read_only)
    projection = None if read_only else Projection(settings, index, Principal.QUERY)
    barrier = None if projection is None else ReadBarrier(settings, projection, Principal.QUERY)
    api = QueryApi(
        index,
        ObjectStore(settings),
        projection,
        redirect=settings.blob_redirect,
        barrier=barrier,
        gate=gate,
        waits=WaitLimit(settings.max_waiting_requests),
    )
    # Long request lines must reach the handlers, which answer them with a JSON 400, rather than
    # the HTTP parser's plain-text refusal.
    runner = web.AppRunner(api.app(), access_log=None, max_line_size=65536, max_field_size=65536)
    await runner.setup()
    host, port = settings.query_host_port
    await web.TCPSite(runner, host, port).start()
    log.info("query: serving http://%s:%d (index %s)", host, port, index.path)
    tasks = [asyncio.create_task(stop.wait())]
    if projection is not None:
        tasks.append(asyncio.create_task(projection.run(stop)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a projection that died must take the service down, loudly
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        if barrier is not None:
            await barrier.close()
