"""Fixtures against the real stack (`deploy/stack up`, which `make test` runs first).

Each test session gets its own topics and bucket, so tests never see another run's records and
can run beside `make run`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from services.core.objectstore import ObjectStore
from services.core.provision import provision, remove_topics
from services.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERLOG_")}
    for name, value in settings.__dict__.items():
        env["LAYERLOG_" + name.upper()] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


def run_topics(run: str) -> dict[str, str]:
    """Settings fields naming topics and a bucket of one run's own (replace(settings, **...)):
    no other run's records or objects are seen."""
    return {
        "commands_topic": f"test-{run}.commands",
        "events_topic": f"test-{run}.events",
        "dead_letter_topic": f"test-{run}.dead-letter",
        "bucket": f"layerlog-test-{run}",
    }


@pytest.fixture(scope="session")
async def settings(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Settings]:
    run = uuid.uuid4().hex[:10]
    port = free_port()
    base = Settings.from_env()
    settings = replace(
        base,
        **run_topics(run),
        # Logins are on by default (services/auth); the features these fixtures serve are
        # tested without them, and tests/registry and tests/test_auth*.py turn them on.
        auth=False,
        partitions=4,
        max_chunk_bytes=1 << 20,
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
        index_path=str(tmp_path_factory.mktemp("index") / "index.sqlite"),
    )
    try:
        await provision(settings, timeout=30)
    except RuntimeError as error:
        pytest.exit(f"the stack is not up ({error}); run the tests with `make test`", returncode=3)
    yield settings
    await remove_topics(settings)


@pytest.fixture(scope="session")
async def store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings)


@asynccontextmanager
async def own_topics(settings: Settings, label: str) -> AsyncIterator[Settings]:
    """Topics and a bucket no other test module's services read: for tests that write records
    straight onto the log (a worker started by another module would act on them)."""
    own = replace(settings, **run_topics(f"{label}-{uuid.uuid4().hex[:8]}"))
    await provision(own, timeout=30)
    try:
        yield own
    finally:
        await remove_topics(own)


class ServiceProcess:
    """One service in its own process, as in production; stopped by its pid."""

    def __init__(self, name: str, settings: Settings, log_dir: Path, label: str = "1") -> None:
        self.name = name
        self.settings = settings
        self.log_path = log_dir / f"{name}-{label}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", self.name],
            env=self._env(),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def _env(self) -> dict[str, str]:
        env = settings_env(self.settings)
        # Replicas run side by side here: unless a test chose the metrics ports, each process
        # gets free ones instead of the defaults, which only one process can hold.
        defaults = Settings()
        if self.settings.worker_metrics_listen == defaults.worker_metrics_listen:
            env["LAYERLOG_WORKER_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"
        if self.settings.verifier_metrics_listen == defaults.verifier_metrics_listen:
            env["LAYERLOG_VERIFIER_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"
        return env

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


async def wait_for_query(settings: Settings, timeout: float = 30, url: str | None = None) -> None:
    """Until the service at url (the query service's by default) is ready: /readyz answers 200
    once its index holds the log as it was when it started."""
    deadline = time.monotonic() + timeout
    url = url or settings.query_url
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not answering at {url}")
            await asyncio.sleep(0.2)


@pytest.fixture(scope="session")
async def stack_services(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, ServiceProcess]]:
    """The three services, running for the whole session."""
    logs = tmp_path_factory.mktemp("service-logs")
    running = {
        "upload-worker": ServiceProcess("upload-worker", settings, logs),
        "verifier": ServiceProcess("verifier", settings, logs),
        "query": ServiceProcess("query", settings, logs),
    }
    for service in running.values():
        service.start()
    await wait_for_query(settings)
    yield running
    for service in running.values():
        service.stop()
    for service in running.values():
        if service.log_path.exists():
            tail = service.log_path.read_text(errors="replace").splitlines()[-5:]
            print(f"--- {service.name} log tail:\n" + "\n".join(tail))


def registry_process(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> ServiceProcess:
    """A registry process on a free port with an index of its own (not yet started)."""
    port = free_port()
    own = replace(
        settings,
        registry_listen=f"127.0.0.1:{port}",
        registry_url=f"http://127.0.0.1:{port}",
        registry_index_path=str(tmp_path_factory.mktemp("registry-index") / "index.sqlite"),
    )
    return ServiceProcess("registry", own, tmp_path_factory.mktemp("registry-logs"))


@pytest.fixture(scope="session")
async def registry(
    settings: Settings,
    stack_services: dict[str, ServiceProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ServiceProcess]:
    """The OCI registry beside the session's services; its URL is .settings.registry_url."""
    service = registry_process(settings, tmp_path_factory).start()
    await wait_for_query(service.settings, url=service.settings.registry_url)
    yield service
    service.stop()


@pytest.fixture()
async def registry_http(registry: ServiceProcess) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session whose relative URLs go to the session's registry."""
    async with aiohttp.ClientSession(base_url=registry.settings.registry_url) as session:
        yield session


@pytest.fixture()
def log_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.fixture()
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's settings in this process's environment, for `layerlog` run in-process."""
    for name, value in settings_env(settings).items():
        if name.startswith("LAYERLOG_"):
            monkeypatch.setenv(name, value)


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs `layerlog ARGV` in-process; returns its exit status, stdout and stderr."""
    from services import cli

    capsys.readouterr()
    status = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return status, out, err
