"""What a query or registry replica does around its HTTP app, so that replicas behind one address
give the same answers and a new one takes traffic only once it can.

- **Readiness.** When its projection starts, a replica notes the log's end offsets; it is ready
  once its index holds everything below them (`Projection.caught_up`). `/readyz` answers 200
  then, and 503 with how far behind it is until then. `/healthz` stays a liveness check: 200
  whenever the process runs, with the projection's lag.
- **One address for many replicas.** With LAYERLOG_REUSE_PORT the listening socket has
  SO_REUSEPORT, and the kernel spreads new connections over every socket listening on the port.
  A replica opens that socket only once it is ready, so until then its peers take every
  connection. Without it (one replica, or a load balancer in front), the address is open at
  once and answers everything but /healthz, /readyz and /metrics with 503, Retry-After and the
  spec's error body until the replica is ready.
- **A status address** (LAYERLOG_QUERY_STATUS_LISTEN / LAYERLOG_REGISTRY_STATUS_LISTEN) of the
  replica's own serves /healthz, /readyz and /metrics from the moment the process starts, while
  the shared address may not be open yet: it is what a probe or a scrape asks.
- **Snapshots.** A replica whose index is new starts from the newest usable snapshot in S3
  (services.query.snapshots) and replays only the log after it; every
  LAYERLOG_SNAPSHOT_INTERVAL_SECONDS it uploads one of its own index when it has moved on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path

from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.core import metrics
from services.core.principals import Principal
from services.core.settings import Settings
from services.oci.errors import ErrorCode, error_body
from services.query.projection import Projection
from services.query.snapshots import (
    LogBounds,
    NothingToSnapshot,
    Snapshots,
    index_is_new,
    log_bounds,
)

log = logging.getLogger(__name__)

# Answered whatever the replica's state: a probe, a scrape, a liveness check.
STATUS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER_SECONDS = "1"
_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


class Phase(StrEnum):
    STARTING = "starting"
    RESTORING = "restoring"  # fetching and checking a snapshot
    CATCHING_UP = "catching_up"  # projecting the log up to the end offsets noted at start
    READY = "ready"


class Readiness:
    """Whether this replica may take traffic, and how far it has to go."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.projection: Projection | None = None
        self.snapshot: str | None = None  # the snapshot the index started from
        self._read_only = False
        self._followed = asyncio.Event()

    def follow(self, projection: Projection | None) -> None:
        """The projection whose catch-up decides; None: a read-only index, ready as it is."""
        self.projection = projection
        self._read_only = projection is None
        self.phase = Phase.READY if projection is None else Phase.CATCHING_UP
        if projection is None:
            metrics.REPLICA_READY.set(1)
        self._followed.set()

    @property
    def ready(self) -> bool:
        if self._read_only:
            return True
        return self.projection is not None and self.projection.caught_up.is_set()

    async def wait(self) -> None:
        await self._followed.wait()
        if self.projection is not None:
            await self.projection.caught_up.wait()

    def behind(self) -> int | None:
        return None if self.projection is None else self.projection.behind_start()

    def report(self) -> dict[str, object]:
        phase = Phase.READY if self.ready else self.phase
        body: dict[str, object] = {"status": str(phase), "behind": self.behind()}
        if self.projection is not None:
            target = self.projection.start_target
            body["start_offsets"] = None if target is None else _by_partition(target)
            body["positions"] = _by_partition(self.projection.positions)
        if self.snapshot is not None:
            body["snapshot"] = self.snapshot
        return body

    def refusal(self, path: str) -> web.Response:
        """The answer of a replica that is not ready yet, on the shared address."""
        behind = self.behind()
        how_far = "" if behind is None else f", {behind} events behind"
        message = (
            f"this replica is not ready: {self.phase.replace('_', ' ')}{how_far}; "
            "retry: another replica, or this one shortly, answers"
        )
        body = {"error": str(ErrorCode.UNAVAILABLE), "message": message}
        body.update(error_body(ErrorCode.UNAVAILABLE, message, {"behind": behind}))
        headers = {"Retry-After": RETRY_AFTER_SECONDS}
        if path.startswith("/v2"):
            headers.update(_API_VERSION)
        return web.json_response(body, status=503, headers=headers)


def _by_partition(offsets: dict[int, int]) -> dict[str, int]:
    return {str(p): o for p, o in sorted(offsets.items())}


async def readyz(readiness: Readiness) -> web.Response:
    if readiness.ready:
        return web.json_response(readiness.report())
    return web.json_response(
        readiness.report(), status=503, headers={"Retry-After": RETRY_AFTER_SECONDS}
    )


def health_body(projection: Projection | None) -> dict[str, object]:
    """/healthz: the process runs (liveness), with the projection's lag when there is one."""
    body: dict[str, object] = {"status": "ok"}
    if projection is not None:
        body["projection_lag"] = projection.lag()
        body["events_applied"] = projection.applied
    return body


