"""A pipeline of its own for each fault test module: fresh topics and bucket, services that the
test kills and restarts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.core.objectstore import ObjectStore
from services.core.provision import provision
from services.core.settings import Settings
from tests.conftest import (
    ServiceProcess,
    free_port,
    registry_process,
    run_topics,
    wait_for_query,
)
from tests.registry.conftest import REGISTRY_START_TIMEOUT, wait_for_registry


class Pipeline:
    def __init__(
        self, settings: Settings, log_dir: Path, registry: ServiceProcess | None = None
    ) -> None:
        self.settings = settings
        self.services = {
            "upload-worker": ServiceProcess("upload-worker", settings, log_dir),
            "verifier": ServiceProcess("verifier", settings, log_dir),
            "query": ServiceProcess("query", settings, log_dir),
        }
        if registry is not None:
            self.services["registry"] = registry

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]

    async def start(self) -> None:
        for service in self.services.values():
            service.start()
        await wait_for_query(self.settings)
        if "registry" in self.services:
            await self.wait_for_registry()

    async def wait_for_registry(self) -> None:
        registry = self.services["registry"]
        await wait_for_registry(registry, registry.settings.registry_url, REGISTRY_START_TIMEOUT)

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {s.name}:\n"
            + "\n".join(s.log_path.read_text(errors="replace").splitlines()[-15:])
            for s in self.services.values()
            if s.log_path.exists()
        )


def fresh_run(settings: Settings, label: str, tmp_path: Path) -> Settings:
    """settings with topics of a run of its own, a free query port and an index under tmp_path."""
    port = free_port()
    return replace(
        settings,
        **run_topics(f"{label}-{uuid.uuid4().hex[:10]}"),
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
        index_path=str(tmp_path / "index.sqlite"),
    )


@pytest.fixture()
async def fault_settings(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    fresh = fresh_run(settings, "fault", tmp_path)
    await provision(fresh, timeout=60)
    yield fresh


@pytest.fixture()
async def pipeline(fault_settings: Settings, tmp_path: Path) -> AsyncIterator[Pipeline]:
    running = Pipeline(fault_settings, tmp_path)
    await running.start()
    yield running
    running.stop()
    print(running.logs())


@pytest.fixture()
async def registry_pipeline(
    fault_settings: Settings, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pipeline]:
    """The pipeline with an OCI registry beside it, on a free port with an index of its own
    (the registry ServiceProcess's .settings name both)."""
    running = Pipeline(fault_settings, tmp_path, registry_process(fault_settings, tmp_path_factory))
    await running.start()
    yield running
    running.stop()
    print(running.logs())


@pytest.fixture()
def fault_store(fault_settings: Settings) -> ObjectStore:
    return ObjectStore(fault_settings)
