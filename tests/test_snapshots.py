"""Snapshots on the real stack: a new replica starts from the newest usable snapshot in S3 and
replays only the log after it; corrupt, partial and out-of-range snapshots are skipped, logged and
counted; the index it builds equals a replay of the log from zero; old snapshots are pruned."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import RecordsToDelete

from services.core import kafka
from services.core.objectstore import ObjectStore
from services.core.principals import Principal
from services.core.settings import Settings
from services.query.index import canonical_digest
from services.query.replay import rebuild
from services.query.snapshots import (
    INDEX_NAME,
    MANIFEST_NAME,
    SnapshotManifest,
    Snapshots,
    file_sha256,
    index_offsets,
)
from tests.conftest import ServiceProcess, free_port, own_topics, run_cli, settings_env
from tests.replicas import index_path, metric, replica, status_url, tail, wait_ready
from tests.synthetic_log import EVENTS_PER_LAYER, SyntheticLog

pytestmark = pytest.mark.usefixtures("stack_services")


class Stage:
    """A log of its own, and the replica that followed it from the start."""

    def __init__(self, settings: Settings, synthetic: SyntheticLog, first: ServiceProcess) -> None:
        self.settings = settings
        self.synthetic = synthetic
        self.first = first
        self.snapshots = Snapshots(settings)
        self.store = ObjectStore(settings)

    def key(self, snapshot_id: str, name: str) -> str:
        return f"{self.snapshots.prefix}{snapshot_id}/{name}"


@pytest.fixture()
async def stage(settings: Settings, tmp_path: Path) -> AsyncIterator[Stage]:
    async with own_topics(settings, "snap") as own:
        synthetic = SyntheticLog(own, uuid.uuid4().hex[:8])
        await synthetic.write(range(2000), images={0: "v1", 1: "v1", 2: "latest"})
        first = replica("query", own, tmp_path, "first", port=free_port(), reuse_port=False)
        first.start()
        try:
            await wait_ready(first)
            yield Stage(own, synthetic, first)
        finally:
            first.stop()
            await ObjectStore(own).delete_prefix("snapshots/")


async def snapshot_cli(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    *argv: str,
) -> tuple[int, str, str]:
    """`layerlog snapshot ARGV` in-process, with these settings in the environment."""
    for name, value in settings_env(settings).items():
        if name.startswith("LAYERLOG_"):
            monkeypatch.setenv(name, value)
    return await run_cli(capsys, "snapshot", *argv)


async def take(stage: Stage, capsys, monkeypatch) -> dict:
    status, out, err = await snapshot_cli(
        capsys, monkeypatch, stage.settings, "--index", index_path(stage.first), "--json"
    )
    assert status == 0, err
    return json.loads(out)


async def start_new(stage: Stage, tmp_path: Path, label: str, kind: str = "query") -> tuple:
    """A replica on an index that does not exist yet; (the process, its /readyz once ready)."""
    service = replica(kind, stage.settings, tmp_path, label, port=free_port(), reuse_port=False)
    service.start()
    return service, await wait_ready(service)


async def has_layer(service: ServiceProcess, layer) -> bool:
    url = service.settings.query_url if service.name == "query" else service.settings.registry_url
    async with aiohttp.ClientSession() as http:
        async with http.head(f"{url}/v2/{layer.repository}/blobs/{layer.digest}") as response:
            assert response.status in (200, 404), response.status
            return response.status == 200


async def until_offsets(path: str, topic: str, offsets: dict[int, int]) -> None:
    deadline = time.monotonic() + 60
    while await asyncio.to_thread(index_offsets, path, topic) != offsets:
        assert time.monotonic() < deadline, "the index never reached the log's end"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", ["query", "registry"])
async def test_a_new_replica_starts_from_the_snapshot_and_replays_only_the_tail(
    stage, tmp_path, capsys, monkeypatch, kind
):
    taken = await take(stage, capsys, monkeypatch)
    offsets = {int(p): o for p, o in taken["offsets"].items()}
    assert sum(offsets.values()) == 2000 * EVENTS_PER_LAYER + 3 * 2  # the whole log so far
    assert taken["size"] > 0 and len(taken["sha256"]) == 64 and taken["pruned"] == []
    tail_events = await stage.synthetic.write(range(2000, 2300), images={2000: "v2"})
    service, ready = await start_new(stage, tmp_path, f"new-{kind}", kind)
    try:
        assert ready["snapshot"] == taken["snapshot_id"]
        assert await metric(service, "layerlog_snapshot_restores_total") == 1
        # Only the events after the snapshot were applied, and it has those before it too.
        async with aiohttp.ClientSession() as http:
            async with http.get(status_url(service) + "/healthz") as response:
                assert (await response.json())["events_applied"] == tail_events
        for number in (0, 1999, 2000, 2299):
            assert await has_layer(service, stage.synthetic.layer(number)), number
        assert f"starts from snapshot {taken['snapshot_id']}" in service.log_path.read_text()
    finally:
        service.stop()


async def test_an_index_from_snapshot_and_tail_equals_a_replay_from_zero(
    stage, tmp_path, capsys, monkeypatch
):
    await take(stage, capsys, monkeypatch)
    # 2001 moves r001:v1 (layer 1 tagged it first), 2002 adds r002:v3: four tags in all.
    await stage.synthetic.write(range(2000, 2500), images={2001: "v1", 2002: "v3"})
    service, _ = await start_new(stage, tmp_path, "from-snapshot")
    try:
        restored = index_path(service)
        offsets = await asyncio.to_thread(index_offsets, restored, stage.settings.events_topic)
        await until_offsets(index_path(stage.first), stage.settings.events_topic, offsets)
        from_zero = tmp_path / "from-zero.sqlite"
        await rebuild(stage.settings, from_zero, offsets)  # `layerlog replay`'s own rebuild
        digest, counts = await asyncio.to_thread(canonical_digest, restored)
        assert (digest, counts) == await asyncio.to_thread(canonical_digest, str(from_zero))
        # And the replica that followed the whole log live.
        assert await asyncio.to_thread(canonical_digest, index_path(stage.first)) == (
            digest,
            counts,
        )
        assert counts["layers"] == 2500 and counts["tags"] == 4 and counts["blob_links"] == 2500
    finally:
        service.stop()


async def test_a_corrupt_newest_snapshot_is_skipped_for_an_older_one(
    stage, tmp_path, capsys, monkeypatch
):
    good = await take(stage, capsys, monkeypatch)
    await stage.synthetic.write(range(2000, 2100))
    await until_offsets(
        index_path(stage.first), stage.settings.events_topic, await log_end(stage.settings)
    )
    newest = await take(stage, capsys, monkeypatch)
    key = stage.key(newest["snapshot_id"], INDEX_NAME)
    data = bytearray(await stage.store.get(key))
    data[len(data) // 2] ^= 0x55  # one byte: the size is right, the checksum is not
    await stage.store.put(key, bytes(data))
    service, ready = await start_new(stage, tmp_path, "after-corruption")
    try:
        assert ready["snapshot"] == good["snapshot_id"]
        skipped = "layerlog_snapshots_skipped_total"
        assert await metric(service, skipped, reason="checksum_mismatch") == 1
        assert await metric(service, skipped) == 1
        text = service.log_path.read_text()
        assert f"{newest['snapshot_id']} skipped: checksum_mismatch" in text, tail(service)
        # From the older snapshot it replayed the longer tail, and has every layer.
        assert await has_layer(service, stage.synthetic.layer(2099))
        assert await has_layer(service, stage.synthetic.layer(0))
    finally:
        service.stop()


async def test_a_partial_snapshot_without_its_manifest_is_skipped(
    stage, tmp_path, capsys, monkeypatch
):
    good = await take(stage, capsys, monkeypatch)
    partial = await take(stage, capsys, monkeypatch)
    # As if its writer died between the two uploads: the manifest is written last.
    await stage.store.delete(stage.key(partial["snapshot_id"], MANIFEST_NAME))
    listed = await stage.snapshots.list()
    assert [(s.snapshot_id, s.complete) for s in listed] == [
        (partial["snapshot_id"], False),
        (good["snapshot_id"], True),
    ]
    service, ready = await start_new(stage, tmp_path, "after-partial")
    try:
        assert ready["snapshot"] == good["snapshot_id"]
        skipped = "layerlog_snapshots_skipped_total"
        assert await metric(service, skipped, reason="manifest_missing") == 1
        assert f"{partial['snapshot_id']} skipped: manifest_missing" in service.log_path.read_text()
        assert await has_layer(service, stage.synthetic.layer(1999))
    finally:
        service.stop()


async def log_end(settings: Settings) -> dict[int, int]:
    consumer = kafka.consumer(settings, Principal.AUDITOR, [], None)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
        return {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def upload_doctored(stage: Stage, tmp_path: Path, shift: int) -> str:
    """A snapshot whose file and manifest agree with each other, but whose offsets are the
    first replica's moved by `shift`: a snapshot of some other log, as far as this one goes."""
    copy = tmp_path / f"doctored-{shift}.sqlite"
    source = sqlite3.connect(index_path(stage.first))
    source.execute("VACUUM INTO ?", (str(copy),))
    source.close()
    db = sqlite3.connect(copy)
    with db:
        db.execute("UPDATE offsets SET next_offset = next_offset + ?", (shift,))
    db.close()
    snapshot_id = "29991231T235959.000000Z-doctored"  # newest of all
    digest, size = file_sha256(str(copy))
    offsets = index_offsets(str(copy), stage.settings.events_topic)
    manifest = SnapshotManifest(
        snapshot_id, stage.settings.events_topic, offsets, digest, size, "2999-12-31", "test"
    )
    await stage.store.put_file(stage.key(snapshot_id, INDEX_NAME), str(copy))
    await stage.store.put(stage.key(snapshot_id, MANIFEST_NAME), manifest.to_json())
    return snapshot_id


