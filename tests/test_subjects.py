"""Who did what: a command's subject becomes the actor of every event it causes, through the
upload worker and the verifier (processes of their own, on the real Kafka and S3), into the
query index and `layerlog history`; a command's token is shown nowhere.

The commands go straight onto the session's commands topic with the subject and token set, as
the registry and the SDK send them once they have verified a caller's token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from services.core.codec import CODEC, event_hash
from services.core.eventlog import LoggedRecord, upload_records
from services.core.kafka import connection
from services.core.principals import Principal
from services.core.records import (
    UPLOAD_WORKER,
    AppendChunk,
    BlobLinked,
    BlobMounted,
    CancelUpload,
    Command,
    CommandRejected,
    DeleteManifest,
    DeleteTag,
    ExpireUpload,
    FinishUpload,
    LayerCommitted,
    LayerValidationFailed,
    MountBlob,
    RepositoryCommandRejected,
    StartUpload,
    UnlinkBlob,
    UploadCancelled,
    UploadStarted,
)
from services.query.index import Index
from services.upload_worker.handler import CommandHandler
from services.upload_worker.staging import StagingArea
from tests.conftest import run_cli
from tests.repository_log import RepositoryLog, image_manifest, produce, put, sha256
from tests.test_staging import apply, records

# Shaped like a JWT, so that a test would see one leak; nothing here verifies it.
TOKEN = "eyJhbGciOiJFUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJhbGljZSJ9.bm90LWEtc2lnbmF0dXJl"


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
async def producer(settings) -> AsyncIterator[AIOKafkaProducer]:
    # Commands straight onto the log, as a client may put them there.
    producer = AIOKafkaProducer(**connection(settings, Principal.CLIENT), acks="all")
    await producer.start()
    yield producer
    await producer.stop()


async def send(producer: AIOKafkaProducer, settings, *commands: Command) -> None:
    for command in commands:
        await producer.send_and_wait(
            settings.commands_topic, CODEC.encode(command), key=command.upload_id.encode()
        )


async def events_until(settings, upload_id: str, last: type, timeout: float = 60):
    """The upload's events (with their bytes) once one of type `last` is among them."""
    deadline = time.monotonic() + timeout
    while True:
        found = await upload_records(settings, settings.events_topic, upload_id)
        if any(isinstance(logged.record, last) for logged in found):
            return found
        assert time.monotonic() < deadline, [type(f.record).__name__ for f in found]
        await asyncio.sleep(0.2)


def assert_chained(logged: list[LoggedRecord], outside: tuple[type, ...]) -> None:
    """Each chained event names the hash of the bytes of the chained event before it."""
    head = None
    for entry in logged:
        if isinstance(entry.record, outside):
            continue
        assert entry.record.prev_hash == head, type(entry.record).__name__
        head = event_hash(entry.raw)


async def push_as(producer, settings, repository: str, data: bytes, subject: str) -> str:
    """An upload of two chunks, each command sent by `subject` with a token; its upload id."""
    upload_id = str(uuid.uuid4())
    half = len(data) // 2
    common = {"upload_id": upload_id, "repository": repository, "subject": subject}
    await send(
        producer,
        settings,
        StartUpload(**common, token=TOKEN),
        AppendChunk(**common, token=TOKEN, offset=0, data=data[:half]),
        AppendChunk(**common, token=TOKEN, offset=half, data=data[half:]),
        FinishUpload(**common, token=TOKEN, size=len(data), digest=sha256(data)),
    )
    return upload_id


