"""Repository commands through the upload worker: manifests, tags and blob links.

The commands go straight onto the session's commands topic, keyed by repository, as the
registry's write side sends them; the worker (its own process) applies them and the events are
read back from the events topic as a read_committed consumer sees them. The last tests drive
the handler the way the processor does, to show that a batch applied again publishes the very
same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import sqlite3
import time
import uuid

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.audit.logread import LogReader
from services.client import LayerService
from services.core.codec import CODEC, event_hash
from services.core.eventlog import upload_records
from services.core.kafka import connection
from services.core.layout import blob_pointer_key, manifest_key, repository_state_key
from services.core.principals import Principal
from services.core.records import (
    BlobMounted,
    BlobUnlinked,
    DeleteManifest,
    DeleteTag,
    LayerCommitted,
    ManifestDeleted,
    ManifestStored,
    MountBlob,
    PutManifest,
    RepositoryCommand,
    RepositoryCommandRejected,
    RepositoryRejectReason,
    TagMoved,
    UnlinkBlob,
)
from services.oci.manifest import OCI_INDEX, OCI_MANIFEST
from services.upload_worker.handler import CommandHandler
from services.upload_worker.repositories import RepositoryState
from services.upload_worker.staging import StagingArea
from services.verifier.service import group_id as verifier_group
from tests.repository_log import (
    RepositoryLog,
    image_manifest,
    index_manifest,
    produce,
    put,
    sha256,
)
from tests.test_staging import apply, records

pytestmark = pytest.mark.usefixtures("stack_services")

Reason = RepositoryRejectReason


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def kinds(events) -> list[str]:
    return [type(e).__name__ for e in events]


async def run(settings, repositories, commands, count: int):
    """Produces the commands and returns the first count events of those repositories."""
    async with RepositoryLog(settings, repositories) as log:
        await produce(settings, commands)
        return await log.wait_for(count)


async def test_put_manifest_stores_the_bytes_and_moves_the_tag(settings, store):
    repo = unique("oci/put")
    first, second = image_manifest("one"), image_manifest("two")
    referrer = image_manifest("sig", subject=sha256(first))
    commands = [
        put(repo, "latest", first),
        put(repo, "latest", second),
        put(repo, sha256(referrer), referrer),
    ]
    events = await run(settings, [repo], commands, 5)
    assert kinds(events) == [
        "ManifestStored",
        "TagMoved",
        "ManifestStored",
        "TagMoved",
        "ManifestStored",
    ]
    stored, moved = events[0], events[1]
    assert isinstance(stored, ManifestStored) and isinstance(moved, TagMoved)
    assert stored.body == first and stored.size == len(first)
    assert stored.digest == sha256(first) and stored.media_type == OCI_MANIFEST
    assert stored.object_key == manifest_key(sha256(first))
    assert await store.get(stored.object_key) == first
    assert stored.caused_by == commands[0].command_id
    assert (moved.tag, moved.digest, moved.previous_digest) == ("latest", sha256(first), None)
    assert (events[3].digest, events[3].previous_digest) == (sha256(second), sha256(first))
    by_digest = events[4]
    assert by_digest.subject == sha256(first)
    assert by_digest.artifact_type == "application/vnd.oci.image.config.v1+json"
    state = RepositoryState.from_json(await store.get(repository_state_key(repo)))
    assert state.tags == {"latest": sha256(second)}
    assert state.manifests == {sha256(first), sha256(second), sha256(referrer)}


async def test_names_that_nest_like_files_and_folders_keep_separate_states(settings, store):
    """ "a" and "a.json/b" once mapped to repository-state/a.json as an object and as a folder,
    which versitygw's posix backend cannot hold at once: the partition's batch failed forever."""
    repo = unique("oci/nest")
    nested = f"{repo}.json/inner"
    commands = [put(repo, "v1", image_manifest("outer")), put(nested, "v1", image_manifest("in"))]
    events = await run(settings, [repo, nested], commands, 4)
    assert kinds(events) == ["ManifestStored", "TagMoved"] * 2
    for name in (repo, nested):
        state = RepositoryState.from_json(await store.get(repository_state_key(name)))
        assert set(state.tags) == {"v1"}


async def test_the_same_put_again_is_recorded_again(settings):
    repo = unique("oci/again")
    body = image_manifest("same")
    events = await run(settings, [repo], [put(repo, "v1", body), put(repo, "v1", body)], 4)
    assert kinds(events) == ["ManifestStored", "TagMoved"] * 2
    assert events[3].previous_digest == events[3].digest == sha256(body)


async def test_an_index_by_digest(settings, store):
    repo = unique("oci/index")
    child = image_manifest("child")
    index = index_manifest([child])
    commands = [put(repo, sha256(child), child), put(repo, "multi", index, OCI_INDEX)]
    events = await run(settings, [repo], commands, 3)
    assert kinds(events) == ["ManifestStored", "ManifestStored", "TagMoved"]
    assert events[1].media_type == OCI_INDEX
    assert await store.get(events[1].object_key) == index


async def test_every_rejection(settings, store):
    repo = unique("oci/reject")
    good = image_manifest("good")
    wrong = image_manifest("wrong")
    bad_put = PutManifest(
        repository=repo,
        reference="latest",
        digest=sha256(b"other bytes"),
        media_type=OCI_MANIFEST,
        body=good,
    )
    cases: list[tuple[RepositoryCommand, str]] = [
        (put(repo, "-not-a-tag", good), Reason.INVALID_REFERENCE),
        (put(repo, "x" * 129, good), Reason.INVALID_REFERENCE),
        (bad_put, Reason.INVALID_DIGEST),
        (put(repo, sha256(wrong), good), Reason.INVALID_DIGEST),
        (
            PutManifest(
                repository=repo, reference="t", digest="md5:abc", media_type="x", body=good
            ),
            Reason.INVALID_DIGEST,
        ),
        (put(repo, "t", b"not json"), Reason.MANIFEST_INVALID),
        (put(repo, "t", good, media_type="text/plain"), Reason.MANIFEST_INVALID),
        (put(repo, "t", json.dumps({"schemaVersion": 2}).encode()), Reason.MANIFEST_INVALID),
        (DeleteManifest(repository=repo, digest=sha256(good)), Reason.MANIFEST_UNKNOWN),
        (DeleteManifest(repository=repo, digest="sha256:SHORT"), Reason.INVALID_DIGEST),
        (DeleteTag(repository=repo, tag="never"), Reason.MANIFEST_UNKNOWN),
        (DeleteTag(repository=repo, tag="bad tag"), Reason.INVALID_REFERENCE),
        (
            MountBlob(repository=repo, digest=sha256(b"never stored"), source_repository=None),
            Reason.BLOB_UNKNOWN,
        ),
        (
            MountBlob(repository=repo, digest=sha256(b"x"), source_repository="UP/per"),
            Reason.INVALID_REPOSITORY,
        ),
        (
            MountBlob(repository=repo, digest="sha1:00", source_repository=None),
            Reason.INVALID_DIGEST,
        ),
        (UnlinkBlob(repository=repo, digest="tarsum.v1+sha256:" + "0" * 64), Reason.INVALID_DIGEST),
    ]
    bad_name = "Not/A/Valid/Name"
    misfiled = put(repo + "-misfiled", "t", good)
    async with RepositoryLog(settings, [repo, bad_name, misfiled.repository]) as log:
        await produce(settings, [command for command, _ in cases])
        await produce(settings, [put(bad_name, "t", good)])
        await produce(settings, [misfiled], key=repo.encode())  # keyed by another repository
        events = await log.wait_for(len(cases), repo)
        (by_name,) = await log.wait_for(1, bad_name)
        (by_key,) = await log.wait_for(1, misfiled.repository)
    for (command, reason), event in zip(cases, events, strict=True):
        assert isinstance(event, RepositoryCommandRejected), (command, event)
        assert (event.reason, event.caused_by) == (reason, command.command_id), event.detail
        assert event.command_type == type(command).__name__
        assert event.prev_hash is None and event.detail
    for event in (by_name, by_key):
        assert isinstance(event, RepositoryCommandRejected)
        assert event.reason == Reason.INVALID_REPOSITORY
    assert "keyed" in by_key.detail
    # Nothing was stored or tagged.
    state = RepositoryState.from_json(await store.get(repository_state_key(repo)))
    assert state.tags == {} and state.manifests == frozenset() and state.chain_head is None


async def test_concurrent_puts_to_one_tag_move_it_in_log_order(settings, store):
    repo = unique("oci/race")
    per_producer = 20
    bodies = {side: [image_manifest(f"{side}-{i}") for i in range(per_producer)] for side in "ab"}
    async with RepositoryLog(settings, [repo]) as log:
        await asyncio.gather(
            *(
                produce(settings, [put(repo, "race", b) for b in side_bodies])
                for side_bodies in bodies.values()
            )
        )
        events = await log.wait_for(4 * per_producer)
        await log.settled()
        assert len(log.of()) == 4 * per_producer  # nothing more than what was asked for
    moves = [e for e in events if isinstance(e, TagMoved)]
    assert len(moves) == 2 * per_producer
    assert moves[0].previous_digest is None
    for before, after in itertools.pairwise(moves):
        assert after.previous_digest == before.digest
    # Each producer's PUTs keep their order; all of them were recorded.
    for side_bodies in bodies.values():
        digests = [sha256(b) for b in side_bodies]
        assert [m.digest for m in moves if m.digest in digests] == digests
    state = RepositoryState.from_json(await store.get(repository_state_key(repo)))
    assert state.tags == {"race": moves[-1].digest}  # the last writer in log order wins


async def test_delete_manifest_removes_its_tags(settings, store):
    repo = unique("oci/delete")
    kept, doomed = image_manifest("kept"), image_manifest("doomed")
    async with RepositoryLog(settings, [repo]) as log:
        await produce(
            settings,
            [put(repo, "b", doomed), put(repo, "a", doomed), put(repo, "keep", kept)],
        )
        await log.wait_for(6)
        delete = DeleteManifest(repository=repo, digest=sha256(doomed))
        await produce(
            settings,
            [
                delete,
                DeleteTag(repository=repo, tag="a"),
                DeleteManifest(repository=repo, digest=sha256(doomed)),
                DeleteTag(repository=repo, tag="keep"),
            ],
        )
        events = (await log.wait_for(12))[6:]
    assert kinds(events) == [
        "TagDeleted",
        "TagDeleted",
        "ManifestDeleted",
        "RepositoryCommandRejected",
        "RepositoryCommandRejected",
        "TagDeleted",
    ]
    assert [(e.tag, e.previous_digest) for e in events[:2]] == [
        ("a", sha256(doomed)),
        ("b", sha256(doomed)),
    ]
    assert all(e.caused_by == delete.command_id for e in events[:3])
    assert isinstance(events[2], ManifestDeleted) and events[2].digest == sha256(doomed)
    assert {e.reason for e in events[3:5]} == {Reason.MANIFEST_UNKNOWN}
    assert (events[5].tag, events[5].previous_digest) == ("keep", sha256(kept))
    state = RepositoryState.from_json(await store.get(repository_state_key(repo)))
    assert state.tags == {} and state.manifests == {sha256(kept)}


async def test_each_repository_is_a_hash_chain(settings):
    repo = unique("oci/chain")
    body = image_manifest("chained")
    commands = [
        put(repo, "one", body),
        DeleteTag(repository=repo, tag="missing"),  # rejected: outside the chain
        put(repo, "two", body),
        UnlinkBlob(repository=repo, digest=sha256(b"some blob")),
        DeleteManifest(repository=repo, digest=sha256(body)),
    ]
    async with RepositoryLog(settings, [repo]) as log:
        await produce(settings, commands)
        await log.wait_for(9)
        logged = log.raw(repo)
    assert kinds(e.record for e in logged) == [
        "ManifestStored",
        "TagMoved",
        "RepositoryCommandRejected",
        "ManifestStored",
        "TagMoved",
        "BlobUnlinked",
        "TagDeleted",
        "TagDeleted",
        "ManifestDeleted",
    ]
    chained = [e for e in logged if not isinstance(e.record, RepositoryCommandRejected)]
    assert chained[0].record.prev_hash is None
    for before, after in itertools.pairwise(chained):
        assert after.record.prev_hash == event_hash(before.raw)
    assert isinstance(chained[4].record, BlobUnlinked)


async def test_mount_blob_of_a_committed_blob(settings, store):
    source, target = unique("oci/mount-src"), unique("oci/mount-dst")
    data = b"a layer worth mounting " * 4000
    digest = sha256(data)
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        upload = await service.upload(source)
        await upload.write(data)
        await upload.finish(len(data), digest)
    committed = next(
        e.record
        for e in await upload_records(settings, settings.events_topic, upload.uuid)
        if isinstance(e.record, LayerCommitted)
    )
    mount = MountBlob(repository=target, digest=digest, source_repository=source)
    discover = MountBlob(repository=target, digest=digest, source_repository=None)
    unknown = MountBlob(
        repository=target, digest=sha256(b"nobody uploaded this"), source_repository=source
    )
    events = await run(settings, [target], [mount, discover, unknown], 3)
    assert kinds(events) == ["BlobMounted", "BlobMounted", "RepositoryCommandRejected"]
    for event in events[:2]:
        assert isinstance(event, BlobMounted)
        assert (event.digest, event.size) == (digest, len(data))
        assert event.object_key == committed.object_key
        assert event.blob_sha256 == committed.blob_sha256
    assert events[0].source_repository == source and events[1].source_repository is None
    assert events[2].reason == Reason.BLOB_UNKNOWN


async def test_mount_by_a_pointer_from_before_sizes_were_recorded(settings, store):
    # Pointers the verifier wrote before this change name only the object.
    repo = unique("oci/legacy")
    data = b"committed long ago " * 100
    sha512 = "sha512:" + hashlib.sha512(data).hexdigest()
    for digest in (sha256(data), sha512):
        key = f"legacy/{uuid.uuid4()}"
        await store.put(key, data)
        await store.put(blob_pointer_key(digest), json.dumps({"object_key": key}).encode())
    commands = [
        MountBlob(repository=repo, digest=digest, source_repository=None)
        for digest in (sha256(data), sha512)
    ]
    events = await run(settings, [repo], commands, 2)
    assert kinds(events) == ["BlobMounted", "BlobMounted"]
    assert [(e.size, e.blob_sha256) for e in events] == [(len(data), sha256(data))] * 2
    assert events[1].digest == sha512


async def test_the_verifier_and_the_query_projection_pass_repository_events(settings):
    repo = unique("oci/passing")
    body = image_manifest("passing")
    commands = [put(repo, "v1", body), DeleteTag(repository=repo, tag="nope")]
    async with RepositoryLog(settings, [repo]) as log:
        await produce(settings, commands)
        await log.wait_for(3)
        last = log.raw()[-1]
    tp = TopicPartition(settings.events_topic, last.partition)
    # The verifier's group and the query service's index both move past them.
    admin = AIOKafkaAdminClient(**connection(settings, Principal.ADMIN))
    await admin.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            committed = await admin.list_consumer_group_offsets(verifier_group(settings))
            indexed = await asyncio.to_thread(_indexed_offsets, settings)
            behind = [
                name
                for name, offset in (
                    ("verifier", committed[tp].offset if tp in committed else 0),
                    ("query", indexed.get(tp.partition, 0)),
                )
                if offset <= last.offset
            ]
            if not behind:
                break
            assert time.monotonic() < deadline, f"stalled on {behind}"
            await asyncio.sleep(0.3)
    finally:
        await admin.close()
    letters = await _dead_letters(settings)
    assert [letter for letter in letters if letter.source_topic == settings.events_topic] == []


def _indexed_offsets(settings) -> dict[int, int]:
    with sqlite3.connect(f"file:{settings.index_path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT partition, next_offset FROM offsets WHERE topic = ?", (settings.events_topic,)
        ).fetchall()
    return dict(rows)


async def _dead_letters(settings) -> list:
    async with LogReader(settings, settings.dead_letter_topic) as reader:
        bounds = await reader.bounds(await reader.partitions())
        return [CODEC.decode(r.value) async for r in reader.read(bounds, lambda k, v: True)]


# A batch applied again, driven the way the processor does it.


async def test_a_batch_applied_again_publishes_the_same_events(settings, store):
    repo = unique("oci/replay")
    one, two = image_manifest("r1"), image_manifest("r2")
    source = unique("oci/replay-src")
    blob = b"mounted in a replayed batch"
    pointer = f"legacy/{uuid.uuid4()}"
    await store.put(pointer, blob)
    await store.put(blob_pointer_key(sha256(blob)), json.dumps({"object_key": pointer}).encode())
    commands: list[RepositoryCommand] = [
        DeleteTag(repository=repo, tag="t"),  # rejected now; a replay must not find "t"
        put(repo, "t", one),
        put(repo, "t", two),
        put(repo, "u", one),
        DeleteManifest(repository=repo, digest=sha256(one)),
        MountBlob(repository=repo, digest=sha256(blob), source_repository=source),
        UnlinkBlob(repository=repo, digest=sha256(blob)),
        put("Bad/Name", "t", one),
    ]
    batch = records(commands, 0)
    worker = CommandHandler(settings, StagingArea(store, settings.part_size))
    published = await apply(worker, batch)
    assert kinds(CODEC.decode(v) for v in published) == [
        "RepositoryCommandRejected",
        "ManifestStored",
        "TagMoved",
        "ManifestStored",
        "TagMoved",
        "ManifestStored",
        "TagMoved",
        "TagDeleted",
        "ManifestDeleted",
        "BlobMounted",
        "BlobUnlinked",
        "RepositoryCommandRejected",
    ]
    # The transaction did not commit: the same records again, on the same worker (states
    # cached) and on a new one (states read back from S3, with the batch's changes in them).
    assert await apply(worker, batch) == published
    successor = CommandHandler(settings, StagingArea(store, settings.part_size))
    assert await apply(successor, batch) == published
    # In pieces, as a fetch after a rewind may hand them out.
    assert await apply(successor, batch[:3]) + await apply(successor, batch[3:]) == published
    # The same commands sent again by the client, in new records, publish nothing new.
    again = await apply(successor, records(commands, 100))
    assert kinds(CODEC.decode(v) for v in again) == ["RepositoryCommandRejected"]  # stateless
    state = RepositoryState.from_json(await store.get(repository_state_key(repo)))
    assert state.tags == {"t": sha256(two)}
    assert state.chain_head == event_hash(published[-2])


async def test_an_abandoned_batch_leaves_nothing_and_applies_again(settings, store):
    repo = unique("oci/abandon")
    handler = CommandHandler(settings, StagingArea(store, settings.part_size))
    batch = records([put(repo, "t", image_manifest("abandoned"))], 0)
    first = [output.value for record in batch for output in await handler.handle(record)]
    handler.abandon(0)  # stopping before the batch settled: its records will come again
    assert await store.list_keys(repository_state_key(repo)) == []
    again = await apply(handler, batch)
    assert kinds(CODEC.decode(v) for v in again) == ["ManifestStored", "TagMoved"]
    assert [CODEC.decode(v).event_id for v in again] == [CODEC.decode(v).event_id for v in first]
    state = RepositoryState.from_json(await store.get(repository_state_key(repo)))
    assert state.tags == {"t": sha256(image_manifest("abandoned"))}
