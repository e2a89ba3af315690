"""The registry and every service behind it, on topics and a bucket of their own.

`python -m services.cli registry` serves the OCI distribution API on a free port; the upload
worker, the verifier and the query service run beside it as in `make run`. They are fresh
processes on a fresh topic/bucket set, so the memory each one reports is this package's doing
and the conformance suite's repositories start empty.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest

from services.core.provision import provision, remove_topics
from services.core.settings import Settings
from tests.authfiles import USERS, with_auth
from tests.conftest import ServiceProcess, free_port, registry_process, wait_for_query
from tests.registry.clients import Clients

# Generous for a loaded 2-core machine, and bounded: a registry that never answers fails the
# session's registry tests with its log instead of hanging them.
REGISTRY_START_TIMEOUT = 90.0


def log_tail(service: ServiceProcess, lines: int = 30) -> str:
    if not service.log_path.exists():
        return "(no log)"
    return "\n".join(service.log_path.read_text(errors="replace").splitlines()[-lines:])


async def wait_for_registry(registry: ServiceProcess, url: str, timeout: float) -> None:
    """Until GET /v2/ answers (the spec's end-1 check); fails at once if the process exits."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            if not registry.alive():
                code = registry.process.returncode if registry.process else None
                pytest.fail(
                    f"the registry service did not start (`python -m services.cli registry` "
                    f"exited {code}); its log:\n{log_tail(registry)}",
                    pytrace=False,
                )
            try:
                async with http.get(url + "/v2/") as response:
                    # 401 with a challenge is the answer of a registry with logins on.
                    if response.status == 200 or (
                        response.status == 401 and "WWW-Authenticate" in response.headers
                    ):
                        return
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                last = repr(error)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the registry service did not answer GET {url}/v2/ with 200 within "
                    f"{timeout:.0f}s (last: {last}); its log:\n{log_tail(registry)}",
                    pytrace=False,
                )
            await asyncio.sleep(0.3)


@dataclass
class Registry:
    host: str  # HOST:PORT, as clients and the conformance runner take it
    url: str
    services: dict[str, ServiceProcess]


@pytest.fixture(scope="session")
async def registry_settings(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    run = f"registry-{uuid.uuid4().hex[:8]}"
    address = f"127.0.0.1:{free_port()}"
    topics = {
        f"{kind}_topic": f"test-{run}.{kind}" for kind in ("commands", "events", "dead_letter")
    }
    index = tmp_path_factory.mktemp("registry-query") / "index.sqlite"
    query = {"query_listen": address, "query_url": f"http://{address}", "index_path": str(index)}
    own = with_auth(
        replace(settings, bucket=f"layerlog-{run}", **query, **topics),
        tmp_path_factory.mktemp("registry-auth"),
    )
    await provision(own, timeout=30)
    yield own
    await remove_topics(own)


@pytest.fixture(scope="session")
async def registry(
    registry_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Registry]:
    logs = tmp_path_factory.mktemp("registry-logs")
    services: dict[str, ServiceProcess] = {
        name: ServiceProcess(name, registry_settings, logs)
        for name in ("upload-worker", "verifier", "query")
    }
    services["registry"] = registry_process(registry_settings, tmp_path_factory)
    listen = services["registry"].settings.registry_listen
    for service in services.values():
        service.start()
    try:
        await wait_for_query(registry_settings)
        await wait_for_registry(services["registry"], f"http://{listen}", REGISTRY_START_TIMEOUT)
        yield Registry(host=listen, url=f"http://{listen}", services=services)
    finally:
        for service in services.values():
            service.stop()
        for name, service in services.items():
            print(f"--- {name} log tail:\n{log_tail(service, 5)}")


@pytest.fixture()
def clients(registry: Registry, tmp_path: Path) -> Clients:
    """The clients, logged in as the admin."""
    clients = Clients(registry.host, tmp_path)
    clients.log_in("admin", USERS["admin"])
    return clients
