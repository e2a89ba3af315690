"""Repository commands straight onto the commands topic, and their events read back from the
events topic as a read_committed consumer sees them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.core.codec import CODEC
from services.core.eventlog import LoggedRecord, partition_for
from services.core.kafka import connection
from services.core.principals import Principal
from services.core.records import PutManifest, RepositoryCommand, RepositoryEvent
from services.core.settings import Settings
from services.oci.manifest import OCI_INDEX, OCI_MANIFEST

WAIT_SECONDS = 60.0


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_blobs(seed: str) -> tuple[bytes, bytes]:
    """The config and the layer that image_manifest(seed) names, for tests that push them."""
    return f"config {seed}".encode(), f"layer {seed}".encode()


def image_manifest(seed: str, subject: str | None = None) -> bytes:
    """A valid OCI image manifest; seed makes its digest unique."""
    config, layer = image_blobs(seed)
    document: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha256(layer),
                "size": len(layer),
            }
        ],
    }
    if subject is not None:
        document["subject"] = {"mediaType": OCI_MANIFEST, "digest": subject, "size": 10}
    return json.dumps(document, indent=1).encode()


def index_manifest(children: Iterable[bytes]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": sha256(c), "size": len(c)} for c in children
            ],
        }
    ).encode()


def put(
    repository: str, reference: str, body: bytes, media_type: str = OCI_MANIFEST
) -> PutManifest:
    return PutManifest(
        repository=repository,
        reference=reference,
        digest=sha256(body),
        media_type=media_type,
        body=body,
    )


async def produce(
    settings: Settings, commands: Iterable[RepositoryCommand], key: bytes | None = None
) -> None:
    """Each command keyed by its repository (or by key), in order."""
    producer = AIOKafkaProducer(**connection(settings, Principal.CLIENT), acks="all")
    await producer.start()
    try:
        for command in commands:
            await producer.send_and_wait(
                settings.commands_topic,
                CODEC.encode(command),
                key=command.repository.encode() if key is None else key,
            )
    finally:
        await producer.stop()


class RepositoryLog:
    """The committed events of some repositories, read as they arrive, in log order:
    `async with RepositoryLog(settings, names) as log`."""

    def __init__(self, settings: Settings, repositories: Iterable[str]) -> None:
        self.settings = settings
        self.repositories = {name.encode() for name in repositories}
        self.events: list[LoggedRecord] = []
        self.consumer = AIOKafkaConsumer(
            **connection(settings, Principal.AUDITOR),
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=16 << 20,
        )

    async def __aenter__(self) -> RepositoryLog:
        await self.consumer.start()
        await self.consumer._client.add_topic(self.settings.events_topic)
        count = len(self.consumer.partitions_for_topic(self.settings.events_topic) or ())
        assert count, "the events topic has no partitions"
        partitions = {partition_for(k.decode(), count) for k in self.repositories}
        tps = [TopicPartition(self.settings.events_topic, p) for p in sorted(partitions)]
        self.consumer.assign(tps)
        for tp in tps:
            self.consumer.seek(tp, 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.consumer.stop()

    async def wait_for(self, count: int, repository: str | None = None) -> list[RepositoryEvent]:
        """The first count events (of one repository, or of all), once that many arrived."""
        deadline = time.monotonic() + WAIT_SECONDS
        while len(found := self.of(repository)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} of {count} events of {repository} arrived")
            await self._read(200)
        return found[:count]

    async def settled(self, seconds: float = 1.0) -> None:
        """Reads on for a while, so that events nobody expected would show up too."""
        await asyncio.sleep(seconds)
        await self._read(500)

    def of(self, repository: str | None = None) -> list[RepositoryEvent]:
        return [e.record for e in self.raw(repository)]

    def raw(self, repository: str | None = None) -> list[LoggedRecord]:
        return [e for e in self.events if repository is None or e.record.repository == repository]

    async def _read(self, timeout_ms: int) -> None:
        batch = await self.consumer.getmany(timeout_ms=timeout_ms)
        for tp, messages in batch.items():
            for message in messages:
                if message.key in self.repositories:
                    value = message.value or b""
                    self.events.append(
                        LoggedRecord(
                            tp.topic,
                            tp.partition,
                            message.offset,
                            message.timestamp,
                            CODEC.decode(value),
                            value,
                        )
                    )
