"""Query and registry replicas as their own processes, each with an index and a status address
of its own, and what the tests ask of them: readiness, and how many requests each answered."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.core.settings import Settings
from tests.conftest import ServiceProcess, free_port

# Routes that are the replica's own business, not the answers the shared address gives.
STATUS_ROUTES = frozenset({"healthz", "readyz", "metrics"})


def replica(
    kind: str,
    settings: Settings,
    log_dir: Path,
    label: str,
    *,
    port: int,
    reuse_port: bool = True,
) -> ServiceProcess:
    """A `layerlog query` or `layerlog registry` on `port` (shared with its peers when
    reuse_port), with a new index and a status address of its own."""
    address = f"127.0.0.1:{port}"
    status = f"127.0.0.1:{free_port()}"
    index = str(log_dir / f"{kind}-{label}.sqlite")
    if kind == "query":
        own = replace(
            settings,
            query_listen=address,
            query_url=f"http://{address}",
            query_status_listen=status,
            index_path=index,
            reuse_port=reuse_port,
        )
    else:
        own = replace(
            settings,
            registry_listen=address,
            registry_url=f"http://{address}",
            registry_status_listen=status,
            registry_index_path=index,
            reuse_port=reuse_port,
        )
    return ServiceProcess(kind, own, log_dir, label=label)


def status_url(service: ServiceProcess) -> str:
    settings = service.settings
    listen = (
        settings.query_status_listen if service.name == "query" else settings.registry_status_listen
    )
    return f"http://{listen}"


def index_path(service: ServiceProcess) -> str:
    settings = service.settings
    return settings.index_path if service.name == "query" else settings.registry_index_path


async def readiness(http: aiohttp.ClientSession, service: ServiceProcess) -> tuple[int, dict]:
    async with http.get(status_url(service) + "/readyz") as response:
        return response.status, await response.json()


async def wait_ready(service: ServiceProcess, timeout: float = 180) -> dict:
    """Until the replica's status address says ready; its last answer. The timeout only turns a
    replica that never gets there into a failure with its log, instead of a hang."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            assert service.alive(), f"{service.name} exited:\n{tail(service)}"
            try:
                status, body = await readiness(http, service)
                if status == 200:
                    return body
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{service.name} never ready:\n{tail(service)}"
            await asyncio.sleep(0.2)


async def metric(service: ServiceProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples (those with these labels) on the replica's /metrics."""
    async with aiohttp.ClientSession() as http:
        async with http.get(status_url(service) + "/metrics") as response:
            text = await response.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def requests_answered(service: ServiceProcess) -> int:
    """Requests the replica answered on its shared address, status routes left out."""
    async with aiohttp.ClientSession() as http:
        async with http.get(status_url(service) + "/metrics") as response:
            text = await response.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "layerlog_http_requests_total"
                and sample.labels.get("route") not in STATUS_ROUTES
            ):
                total += sample.value
    return int(total)


def tail(service: ServiceProcess, lines: int = 20) -> str:
    if not service.log_path.exists():
        return "(no log)"
    return "\n".join(service.log_path.read_text(errors="replace").splitlines()[-lines:])
