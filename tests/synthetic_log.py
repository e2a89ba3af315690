"""Events written straight to a run's own events topic, as the upload worker, the verifier and
the repository worker would have written them: enough of them that a new replica takes seconds
to catch up, written in a few.

Each layer is an UploadStarted, a ChunkAppended and a LayerCommitted keyed by its upload id, and
a BlobLinked keyed by its repository; an image is a ManifestStored and a TagMoved keyed by its
repository. Every table of the index gets rows, and a layer is found by HEAD of its blob.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaProducer

from services.core import kafka
from services.core.codec import CODEC
from services.core.eventlog import partition_for
from services.core.principals import Principal
from services.core.records import (
    BlobLinked,
    ChunkAppended,
    LayerCommitted,
    ManifestStored,
    TagMoved,
    UploadStarted,
    new_id,
)
from services.core.settings import Settings
from services.oci.manifest import OCI_MANIFEST

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
EVENTS_PER_LAYER = 4
EVENTS_PER_IMAGE = 2
_START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Layer:
    repository: str
    digest: str
    size: int


class SyntheticLog:
    def __init__(self, settings: Settings, tag: str, repositories: int = 50) -> None:
        self.settings = settings
        self.tag = tag
        self.repositories = repositories

    def layer(self, number: int) -> Layer:
        digest = "sha256:" + hashlib.sha256(f"{self.tag}-{number}".encode()).hexdigest()
        return Layer(f"synthetic/r{number % self.repositories:03d}", digest, 1000 + number)

    def _upload_id(self, number: int) -> str:
        digest = hashlib.sha256(f"upload-{self.tag}-{number}".encode()).hexdigest()
        return f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}"

    def _layer_records(self, number: int) -> list[tuple[str, bytes]]:
        layer, upload_id = self.layer(number), self._upload_id(number)
        at = _START + timedelta(milliseconds=number)
        key = f"uploads/{upload_id}/data"
        common = {"upload_id": upload_id, "repository": layer.repository, "occurred_at": at}
        events = [
            UploadStarted(event_id=new_id(), caused_by=new_id(), staging_key=key, **common),
            ChunkAppended(
                event_id=new_id(),
                caused_by=new_id(),
                offset=0,
                length=layer.size,
                durable_offset=layer.size,
                chunk_sha256=layer.digest[7:],
                **common,
            ),
            LayerCommitted(
                event_id=new_id(),
                caused_by=new_id(),
                digest=layer.digest,
                size=layer.size,
                object_key=key,
                committed_at=at,
                blob_sha256=layer.digest,
                **common,
            ),
        ]
        linked = BlobLinked(
            event_id=new_id(),
            repository=layer.repository,
            caused_by=None,
            occurred_at=at,
            digest=layer.digest,
            size=layer.size,
            object_key=key,
            blob_sha256=layer.digest,
            upload_id=upload_id,
        )
        return [(upload_id, CODEC.encode(e)) for e in events] + [
            (layer.repository, CODEC.encode(linked))
        ]

    def manifest(self, number: int) -> bytes:
        layer = self.layer(number)
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": CONFIG_TYPE, "digest": layer.digest, "size": layer.size},
                "layers": [{"mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size}],
            },
            indent=2,
        ).encode()

    def manifest_digest(self, number: int) -> str:
        return "sha256:" + hashlib.sha256(self.manifest(number)).hexdigest()

    def _image_records(self, number: int, tag: str) -> list[tuple[str, bytes]]:
        repository, body = self.layer(number).repository, self.manifest(number)
        digest, cause = self.manifest_digest(number), new_id()
        stored = ManifestStored(
            event_id=new_id(),
            repository=repository,
            caused_by=cause,
            digest=digest,
            media_type=OCI_MANIFEST,
            size=len(body),
            body=body,
            object_key=f"manifests/sha256/{digest[7:]}",
            subject=None,
            artifact_type=None,
        )
        moved = TagMoved(
            event_id=new_id(),
            repository=repository,
            caused_by=cause,
            tag=tag,
            digest=digest,
            previous_digest=None,
        )
        return [(repository, CODEC.encode(stored)), (repository, CODEC.encode(moved))]

    async def write(self, layers: range, images: dict[int, str] | None = None) -> int:
        """Writes the layers numbered in `layers` and, per {layer number: tag}, an image of that
        layer tagged so; returns the events written."""
        records: list[tuple[str, bytes]] = []
        for number in layers:
            records += self._layer_records(number)
        for number, tag in (images or {}).items():
            records += self._image_records(number, tag)
        await produce(self.settings, records)
        return len(records)


async def produce(settings: Settings, records: list[tuple[str, bytes]]) -> None:
    """Writes (key, value) records to the events topic in whole batches: a record at a time
    would take minutes for the hundreds of thousands a catch-up test needs."""
    producer = AIOKafkaProducer(
        **kafka.connection(settings, Principal.ADMIN),
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    try:
        partitions = settings.partitions
        batches = {p: producer.create_batch() for p in range(partitions)}
        sent = []
        for key, value in records:
            partition = partition_for(key, partitions)
            raw = key.encode()
            if batches[partition].append(key=raw, value=value, timestamp=None) is None:
                sent.append(
                    await producer.send_batch(
                        batches[partition], settings.events_topic, partition=partition
                    )
                )
                batches[partition] = producer.create_batch()
                batches[partition].append(key=raw, value=value, timestamp=None)
        for partition, batch in batches.items():
            if batch.record_count():
                sent.append(
                    await producer.send_batch(batch, settings.events_topic, partition=partition)
                )
        for delivery in sent:
            await delivery
    finally:
        await producer.stop()