@pytest.mark.usefixtures("stack_services")
async def test_every_event_of_an_upload_names_who_caused_it(producer, settings, cli_env, capsys):
    repository, elsewhere = unique("who/layers"), unique("who/mounted")
    data = hashlib.sha512(repository.encode()).digest() * 2000
    upload_id = str(uuid.uuid4())
    alice = {"upload_id": upload_id, "repository": repository, "subject": "alice"}
    await send(
        producer,
        settings,
        StartUpload(**alice, token=TOKEN),
        AppendChunk(**alice, token=TOKEN, offset=0, data=data[:60_000]),
        # Someone else's chunk at a wrong offset: the rejection names them, not the uploader.
        AppendChunk(
            upload_id=upload_id, repository=repository, subject="mallory", offset=5, data=b"x"
        ),
        AppendChunk(**alice, token=TOKEN, offset=60_000, data=data[60_000:]),
        FinishUpload(**alice, token=TOKEN, size=len(data), digest=sha256(data)),
    )
    # BlobLinked names the upload too, but travels in the repository's partition: when that is
    # the upload's partition as well, it shows up here; it is checked on its own below.
    logged = [
        e
        for e in await events_until(settings, upload_id, LayerCommitted)
        if not isinstance(e.record, BlobLinked)
    ]
    assert [(type(e.record).__name__, e.record.actor) for e in logged] == [
        ("UploadStarted", "alice"),
        ("ChunkAppended", "alice"),
        ("CommandRejected", "mallory"),
        ("ChunkAppended", "alice"),
        ("UploadFinished", "alice"),
        ("LayerCommitted", "alice"),  # the verifier's, for the pusher
    ]
    assert_chained(logged, outside=(CommandRejected,))

    # The verifier's link into the repository, and a mount by someone else.
    mount = MountBlob(
        repository=elsewhere,
        digest=sha256(data),
        source_repository=repository,
        subject="bob",
        token=TOKEN,
    )
    async with RepositoryLog(settings, [repository, elsewhere]) as log:
        [linked] = await log.wait_for(1, repository)
        await produce(settings, [mount])
        [mounted] = await log.wait_for(1, elsewhere)
    assert isinstance(linked, BlobLinked) and linked.actor == "alice"
    assert isinstance(mounted, BlobMounted) and mounted.actor == "bob"

    # The query index keeps who started the upload.
    url = f"{settings.query_url}/uploads/{upload_id}/verdict?wait=30"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        verdict = await response.json()
    assert (verdict["state"], verdict["actor"]) == ("committed", "alice")

    for name in (repository, elsewhere):
        status, out, _ = await run_cli(capsys, "audit", "verify", "--repo", name, "--json")
        summary = json.loads(out.splitlines()[-1])["summary"]
        assert (status, summary["breaks"]) == (0, 0), out
        assert summary["events"] >= 1


@pytest.mark.usefixtures("stack_services")
async def test_verdicts_cancels_and_expiry_name_their_actor(producer, settings):
    repository = unique("who/verdicts")
    failing, cancelled = str(uuid.uuid4()), str(uuid.uuid4())
    bob = {"upload_id": failing, "repository": repository, "subject": "bob", "token": TOKEN}
    carol = {"upload_id": cancelled, "repository": repository, "subject": "carol"}
    await send(
        producer,
        settings,
        StartUpload(**bob),
        AppendChunk(**bob, offset=0, data=b"bytes whose digest is not the one claimed"),
        FinishUpload(**bob, size=41, digest="sha256:" + "0" * 64),
        StartUpload(**carol),
        AppendChunk(**carol, offset=0, data=b"soon thrown away"),
        CancelUpload(**carol),
    )
    failed = await events_until(settings, failing, LayerValidationFailed)
    assert [e.record.actor for e in failed] == ["bob"] * 4
    assert_chained(failed, outside=())
    closed = await events_until(settings, cancelled, UploadCancelled)
    assert [(type(e.record).__name__, e.record.actor) for e in closed] == [
        ("UploadStarted", "carol"),
        ("ChunkAppended", "carol"),
        ("UploadCancelled", "carol"),
    ]