async def test_snapshots_beyond_the_log_end_or_below_its_start_are_skipped(
    stage, tmp_path, capsys, monkeypatch
):
    old = await take(stage, capsys, monkeypatch)
    # Retention (here: DeleteRecords) moves partition 0's start past the snapshot's offset.
    await stage.synthetic.write(range(2000, 2400))
    ends = await log_end(stage.settings)
    client = kafka.admin(stage.settings, Principal.ADMIN)
    await client.start()
    try:
        tp = TopicPartition(stage.settings.events_topic, 0)
        await client.delete_records({tp: RecordsToDelete(ends[0])})
    finally:
        await client.close()
    beyond = await upload_doctored(stage, tmp_path, shift=1_000_000)
    service, ready = await start_new(stage, tmp_path, "out-of-range")
    try:
        skipped = "layerlog_snapshots_skipped_total"
        assert await metric(service, skipped, reason="offsets_beyond_end") == 1
        assert await metric(service, skipped, reason="offsets_below_start") == 1
        assert "snapshot" not in ready  # none usable: it started from the log's beginning
        text = service.log_path.read_text()
        assert f"{beyond} skipped: offsets_beyond_end" in text
        assert f"{old['snapshot_id']} skipped: offsets_below_start" in text
        assert "no longer starts at 0" in text  # what a from-zero index now lacks is said
    finally:
        service.stop()


