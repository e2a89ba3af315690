"""The upload worker's handler and staging area on the real object store, batch by batch.

The worker applies a batch of commands, settles it (one state write per upload, the batch's
small chunks merged into one pending object), then publishes the events. These tests drive the
handler the way the processor does and check what lands in S3, and that a batch applied again
(its transaction did not commit, or it was abandoned) publishes the very same events.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from dataclasses import replace

from aiokafka.structs import ConsumerRecord

from services.core.codec import CODEC
from services.core.objectstore import S3_MAX_UPLOADS_PAGE, ObjectStore
from services.core.records import (
    AppendChunk,
    Command,
    CommandRejected,
    DeadLetter,
    ExpireUpload,
    FinishUpload,
    PutManifest,
    RejectReason,
    RepositoryCommand,
    StartUpload,
)
from services.upload_worker.handler import CommandHandler
from services.upload_worker.staging import Closing, Finish, StagingArea, Status, UploadState
from tests.test_objectstore import open_uploads

MIB = 1 << 20


class Upload:
    """Commands of one upload, as records of partition 0 at increasing offsets."""

    def __init__(self) -> None:
        self.id = str(uuid.uuid4())
        self.offset = 0
        self.data = bytearray()

    def start(self) -> StartUpload:
        return StartUpload(upload_id=self.id, repository="staging/test")

    def append(self, data: bytes) -> AppendChunk:
        command = AppendChunk(
            upload_id=self.id, repository="staging/test", offset=len(self.data), data=data
        )
        self.data += data
        return command

    def finish(self) -> FinishUpload:
        digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        return FinishUpload(
            upload_id=self.id, repository="staging/test", size=len(self.data), digest=digest
        )


def _key(command: Command | RepositoryCommand) -> bytes:
    return (command.upload_id if isinstance(command, Command) else command.repository).encode()


def records(commands: list[Command | RepositoryCommand], first_offset: int) -> list[ConsumerRecord]:
    """Upload commands keyed by upload id, repository commands by repository."""
    return [
        ConsumerRecord(
            topic="staging.commands",
            partition=0,
            offset=first_offset + i,
            timestamp=0,
            timestamp_type=0,
            key=_key(command),
            value=CODEC.encode(command),
            checksum=None,
            serialized_key_size=0,
            serialized_value_size=0,
            headers=(),
        )
        for i, command in enumerate(commands)
    ]


async def apply(handler: CommandHandler, batch: list[ConsumerRecord]) -> list[bytes]:
    """What the processor does with a batch: apply each record, settle, publish."""
    outputs = []
    for record in batch:
        outputs += await handler.handle(record)
    await handler.settle(0)
    return [output.value for output in outputs]


def event_names(values: list[bytes]) -> list[str]:
    return [type(CODEC.decode(value)).__name__ for value in values]


async def pending_keys(store: ObjectStore, upload: Upload) -> list[str]:
    return await store.list_keys(f"uploads/{upload.id}/pending/")


async def test_small_chunks_of_a_batch_share_one_pending_object(settings, store):
    handler = CommandHandler(settings, StagingArea(store, settings.part_size))
    upload = Upload()
    chunks = [os.urandom(10_000 + i) for i in range(10)]
    first = records([upload.start(), *(upload.append(c) for c in chunks)], 0)
    assert event_names(await apply(handler, first)) == ["UploadStarted"] + ["ChunkAppended"] * 10
    assert len(await pending_keys(store, upload)) == 1
    saved = await StagingArea(store, settings.part_size).load(upload.id)
    assert saved is not None and saved.durable_offset == sum(map(len, chunks))

    second = records([upload.append(b"x" * 5000), upload.append(b"y" * 7000)], len(first))
    await apply(handler, second)
    assert len(await pending_keys(store, upload)) == 2  # one per batch, not one per chunk

    third = records([upload.finish()], len(first) + len(second))
    assert event_names(await apply(handler, third)) == ["UploadFinished"]
    assert await store.get(f"uploads/{upload.id}/data") == bytes(upload.data)
    assert await pending_keys(store, upload) == []


async def test_a_batch_crossing_the_part_size_assembles_the_same_bytes(settings, store):
    handler = CommandHandler(settings, StagingArea(store, settings.part_size))
    upload = Upload()
    pieces = [os.urandom(MIB - 3) for _ in range(7)]  # the fifth one crosses 5 MiB
    batch = records([upload.start(), *(upload.append(p) for p in pieces), upload.finish()], 0)
    names = event_names(await apply(handler, batch))
    assert names == ["UploadStarted"] + ["ChunkAppended"] * 7 + ["UploadFinished"]
    assert await store.get(f"uploads/{upload.id}/data") == bytes(upload.data)
    assert await pending_keys(store, upload) == []
    assert await store.multipart_uploads(f"uploads/{upload.id}/") == []


async def test_a_batch_applied_again_publishes_the_same_events(settings, store):
    # Start, chunks and finish in one batch whose transaction did not commit: the records come
    # again, on the same worker (states cached) and on a new one (states read from S3).
    upload = Upload()
    chunk = upload.append(os.urandom(3000))
    commands = [upload.start(), chunk, upload.append(b"z" * 10), upload.finish()]
    batch = records(commands, 0)
    worker = CommandHandler(settings, StagingArea(store, settings.part_size))
    published = await apply(worker, batch)
    assert event_names(published) == [
        "UploadStarted",
        "ChunkAppended",
        "ChunkAppended",
        "UploadFinished",
    ]
    assert await apply(worker, batch) == published
    successor = CommandHandler(settings, StagingArea(store, settings.part_size))
    assert await apply(successor, batch) == published
    assert await store.get(f"uploads/{upload.id}/data") == bytes(upload.data)

    # The same commands sent again by the client, in new records, publish nothing; a new chunk
    # after the finish is refused.
    assert await apply(successor, records(commands, 10)) == []
    late = records([upload.append(b"late")], 20)
    assert event_names(await apply(successor, late)) == ["CommandRejected"]


async def test_an_abandoned_batch_leaves_nothing_and_applies_again(settings, store):
    staging = StagingArea(store, settings.part_size)
    handler = CommandHandler(settings, staging)
    upload = Upload()
    batch = records([upload.start(), upload.append(os.urandom(2048))], 0)
    for record in batch:
        await handler.handle(record)
    handler.abandon(0)  # stopping before the batch settled: its records will come again
    assert await staging.load(upload.id) is None
    assert await pending_keys(store, upload) == []
    assert event_names(await apply(handler, batch)) == ["UploadStarted", "ChunkAppended"]
    state = await StagingArea(store, settings.part_size).load(upload.id)
    assert state is not None and state.status == Status.OPEN and state.durable_offset == 2048


async def test_a_batch_replayed_after_its_multipart_upload_completed(settings, store):
    # The batch that finishes a multipart upload completes it (which cannot be undone), and the
    # worker dies before settling; the next worker applies the batch again from the saved state.
    upload = Upload()
    # 1 MiB chunks (the tests' largest): the first batch stages part 1 and a pending MiB, the
    # last one part 2, then the tail, and completes.
    first = records([upload.start(), *(upload.append(os.urandom(MIB)) for _ in range(6))], 0)
    crashed = CommandHandler(settings, StagingArea(store, settings.part_size))
    await apply(crashed, first)
    chunks = [upload.append(os.urandom(MIB)) for _ in range(5)]
    batch = records([*chunks, upload.append(b"tail" * 100), upload.finish()], len(first))
    for record in batch:
        await crashed.handle(record)  # no settle(): the process is gone

    successor = CommandHandler(settings, StagingArea(store, settings.part_size))
    names = event_names(await apply(successor, batch))
    assert names == ["ChunkAppended"] * 6 + ["UploadFinished"]
    assert await store.get(f"uploads/{upload.id}/data") == bytes(upload.data)
    state = await StagingArea(store, settings.part_size).load(upload.id)
    assert state is not None and state.status == Status.FINISHED
    assert state.finish is not None and state.finish.staged_size == len(upload.data)


async def test_expiry_aborts_every_multipart_upload_of_the_layer(settings, store):
    # Crashes between creating a multipart upload and saving the state can leave more uploads
    # on a layer's key than one listing page holds; expiry must abort past the first page too.
    # The worker's own TTL bounds the command's from below: 0 here, so the upload is idle now.
    idle_now = replace(settings, upload_ttl_seconds=0)
    handler = CommandHandler(idle_now, StagingArea(store, settings.part_size))
    upload = Upload()
    await apply(handler, records([upload.start(), upload.append(b"abandoned")], 0))
    key = f"uploads/{upload.id}/data"
    await open_uploads(store, [key] * (S3_MAX_UPLOADS_PAGE + 5))
    expire = ExpireUpload(upload_id=upload.id, repository="staging/test", ttl_seconds=0)
    assert event_names(await apply(handler, records([expire], 2))) == ["UploadExpired"]
    assert await store.multipart_uploads(key) == []
    assert await store.list_keys(f"uploads/{upload.id}/") == []


async def test_an_expiry_asking_for_less_idle_time_than_the_worker_s_ttl_changes_nothing(
    settings, store
):
    # ExpireUpload carries no token: anyone who may write commands could send one. With a
    # ttl_seconds of 0 it still needs the worker's own TTL of idleness (a week by default).
    handler = CommandHandler(settings, StagingArea(store, settings.part_size))
    upload = Upload()
    await apply(handler, records([upload.start(), upload.append(b"in progress")], 0))
    forged = ExpireUpload(upload_id=upload.id, repository="staging/test", ttl_seconds=0)
    assert await apply(handler, records([forged], 2)) == []
    state = await StagingArea(store, settings.part_size).load(upload.id)
    assert state is not None and state.status == Status.OPEN


async def test_a_chunk_past_the_part_limit_is_refused_and_the_worker_goes_on(settings, store):
    # S3 allows 10,000 parts per object; with 3 here, the layer holds at least 3 parts of 5 MiB.
    staging = StagingArea(store, settings.part_size, max_parts=3)
    handler = CommandHandler(settings, staging)
    upload, other = Upload(), Upload()
    chunks = [upload.append(os.urandom(MIB)) for _ in range(15)]  # exactly three 5 MiB parts
    first = records([upload.start(), *chunks, other.start()], 0)
    await apply(handler, first)
    before = (await StagingArea(store, settings.part_size).load(upload.id)).to_json()

    over = upload.append(b"one byte too many")
    upload.data = upload.data[: -len(over.data)]
    batch = records([over, other.append(b"small layer"), other.finish()], len(first))
    [rejected, *rest] = [CODEC.decode(value) for value in await apply(handler, batch)]
    assert isinstance(rejected, CommandRejected)
    assert rejected.reason == RejectReason.LAYER_TOO_LARGE
    assert str(staging.largest_layer) in rejected.detail and "(3)" in rejected.detail
    assert [type(e).__name__ for e in rest] == ["ChunkAppended", "UploadFinished"]
    assert (await StagingArea(store, settings.part_size).load(upload.id)).to_json() == before

    finished = records([upload.finish()], len(first) + len(batch))
    assert event_names(await apply(handler, finished)) == ["UploadFinished"]
    assert await store.get(f"uploads/{upload.id}/data") == bytes(upload.data)
    assert await store.get(f"uploads/{other.id}/data") == b"small layer"


def test_a_state_stored_before_states_were_typed_still_loads():
    # upload-state/<uuid>.json as the worker wrote it when finish and closing were dicts ({} for
    # "none yet") and the status a plain string.
    finished = {
        "upload_id": "9e1c3d52-58f3-4d0c-a7c1-2a2a4ef0c6b1",
        "repository": "library/old",
        "status": "finished",
        "multipart_id": "",
        "started_by": "c1",
        "created_ms": 1,
        "updated_ms": 3,
        "parts": [],
        "pending": [],
        "ledger": [
            {
                "offset": 0,
                "length": 5,
                "sha256": "ab",
                "command_id": "c2",
                "durable_after": 5,
                "source": "0@1",
                "at_ms": 2,
                "prev_hash": "h1",
            }
        ],
        "closed_by": "c3",
        "started_from": "0@0",
        "closed_from": "0@2",
        "finish": {
            "command_id": "c3",
            "source": "0@2",
            "size": 5,
            "digest": "sha256:ab",
            "staged_size": 5,
            "at_ms": 3,
            "prev_hash": "h2",
        },
        "closing": {},
        "chain_head": "h3",
    }
    state = UploadState.from_json(json.dumps(finished).encode())
    assert state.status is Status.FINISHED and state.closing is None
    assert state.finish == Finish("c3", "0@2", 5, "sha256:ab", 5, 3, "h2")
    # Stored before the worker kept the bytes' sha256: it has none, and the verifier reads them.
    assert state.finish.content_sha256 is None
    finish = {**finished["finish"], "content_sha256": None}
    assert json.loads(state.to_json()) == {**finished, "finish": finish, "closing": None}

    cancelled = {
        **finished,
        "status": "cancelled",
        "finish": {},
        "closing": {"at_ms": 4, "prev_hash": "h2", "durable_offset": 5, "idle_seconds": 0},
    }
    state = UploadState.from_json(json.dumps(cancelled).encode())
    assert state.status is Status.CANCELLED and state.finish is None
    assert state.closing == Closing(at_ms=4, prev_hash="h2", durable_offset=5, idle_seconds=0)
    assert UploadState.from_json(state.to_json()) == state


async def test_a_command_the_worker_fails_on_is_rejected_as_well_as_dead_lettered(settings, store):
    """The registry and the SDK wait on a command's outcome: a bug in the worker must end that
    wait with a rejection, not leave it to time out, and keep the record in the dead letters."""
    handler = CommandHandler(settings, StagingArea(store, settings.part_size))
    upload = Upload()
    put = PutManifest(
        repository="staging/failed",
        reference="v1",
        digest="sha256:" + "0" * 64,
        media_type="application/vnd.oci.image.manifest.v1+json",
        body=b"{}",
    )
    for record in records([upload.start(), put], 0):
        outputs = handler.on_error(record, RuntimeError("a bug"))
        assert [o.topic for o in outputs] == [settings.dead_letter_topic, settings.events_topic]
        dead, rejected = (CODEC.decode(o.value) for o in outputs)
        assert isinstance(dead, DeadLetter) and dead.reason == "HANDLER_ERROR"
        assert rejected.reason == "HANDLER_ERROR" and "RuntimeError" in rejected.detail
        assert rejected.caused_by == CODEC.decode(record.value).command_id
        assert outputs[1].key == record.key  # the upload's, or the repository's, partition
        # Applied again (its transaction did not commit), the same bytes.
        assert handler.on_error(record, RuntimeError("a bug"))[1].value == outputs[1].value
    garbage = dataclasses.replace(records([upload.start()], 5)[0], value=b"not a command")
    assert [o.topic for o in handler.on_error(garbage, RuntimeError())] == [
        settings.dead_letter_topic
    ]
