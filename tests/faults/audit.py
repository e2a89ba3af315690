"""The checks every fault test ends with: what the log, the bucket and the index must say."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from services.client import LayerService
from services.core.eventlog import read_partition
from services.core.objectstore import ObjectStore
from services.core.records import VERDICTS, LayerCommitted, RepositoryEvent
from services.core.settings import Settings
from services.query.replay import cut_offsets, rebuild


@dataclass
class Outcomes:
    """What the clients saw: the uploads they finished, cancelled or saw fail."""

    committed: dict[str, tuple[str, str, str]] = field(
        default_factory=dict
    )  # id: name, digest, sha
    cancelled: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)


async def events_by_upload(settings: Settings) -> dict[str, list[object]]:
    found: dict[str, list[object]] = defaultdict(list)
    for partition in range(settings.partitions):
        async for logged in read_partition(settings, settings.events_topic, partition):
            # Repository events (manifests, tags, blob links) share the topic, keyed by
            # repository: they belong to no upload.
            if logged.record is not None and not isinstance(logged.record, RepositoryEvent):
                found[logged.record.upload_id].append(logged.record)
    return found


async def assert_consistent(settings: Settings, store: ObjectStore, outcomes: Outcomes, tmp: Path):
    events = await events_by_upload(settings)
    for upload_id, per_upload in events.items():
        verdicts = [e for e in per_upload if isinstance(e, VERDICTS)]
        assert len(verdicts) <= 1, f"{upload_id} has {len(verdicts)} verdicts"
    async with LayerService(settings, finish_timeout=60) as service:
        for upload_id, (name, digest, blob_sha) in outcomes.committed.items():
            commits = [e for e in events[upload_id] if isinstance(e, LayerCommitted)]
            assert len(commits) == 1, f"{upload_id}: {len(commits)} LayerCommitted"
            layer = await service.fetch(name, digest)
            hasher = hashlib.sha256()
            while chunk := await layer.read(4 << 20):
                hasher.update(chunk)
            await layer.close()
            assert hasher.hexdigest() == blob_sha, f"{upload_id}: bytes differ"
    for upload_id in outcomes.cancelled | outcomes.failed:
        assert await store.list_keys(f"uploads/{upload_id}/") == [], upload_id
        assert await store.multipart_uploads(f"uploads/{upload_id}/") == [], upload_id
    await assert_index_matches_replay(settings, tmp)


TABLES = {
    "layers": "SELECT * FROM layers ORDER BY repository, digest",
    "uploads": "SELECT * FROM uploads ORDER BY upload_id",
    "rejections": "SELECT * FROM rejections ORDER BY command_id",
    # What the registry's pushes leave: every index projects them, the query service's too.
    "manifests": "SELECT * FROM manifests ORDER BY repository, digest",
    "tags": "SELECT * FROM tags ORDER BY repository, tag",
    "blob_links": "SELECT * FROM blob_links ORDER BY repository, digest",
    "outcomes": "SELECT * FROM outcomes ORDER BY command_id, event_id",
    # The collector's view and its reclaims (services/gc), projected into every index alike.
    "blob_objects": "SELECT * FROM blob_objects ORDER BY object_key",
    "manifest_objects": "SELECT * FROM manifest_objects ORDER BY digest",
    "reclaims": "SELECT * FROM reclaims ORDER BY event_id",
}


def _rows(path: str) -> dict[str, list[tuple]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {table: db.execute(query).fetchall() for table, query in TABLES.items()}
    finally:
        db.close()


def _offsets(path: str, topic: str) -> dict[int, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,))
        return dict(rows.fetchall())
    finally:
        db.close()


async def assert_index_matches_replay(
    settings: Settings, tmp: Path, index_path: str | None = None
) -> None:
    """The live index (the query service's, or the one at index_path: a registry's), once caught
    up, equals one rebuilt from the log alone."""
    index_path = index_path or settings.index_path
    cut = await cut_offsets(settings)
    deadline = time.monotonic() + 60
    while True:
        live = await asyncio.to_thread(_offsets, index_path, settings.events_topic)
        if all(live.get(p, 0) >= offset for p, offset in cut.items() if offset):
            break
        assert time.monotonic() < deadline, f"live index stuck at {live}, log at {cut}"
        await asyncio.sleep(0.2)
    cut = {p: live.get(p, 0) for p in cut}
    replayed = tmp / f"replayed-{time.monotonic_ns()}.sqlite"
    await rebuild(settings, replayed, cut)
    live_rows = await asyncio.to_thread(_rows, index_path)
    replayed_rows = await asyncio.to_thread(_rows, str(replayed))
    for table in TABLES:
        assert live_rows[table] == replayed_rows[table], (
            f"{index_path}: {table} differs from the replay"
        )
