"""The hash chain and `audit verify`: an untouched log verifies; an event injected out of band
and a blob changed in storage are both reported, with their offsets."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import sys
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaProducer

from services.audit.verify import verify_log
from services.client import LayerService
from services.core.codec import CODEC, event_hash
from services.core.eventlog import upload_records
from services.core.kafka import connection
from services.core.principals import Principal
from services.core.records import (
    GARBAGE_COLLECTOR,
    BlobReclaimed,
    ChunkAppended,
    LayerCommitted,
    PointerFate,
    ReclaimReason,
    UploadFinished,
    UploadStarted,
    derived_id,
)
from services.query.replay import cut_offsets
from tests.conftest import settings_env

pytestmark = pytest.mark.usefixtures("stack_services")


async def push(settings, name: str, data: bytes) -> str:
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        upload = await service.upload(name)
        await upload.write(data)
        await upload.finish(len(data), "sha256:" + hashlib.sha256(data).hexdigest())
        return upload.uuid


async def test_each_upload_is_a_hash_chain(settings):
    upload_id = await push(settings, "audit/chain", b"chained " * 40_000)
    logged = await upload_records(settings, settings.events_topic, upload_id)
    events = [entry.record for entry in logged]
    assert isinstance(events[0], UploadStarted) and events[0].prev_hash is None
    assert isinstance(events[-1], LayerCommitted)
    assert any(isinstance(e, ChunkAppended) for e in events)
    for before, after in itertools.pairwise(logged):
        assert after.record.prev_hash == event_hash(before.raw)
    report = await verify_log(settings, repository="audit/chain")
    assert report.breaks == []
    assert report.uploads == {upload_id}
    # And the commit's BlobLinked, in the repository's partition.
    assert report.repositories == {"audit/chain"}
    assert report.events == len(events) + 1
    assert report.blobs == 1


async def test_an_injected_event_breaks_the_chain(settings):
    upload_id = await push(settings, "audit/forged", b"genuine bytes " * 10_000)
    logged = await upload_records(settings, settings.events_topic, upload_id)
    finished = next(e for e in logged if isinstance(e.record, UploadFinished))
    forged = replace(finished.record, size=1, staged_size=1, event_id="forged")
    # Only the admin (or the upload worker) may write events: the forger holds its password.
    producer = AIOKafkaProducer(**connection(settings, Principal.ADMIN))
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            settings.events_topic, CODEC.encode(forged), key=upload_id.encode()
        )
    finally:
        await producer.stop()
    report = await verify_log(settings, repository="audit/forged", check_blobs=False)
    assert [(b.partition, b.offset, b.event) for b in report.breaks] == [
        (sent.partition, sent.offset, "UploadFinished")
    ]
    assert "prev_hash" in report.breaks[0].problem


async def test_a_changed_blob_is_reported(settings, store):
    data = b"the bytes that were committed " * 5000
    upload_id = await push(settings, "audit/tampered", data)
    commit = next(
        e.record
        for e in await upload_records(settings, settings.events_topic, upload_id)
        if isinstance(e.record, LayerCommitted)
    )
    assert (await verify_log(settings, repository="audit/tampered")).breaks == []
    await store.put(commit.object_key, data.replace(b"committed", b"COMMITTED"))
    breaks = (await verify_log(settings, repository="audit/tampered")).breaks
    assert len(breaks) == 1
    assert breaks[0].event == "LayerCommitted" and "stored bytes have" in breaks[0].problem


async def test_a_forged_reclaim_of_a_linked_blob_is_reported(settings, store):
    # A BlobReclaimed injected out of band would make every index stop serving a blob that a
    # repository links (and explain its bytes away): the audit replays the links to the reclaim's
    # cut and refuses it. (Reclaims the log allows: tests/test_gc.py and test_gc_race.py.)
    data = b"linked, and said to be reclaimed " * 3000
    upload_id = await push(settings, "audit/reclaim-forged", data)
    commit = next(
        e.record
        for e in await upload_records(settings, settings.events_topic, upload_id)
        if isinstance(e.record, LayerCommitted)
    )
    cut = " ".join(f"{p}:{o}" for p, o in sorted((await cut_offsets(settings)).items()))
    forged = BlobReclaimed(
        event_id=derived_id(commit.object_key, "BlobReclaimed"),
        digest=commit.digest,
        object_key=commit.object_key,
        size=commit.size,
        reason=ReclaimReason.UNLINKED,
        idle_since=commit.committed_at,
        grace_seconds=0,
        sweep_id="forged",
        marked_at=cut,
        checked_at=cut,
        blob_sha256=commit.blob_sha256,
        pointer=PointerFate.WITHDRAWN,
        actor=GARBAGE_COLLECTOR,
    )
    producer = AIOKafkaProducer(**connection(settings, Principal.ADMIN))
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            settings.events_topic, CODEC.encode(forged), key=commit.digest.encode()
        )
    finally:
        await producer.stop()
    report = await verify_log(settings, repository="audit/reclaim-forged")
    (broken,) = report.breaks
    assert (broken.partition, broken.offset, broken.event) == (
        sent.partition,
        sent.offset,
        "BlobReclaimed",
    )
    assert "audit/reclaim-forged served" in broken.problem
    assert report.reclaims == 1
    assert await store.get(commit.object_key) == data  # nothing was deleted: only the log lies


async def test_audit_verify_command(settings):
    await push(settings, "audit/cli", b"checked from the command line " * 1000)
    command = [sys.executable, "-m", "services.cli", "audit", "verify", "--repo", "audit/cli"]
    done = await asyncio.create_subprocess_exec(
        *command, env=settings_env(settings), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await done.communicate()
    assert done.returncode == 0, out
    assert b"no breaks" in out
    done = await asyncio.create_subprocess_exec(
        *command[:-2],
        "--repo",
        "audit/forged",
        "--json",
        "--no-blobs",
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await done.communicate()
    lines = [json.loads(line) for line in out.splitlines()]
    assert done.returncode == 1, out
    assert lines[-1]["summary"]["breaks"] == 1
    assert lines[0]["break"]["event"] == "UploadFinished"
