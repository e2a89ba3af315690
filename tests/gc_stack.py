"""A stack of its own for the garbage-collection tests, on the real Kafka and S3: topics and a
bucket no other module's services read (a sweep with no grace period would reclaim what other
tests unlinked), the query service and the registry as processes, and the upload worker and the
verifier in this process, where a test can stop them at a checkpoint (services/core/checkpoints)
and the collector's phases run one at a time between."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp

from services.client import LayerService
from services.core.checkpoints import Step
from services.core.objectstore import ObjectStore
from services.core.provision import provision, remove_topics
from services.core.settings import Settings
from services.gc.service import open_collector
from services.gc.sweep import Sweeper
from services.query.index import Index
from tests.conftest import ServiceProcess, free_port, run_topics, wait_for_query


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Pause:
    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    async def wait_reached(self, timeout: float = 60) -> None:
        await asyncio.wait_for(self.reached.wait(), timeout)


class Pauses:
    """A checkpoint that stops a service at the steps armed for a digest, once each, until the
    test lets it go."""

    def __init__(self) -> None:
        self.armed: dict[tuple[Step, str], Pause] = {}
        self.passed: list[Pause] = []  # reached: released by the test, or by release_all

    def arm(self, step: Step, digest: str) -> Pause:
        pause = self.armed[(step, digest)] = Pause()
        return pause

    def release_all(self) -> None:
        """Lets every stopped service go and disarms the rest (after a failed test)."""
        for pause in self.armed.values():
            pause.go.set()
        self.armed.clear()
        for pause in self.passed:
            pause.go.set()

    async def __call__(self, step: Step, digest: str) -> None:
        pause = self.armed.pop((step, digest), None)
        if pause is not None:
            self.passed.append(pause)
            pause.reached.set()
            await pause.go.wait()


@dataclass
class GcStack:
    settings: Settings
    store: ObjectStore
    pauses: Pauses
    registry_url: str
    sweeper: Sweeper
    tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=dict)

    @property
    def index(self) -> Index:
        return self.sweeper.index

    # The in-process services

    def start(self, name: str) -> None:
        from services.upload_worker import service as worker
        from services.verifier import service as verifier

        run = {"verifier": verifier.run, "upload-worker": worker.run}[name]
        stop = asyncio.Event()
        task = asyncio.create_task(run(self.settings, stop, self.pauses))
        self.tasks[name] = (task, stop)

    async def kill(self, name: str) -> None:
        """As a crash: the task is cancelled wherever it is, nothing more is committed."""
        task, _ = self.tasks.pop(name)
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    async def stop_all(self) -> None:
        for _task, stop in self.tasks.values():
            stop.set()
        for task, _ in self.tasks.values():
            with suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
        self.tasks.clear()

    # Pushing and reading

    async def push(self, repository: str, data: bytes) -> str:
        async with LayerService(self.settings, finish_timeout=90) as service:
            upload = await service.upload(repository)
            await upload.write(data)
            await upload.finish(len(data), sha256(data))
            return upload.uuid

    async def fetch(self, repository: str, digest: str) -> bytes:
        async with LayerService(self.settings) as service:
            layer = await service.fetch(repository, digest)
            try:
                return await layer.read()
            finally:
                await layer.close()

    async def registry_push(
        self, http: aiohttp.ClientSession, repository: str, data: bytes
    ) -> None:
        """As a registry client does: a mount by content discovery first, else a monolithic
        upload (the spec's fallback when the registry answers 202 to the mount)."""
        digest = sha256(data)
        url = f"{self.registry_url}/v2/{repository}/blobs/uploads/"
        async with http.post(url, params={"mount": digest}) as mounted:
            if mounted.status == 201:
                return
            assert mounted.status == 202, (mounted.status, await mounted.text())
            location = mounted.headers["Location"]
        if not location.startswith("http"):
            location = self.registry_url + location
        async with http.put(location, params={"digest": digest}, data=data) as put:
            assert put.status == 201, (put.status, await put.text())

    async def registry_get(self, http: aiohttp.ClientSession, repository: str, digest: str):
        async with http.get(f"{self.registry_url}/v2/{repository}/blobs/{digest}") as response:
            return response.status, await response.read()

    async def unlink(self, http: aiohttp.ClientSession, repository: str, digest: str) -> None:
        async with http.delete(f"{self.registry_url}/v2/{repository}/blobs/{digest}") as answer:
            assert answer.status == 202, (answer.status, await answer.text())

    async def caught_up(self) -> None:
        await self.sweeper.follower.catch_up()

    def linked(self) -> list[tuple[str, str]]:
        """Every (repository, digest) the collector's index says is linked."""
        db = self.index._connection()
        return db.execute(
            "SELECT repository, digest FROM blob_links WHERE linked = 1 ORDER BY 1, 2"
        ).fetchall()


@asynccontextmanager
async def gc_stack(
    base: Settings, tmp: Path, label: str, *, grace_seconds: int = 0
) -> AsyncIterator[GcStack]:
    own = replace(
        base,
        **run_topics(f"{label}-{os.urandom(4).hex()}"),
        query_listen=f"127.0.0.1:{(query_port := free_port())}",
        query_url=f"http://127.0.0.1:{query_port}",
        index_path=str(tmp / "query-index.sqlite"),
        registry_listen=f"127.0.0.1:{(registry_port := free_port())}",
        registry_url=f"http://127.0.0.1:{registry_port}",
        registry_index_path=str(tmp / "registry-index.sqlite"),
        worker_metrics_listen=f"127.0.0.1:{free_port()}",
        verifier_metrics_listen=f"127.0.0.1:{free_port()}",
        gc_grace_seconds=grace_seconds,
        gc_index_path=str(tmp / "gc-index.sqlite"),
    )
    await provision(own, timeout=30)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    processes = [ServiceProcess("query", own, logs), ServiceProcess("registry", own, logs)]
    for process in processes:
        process.start()
    pauses = Pauses()
    try:
        await wait_for_query(own)
        await wait_for_query(own, url=own.registry_url)
        async with open_collector(own, own.gc_index_path) as sweeper:
            stack = GcStack(own, ObjectStore(own), pauses, own.registry_url, sweeper)
            stack.start("upload-worker")
            stack.start("verifier")
            try:
                yield stack
            finally:
                pauses.release_all()
                await stack.stop_all()
    finally:
        for process in processes:
            process.stop()
        await remove_topics(own)


async def until(predicate, timeout: float = 30, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.05)