async def test_snapshot_keeps_the_newest_and_lists_them(stage, capsys, monkeypatch):
    keep_two = replace(stage.settings, snapshot_keep=2)
    taken = []
    for _ in range(4):
        status, out, err = await snapshot_cli(
            capsys, monkeypatch, keep_two, "--index", index_path(stage.first), "--json"
        )
        assert status == 0, err
        taken.append(json.loads(out))
    assert [t["pruned"] for t in taken] == [
        [],
        [],
        [taken[0]["snapshot_id"]],
        [taken[1]["snapshot_id"]],
    ]
    status, out, _ = await snapshot_cli(capsys, monkeypatch, keep_two, "--list", "--json")
    assert status == 0
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(row["snapshot_id"], row["complete"]) for row in listed] == [
        (taken[3]["snapshot_id"], True),
        (taken[2]["snapshot_id"], True),
    ]
    assert listed[0]["size"] == taken[3]["size"]
    keys = await stage.store.list_keys(stage.snapshots.prefix)
    assert len(keys) == 4  # two snapshots, each an index and a manifest
    # Nothing to snapshot is bad input, not a crash.
    status, _, err = await snapshot_cli(
        capsys, monkeypatch, keep_two, "--index", str(Path(index_path(stage.first)).parent / "no")
    )
    assert status == 2 and "no index file" in err


async def test_a_replica_uploads_snapshots_periodically_when_its_index_moved(stage, tmp_path):
    periodic = replace(stage.settings, snapshot_interval_seconds=1)
    service = replica("query", periodic, tmp_path, "periodic", port=free_port(), reuse_port=False)
    service.start()
    try:
        await wait_ready(service)

        async def complete() -> list[str]:
            return [s.snapshot_id for s in await stage.snapshots.list() if s.complete]

        deadline = time.monotonic() + 60
        while not await complete():
            assert time.monotonic() < deadline, tail(service)
            await asyncio.sleep(0.2)
        first = (await complete())[0]
        manifest = await stage.snapshots.manifest(first)
        assert manifest.offsets == await log_end(stage.settings)
        await stage.synthetic.write(range(2000, 2010))
        end = await log_end(stage.settings)
        while (await stage.snapshots.manifest((await complete())[0])).offsets != end:
            assert time.monotonic() < deadline, tail(service)
            await asyncio.sleep(0.2)
        taken = await metric(service, "layerlog_snapshots_taken_total")
        assert taken >= 2
        # Nothing new in the log: no new snapshot, however many intervals pass.
        await asyncio.sleep(3)
        assert await metric(service, "layerlog_snapshots_taken_total") == taken
    finally:
        service.stop()