@pytest.mark.usefixtures("stack_services")
async def test_manifests_tags_and_deletes_name_who_did_them(settings, cli_env, capsys):
    repository = unique("who/image")
    one, two = image_manifest("who one"), image_manifest("who two")
    commands = [
        put(repository, "latest", one),
        put(repository, "latest", two),
        DeleteTag(repository=repository, tag="latest"),
        put(repository, "v1", one),
        DeleteManifest(repository=repository, digest=sha256(one)),
        DeleteTag(repository=repository, tag="never-there"),
        UnlinkBlob(repository=repository, digest=sha256(b"some blob")),
    ]
    subjects = ["alice", "bob", "carol", "dave", "erin", "mallory", "frank"]
    commands = [
        replace(command, subject=subject, token=TOKEN)
        for command, subject in zip(commands, subjects, strict=True)
    ]
    async with RepositoryLog(settings, [repository]) as log:
        await produce(settings, commands)
        events = await log.wait_for(11, repository)
        logged = log.raw(repository)[:11]
    assert [(type(e).__name__, e.actor) for e in events] == [
        ("ManifestStored", "alice"),
        ("TagMoved", "alice"),
        ("ManifestStored", "bob"),
        ("TagMoved", "bob"),
        ("TagDeleted", "carol"),
        ("ManifestStored", "dave"),
        ("TagMoved", "dave"),
        ("TagDeleted", "erin"),
        ("ManifestDeleted", "erin"),
        ("RepositoryCommandRejected", "mallory"),
        ("BlobUnlinked", "frank"),
    ]
    assert_chained(logged, outside=(RepositoryCommandRejected,))
    # The referrers subject is its own field still: these manifests refer to nothing.
    assert events[0].subject is None

    status, out, _ = await run_cli(
        capsys, "history", "--repo", repository, "--tag", "latest", "--json"
    )
    assert status == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line["event"], line["actor"]) for line in lines] == [
        ("TagMoved", "alice"),
        ("TagMoved", "bob"),
        ("TagDeleted", "carol"),
    ]
    assert [line["command"]["subject"] for line in lines] == ["alice", "bob", "carol"]
    assert [line["digest"] for line in lines] == [sha256(one), sha256(two), None]
    assert TOKEN not in out and "token" not in out

    status, out, _ = await run_cli(capsys, "history", "--repo", repository, "--tag", "latest")
    assert status == 0
    header, columns, *rows = out.splitlines()
    assert header.startswith(f"tag {repository}:latest")
    assert columns.split()[:4] == ["TIME", "(UTC)", "EVENT", "BY"]
    assert [row.split()[2:4] for row in rows] == [
        ["TagMoved", "alice"],
        ["TagMoved", "bob"],
        ["TagDeleted", "carol"],
    ]
    status, out, _ = await run_cli(capsys, "audit", "verify", "--repo", repository, "--json")
    assert status == 0, out


@pytest.mark.usefixtures("stack_services")
async def test_an_upload_history_shows_who_and_never_the_token(producer, settings, cli_env, capsys):
    repository = unique("who/history")
    data = b"an upload with an owner " * 3000
    upload_id = await push_as(producer, settings, repository, data, "alice")
    await events_until(settings, upload_id, LayerCommitted)

    status, out, _ = await run_cli(capsys, "history", upload_id, "--json")
    assert status == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line["event"], line["actor"]) for line in lines] == [
        ("UploadStarted", "alice"),
        ("ChunkAppended", "alice"),
        ("ChunkAppended", "alice"),
        ("UploadFinished", "alice"),
        ("LayerCommitted", "alice"),
    ]
    assert {line["command"]["subject"] for line in lines} == {"alice"}
    # Who is said once, not again among the details; the token not at all.
    assert not any("actor" in line["details"] or "subject" in line["details"] for line in lines)
    assert TOKEN not in out and "token" not in out

    status, out, _ = await run_cli(capsys, "history", upload_id)
    assert status == 0
    header, columns, *rows = out.splitlines()
    assert "pushed by alice" in header
    assert columns.split()[:4] == ["TIME", "(UTC)", "EVENT", "BY"]
    assert [row.split()[3] for row in rows] == ["alice"] * 5
    assert TOKEN not in out


@pytest.mark.usefixtures("stack_services")
async def test_a_replayed_index_knows_who_started_each_upload(
    producer, settings, cli_env, capsys, tmp_path
):
    repository = unique("who/replay")
    upload_id = await push_as(producer, settings, repository, b"replayed " * 4000, "erin")
    await events_until(settings, upload_id, LayerCommitted)
    out = tmp_path / "replayed.sqlite"
    status, _, err = await run_cli(capsys, "replay", "--out", str(out))
    assert status == 0, err
    row = Index(str(out), read_only=True).upload(upload_id)
    assert row is not None and (row.state, row.actor) == ("committed", "erin")