def status_app(readiness: Readiness) -> web.Application:
    """/healthz, /readyz and /metrics alone, for the replica's status address."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response(health_body(readiness.projection))

    async def ready(request: web.Request) -> web.Response:
        return await readyz(readiness)

    async def scrape(request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", ready)
    app.router.add_get("/metrics", scrape)
    return app


class Replica:
    """Restores, listens and takes snapshots for one query or registry process."""

    def __init__(
        self,
        settings: Settings,
        *,
        service: str,
        principal: Principal,
        index_path: str,
        listen: tuple[str, int],
        status_listen: str,
    ) -> None:
        self.settings = settings
        self.service = service
        self.principal = principal
        self.index_path = index_path
        self.listen = listen
        self.status_listen = status_listen
        self.readiness = Readiness()
        self._status: web.AppRunner | None = None

    async def start_status(self) -> None:
        if not self.status_listen:
            return
        host, _, port = self.status_listen.rpartition(":")
        runner = web.AppRunner(status_app(self.readiness), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host.strip("[]"), int(port)).start()
        self._status = runner
        log.info(
            "%s: status (/healthz, /readyz, /metrics) on http://%s",
            self.service,
            self.status_listen,
        )

    async def prepare_index(self, stop: asyncio.Event) -> None:
        """A new index starts from the newest usable snapshot (LAYERLOG_SNAPSHOT_RESTORE)."""
        path = Path(self.index_path)
        events_topic = self.settings.events_topic
        if not self.settings.snapshot_restore:
            return
        if not await asyncio.to_thread(index_is_new, path, events_topic):
            log.info("%s: index %s has offsets stored; resuming from them", self.service, path)
            return
        self.readiness.phase = Phase.RESTORING
        bounds = await self._bounds(stop)
        if bounds is None:
            return  # stopped while Kafka was away
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        snapshots = Snapshots(self.settings)
        for attempt in range(3):
            try:
                restored = await snapshots.restore(path, bounds)
            except Exception as error:  # S3 away: a from-zero replay is slow but still right
                log.error(
                    "%s: cannot list the snapshots in S3 (%r)%s",
                    self.service,
                    error,
                    "; asking again" if attempt < 2 else "; starting from the log's beginning",
                )
                await asyncio.sleep(1)
                continue
            if restored.manifest is not None:
                self.readiness.snapshot = restored.manifest.snapshot_id
            return

    async def _bounds(self, stop: asyncio.Event) -> LogBounds | None:
        while not stop.is_set():
            try:
                return await log_bounds(self.settings, self.principal)
            except (KafkaError, OSError, LookupError) as error:
                log.warning(
                    "%s: the events topic's offsets are unavailable (%r); asking again",
                    self.service,
                    error,
                )
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
        return None

    async def open(self, runner: web.AppRunner) -> None:
        """Opens the shared address: at once, or with SO_REUSEPORT once the replica is ready."""
        host, port = self.listen
        reuse = self.settings.reuse_port
        if reuse and not self.readiness.ready:
            log.info(
                "%s: catching up before listening on %s:%d (SO_REUSEPORT: peers answer meanwhile)",
                self.service,
                host,
                port,
            )
            await self.readiness.wait()
        await web.TCPSite(runner, host, port, reuse_port=reuse or None).start()
        log.info(
            "%s: serving http://%s:%d (index %s%s)",
            self.service,
            host,
            port,
            self.index_path,
            ", SO_REUSEPORT" if reuse else "",
        )

    async def snapshot_every(self, projection: Projection, stop: asyncio.Event) -> None:
        """Uploads a snapshot every LAYERLOG_SNAPSHOT_INTERVAL_SECONDS once ready, when the index
        moved since the last one. A failure is logged and counted; the next interval retries."""
        interval = self.settings.snapshot_interval_seconds
        await self.readiness.wait()
        snapshots = Snapshots(self.settings)
        last: dict[int, int] | None = None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
                return
            except TimeoutError:
                pass
            if last is not None and dict(projection.positions) == last:
                continue  # nothing new since the last snapshot
            try:
                last = (await snapshots.take(self.index_path)).manifest.offsets
            except NothingToSnapshot as empty:
                log.debug("%s: no snapshot: %s", self.service, empty)
            except Exception:
                metrics.SNAPSHOT_FAILURES.inc()
                log.exception("%s: snapshot of %s failed", self.service, self.index_path)

    async def close(self) -> None:
        if self._status is not None:
            await self._status.cleanup()


async def supervise(
    stop: asyncio.Event,
    essential: Iterable[asyncio.Task[None]],
    helpers: Iterable[asyncio.Task[None]],
) -> None:
    """Runs until stop is set or a task fails (its error propagates, loudly). Essential tasks
    end on stop and are waited for; helpers (listening, snapshots) may end early, and are
    cancelled at the end."""
    essential, helpers = list(essential), list(helpers)
    stopped = asyncio.create_task(stop.wait())
    waiting: set[asyncio.Task[object]] = {stopped, *essential, *helpers}
    try:
        while not stop.is_set() and waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
                if task in essential:
                    return  # an essential task that ends takes the service down with it
    finally:
        stop.set()
        for task in helpers:
            task.cancel()
        await asyncio.gather(stopped, *essential, *helpers, return_exceptions=True)
