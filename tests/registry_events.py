"""Repository events as the registry worker writes them, put straight on the session's events
topic (keyed by repository), and query services to read them back through HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from services.core import kafka
from services.core.codec import CODEC
from services.core.principals import Principal
from services.core.records import (
    ManifestDeleted,
    ManifestStored,
    RepositoryCommand,
    RepositoryEvent,
    TagDeleted,
    TagMoved,
    new_id,
)
from services.core.settings import Settings
from services.oci.manifest import OCI_MANIFEST
from tests.conftest import ROOT, free_port, settings_env, wait_for_query

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
E = TypeVar("E", bound=RepositoryEvent)


def repository_event(kind: type[E], repository: str, cause: str | None, **fields: Any) -> E:
    """An event of the repository, with a fresh id, caused by the command `cause`."""
    return kind(event_id=new_id(), repository=repository, caused_by=cause, **fields)


def digest_of(body: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


def image_manifest(
    seed: str,
    *,
    subject: tuple[str, int] | None = None,
    artifact_type: str | None = None,
    annotations: dict[str, str] | None = None,
) -> bytes:
    """An OCI image manifest, unique per seed (its one layer's digest is made from it)."""
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest_of(b"{}"), "size": 2},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest_of(seed.encode()),
                "size": len(seed),
            }
        ],
    }
    if artifact_type is not None:
        document["artifactType"] = artifact_type
    if subject is not None:
        document["subject"] = {"mediaType": OCI_MANIFEST, "digest": subject[0], "size": subject[1]}
    if annotations:
        document["annotations"] = annotations
    # Indented, unlike any re-encoding: serving these exact bytes is what is checked.
    return json.dumps(document, indent=3).encode()


class EventWriter:
    """Writes repository events (and commands) keyed by repository, as the worker would."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = kafka.producer(settings, Principal.ADMIN)

    async def __aenter__(self) -> EventWriter:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.producer.stop()

    async def events(self, *events: RepositoryEvent) -> None:
        for event in events:
            await self.raw(event.repository, CODEC.encode(event))

    async def raw(self, repository: str, value: bytes, topic: str | None = None) -> None:
        await self.producer.send_and_wait(
            topic or self.settings.events_topic, value=value, key=repository.encode()
        )

    async def command(self, command: RepositoryCommand) -> None:
        await self.raw(command.repository, CODEC.encode(command), self.settings.commands_topic)

    async def manifest(
        self,
        repository: str,
        body: bytes,
        *,
        tag: str | None = None,
        previous: str | None = None,
        algorithm: str = "sha256",
        subject: str | None = None,
        artifact_type: str | None = None,
        command_id: str | None = None,
    ) -> str:
        """ManifestStored, then TagMoved for a tag, caused by one command; returns the digest."""
        digest = digest_of(body, algorithm)
        cause = command_id or new_id()
        stored = repository_event(
            ManifestStored,
            repository,
            cause,
            digest=digest,
            media_type=OCI_MANIFEST,
            size=len(body),
            body=body,
            object_key=f"manifests/{repository}/{digest}",
            subject=subject,
            artifact_type=artifact_type,
        )
        await self.events(stored)
        if tag is not None:
            await self.move(repository, tag, digest, previous, cause)
        return digest

    async def move(
        self, repository: str, tag: str, digest: str, previous: str | None, cause: str
    ) -> None:
        moved = dict(tag=tag, digest=digest, previous_digest=previous)
        await self.events(repository_event(TagMoved, repository, cause, **moved))

    async def delete_manifest(self, repository: str, digest: str, tags: list[str]) -> str:
        cause = new_id()
        untagged = [
            repository_event(TagDeleted, repository, cause, tag=tag, previous_digest=digest)
            for tag in tags
        ]
        deleted = repository_event(ManifestDeleted, repository, cause, digest=digest)
        await self.events(*untagged, deleted)
        return cause


def unique_repository(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex[:8]}"


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    """Polls check() until it holds: the projection applies events when it gets to them. The
    timeout only turns a projection that never gets there into a failure instead of a hang."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def query_service(
    settings: Settings, log_path: Path, *, index: Path, read_only: bool = False
) -> AsyncIterator[Settings]:
    """`layerlog query` as its own process on a free port; yields the settings to reach it."""
    port = free_port()
    served = replace(
        settings,
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
        index_path=str(index),
    )
    argv = [sys.executable, "-m", "services.cli", "query"]
    if read_only:
        argv += ["--index", str(index), "--read-only"]
    process = await asyncio.to_thread(_spawn, argv, settings_env(served), log_path)
    try:
        await wait_for_query(served)
        yield served
    finally:
        process.send_signal(2)  # SIGINT: the service's own clean stop
        try:
            await asyncio.to_thread(process.wait, 20)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
