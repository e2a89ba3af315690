"""The registry process: its own index projection, the read routes and the write routes in one
aiohttp app on LAYERLOG_REGISTRY_LISTEN.

Each registry process projects the events into an index of its own (LAYERLOG_REGISTRY_INDEX_PATH):
a write is answered once this process's index shows its outcome, so whatever it answers, its
own reads see at once.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.auth.http import Gate
from services.core.objectstore import ObjectStore
from services.core.principals import Principal
from services.core.processor import start_with_retry
from services.core.settings import Settings
from services.core.waits import WaitLimit
from services.query.barrier import ReadBarrier
from services.query.http import QueryApi
from services.query.index import Index
from services.query.projection import Projection
from services.query.replica import Readiness, Replica, supervise
from services.registry.commandlog import CommandLog, Watcher
from services.registry.write import WriteApi

log = logging.getLogger(__name__)


def build_app(
    settings: Settings,
    index: Index,
    projection: Projection,
    commands: CommandLog,
    barrier: ReadBarrier,
    gate: Gate | None,
    readiness: Readiness | None = None,
) -> web.Application:
    # The read side is the query service's app: blob HEAD/GET, the OCI read routes (GET /v2/,
    # manifests, tags, catalog, referrers), /healthz and /metrics. The write routes join it.
    # One cap for the process: the write routes' waits and the read side's verdict waits.
    waits = WaitLimit(settings.max_waiting_requests)
    app = QueryApi(
        index,
        ObjectStore(settings),
        projection,
        redirect=settings.blob_redirect,
        barrier=barrier,
        gate=gate,
        waits=waits,
        readiness=readiness,
    ).app()
    watch = Watcher(projection)
    WriteApi(settings, index, commands, watch, barrier, waits).add_routes(app.router)
    if gate is not None:
        gate.add_routes(app.router)  # GET/POST /token, where clients log in
    return app


async def run(settings: Settings, stop: asyncio.Event) -> None:
    # First: a missing key or a broken policy stops the registry before it holds any resource.
    gate = Gate(settings, issues_tokens=True) if settings.auth else None
    replica = Replica(
        settings,
        service="registry",
        principal=Principal.REGISTRY,
        index_path=settings.registry_index_path,
        listen=settings.registry_host_port,
        status_listen=settings.registry_status_listen,
    )
    await replica.start_status()
    commands: CommandLog | None = None
    runner: web.AppRunner | None = None
    barrier: ReadBarrier | None = None
    try:
        await replica.prepare_index(stop)  # a new index may start from a snapshot
        index = Index(settings.registry_index_path)
        projection = Projection(settings, index, Principal.REGISTRY)
        replica.readiness.follow(projection)
        commands = CommandLog(settings)
        await start_with_retry(commands.start, "registry producer")
        barrier = ReadBarrier(settings, projection, Principal.REGISTRY)
        app = build_app(settings, index, projection, commands, barrier, gate, replica.readiness)
        # As the query service: long request lines reach the handlers, which answer them with
        # the spec's JSON errors, rather than the HTTP parser's plain-text refusal.
        runner = web.AppRunner(app, access_log=None, max_line_size=65536, max_field_size=65536)
        await runner.setup()
        helpers = [asyncio.create_task(replica.open(runner))]
        if settings.snapshot_interval_seconds:
            helpers.append(asyncio.create_task(replica.snapshot_every(projection, stop)))
        # Returns once stop is set; a projection that fails takes the registry down, loudly,
        # rather than leave it answering writes it can never see the outcome of.
        await supervise(stop, [asyncio.create_task(projection.run(stop))], helpers)
    finally:
        stop.set()
        if runner is not None:
            await runner.cleanup()
        if barrier is not None:
            await barrier.close()
        if commands is not None:
            await commands.stop()
        await replica.close()