# The handler as the processor drives it (on the real object store): a batch applied again
# publishes the very same bytes, actors included, so the chains hold across a crash.


async def test_a_batch_applied_again_names_the_same_actors(settings, store):
    upload_id, repository = str(uuid.uuid4()), unique("who/again")
    data = b"applied twice " * 1000
    alice = {"upload_id": upload_id, "repository": repository, "subject": "alice"}
    commands = [
        StartUpload(**alice, token=TOKEN),
        AppendChunk(**alice, token=TOKEN, offset=0, data=data),
        FinishUpload(**alice, size=len(data), digest=sha256(data)),
        put(repository, "latest", image_manifest("again")),
    ]
    commands[-1] = replace(commands[-1], subject="bob")
    batch = records(commands, 0)
    published = await apply(CommandHandler(settings, StagingArea(store, settings.part_size)), batch)
    decoded = [CODEC.decode(value) for value in published]
    assert [(type(e).__name__, e.actor) for e in decoded] == [
        ("UploadStarted", "alice"),
        ("ChunkAppended", "alice"),
        ("UploadFinished", "alice"),
        ("ManifestStored", "bob"),
        ("TagMoved", "bob"),
    ]
    successor = CommandHandler(settings, StagingArea(store, settings.part_size))
    assert await apply(successor, batch) == published


async def test_expiry_is_the_worker_s_own_whatever_the_command_says(settings, store):
    idle_now = replace(settings, upload_ttl_seconds=0)  # every upload is idle long enough
    handler = CommandHandler(idle_now, StagingArea(store, settings.part_size))
    ids = [str(uuid.uuid4()) for _ in range(3)]
    commands: list[Command] = []
    # From the expiry scan; from a worker before subjects existed; forged in someone's name.
    for upload_id, subject in zip(ids, [UPLOAD_WORKER, None, "mallory"], strict=True):
        commands += [
            StartUpload(upload_id=upload_id, repository="who/idle", subject="alice"),
            ExpireUpload(
                upload_id=upload_id, repository="who/idle", ttl_seconds=0, subject=subject
            ),
        ]
    decoded = [CODEC.decode(value) for value in await apply(handler, records(commands, 0))]
    assert [(type(e).__name__, e.actor) for e in decoded] == [
        ("UploadStarted", "alice"),
        ("UploadExpired", UPLOAD_WORKER),
    ] * 3


# The index alone (SQLite, no stack): a fresh index, and one from before uploads had an actor.

OLD_UPLOADS = """
CREATE TABLE uploads (
    upload_id      TEXT PRIMARY KEY,
    repository     TEXT NOT NULL,
    state          TEXT NOT NULL,
    durable_offset INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    digest         TEXT,
    size           INTEGER,
    reason         TEXT,
    detail         TEXT,
    expected       TEXT,
    actual         TEXT
) WITHOUT ROWID;
INSERT INTO uploads VALUES ('old', 'who/old', 'committed', 3, 1, 'sha256:x', 3, NULL, NULL,
    NULL, NULL);
"""


def started(upload_id: str, actor: str | None) -> UploadStarted:
    return UploadStarted(
        event_id=str(uuid.uuid4()),
        upload_id=upload_id,
        repository="who/index",
        caused_by="c",
        occurred_at=datetime(2026, 1, 2, tzinfo=UTC),
        staging_key="k",
        actor=actor,
    )


def test_a_fresh_index_keeps_who_started_an_upload(tmp_path: Path):
    index = Index(str(tmp_path / "fresh.sqlite"))
    index.apply("events", [started("a", "alice"), started("n", None)], {0: 2})
    assert index.upload("a").actor == "alice"
    assert index.upload("n").actor is None


def test_an_index_from_before_actors_gets_the_column_empty(tmp_path: Path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_UPLOADS)
    # Served read-only as it is, the old file answers with nobody named.
    old = Index(str(path), read_only=True).upload("old")
    assert old is not None and (old.state, old.actor) == ("committed", None)
    index = Index(str(path))
    assert index.upload("old").actor is None
    index.apply("events", [started("new", "bob")], {0: 1})
    assert index.upload("new").actor == "bob"
    assert Index(str(path)).upload("new").actor == "bob"  # opened again: no second migration
