"""Hostile commands on the real commands topic: each gets a specific CommandRejected event (or a
dead letter, for bytes that are not a command), and the worker goes on."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from services.client import LayerService
from services.core.codec import CODEC, HEADER_SIZE
from services.core.eventlog import read_partition, upload_records
from services.core.kafka import connection
from services.core.principals import Principal
from services.core.records import (
    AppendChunk,
    CancelUpload,
    Command,
    CommandRejected,
    DeadLetter,
    FinishUpload,
    StartUpload,
)

pytestmark = pytest.mark.usefixtures("stack_services")


@pytest.fixture()
async def producer(settings):
    # A hostile client: what it may write is commands, and it writes anything there.
    producer = AIOKafkaProducer(**connection(settings, Principal.CLIENT), max_request_size=70 << 20)
    await producer.start()
    yield producer
    await producer.stop()


async def send(producer, settings, command: Command) -> None:
    await producer.send_and_wait(
        settings.commands_topic, CODEC.encode(command), key=command.upload_id.encode()
    )


async def wait_for_event(settings, upload_id: str, predicate, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        for logged in await upload_records(settings, settings.events_topic, upload_id):
            if predicate(logged.record):
                return logged.record
        assert time.monotonic() < deadline, f"no matching event for {upload_id}"
        await asyncio.sleep(0.2)


async def rejection_of(settings, command: Command) -> CommandRejected:
    return await wait_for_event(
        settings,
        command.upload_id,
        lambda e: isinstance(e, CommandRejected) and e.caused_by == command.command_id,
    )


async def open_upload(producer, settings, data: bytes = b"") -> str:
    upload_id = str(uuid.uuid4())
    await send(producer, settings, StartUpload(upload_id=upload_id, repository="hostile/target"))
    if data:
        await send(
            producer,
            settings,
            AppendChunk(upload_id=upload_id, repository="hostile/target", offset=0, data=data),
        )
    return upload_id


@pytest.mark.parametrize(
    "name",
    ["a/../b", "/leading", "Upper/case", "with space", "unicodé", "x" * 300, "", "a//b"],
    ids=[
        "dotdot",
        "leading-slash",
        "uppercase",
        "space",
        "unicode",
        "300-chars",
        "empty",
        "empty-component",
    ],
)
async def test_bad_repository_names_are_rejected(producer, settings, name):
    command = StartUpload(upload_id=str(uuid.uuid4()), repository=name)
    await send(producer, settings, command)
    rejected = await rejection_of(settings, command)
    assert rejected.reason == "INVALID_REPOSITORY"
    assert rejected.command_type == "StartUpload"


@pytest.mark.parametrize(
    ("offset", "reason"),
    [(-1, "OFFSET_MISMATCH"), (2**62, "OFFSET_MISMATCH"), (5, "OFFSET_MISMATCH")],
    ids=["negative", "absurd", "gap"],
)
async def test_bad_offsets_are_rejected_with_the_expected_offset(
    producer, settings, offset, reason
):
    upload_id = await open_upload(producer, settings, b"0123")
    command = AppendChunk(
        upload_id=upload_id, repository="hostile/target", offset=offset, data=b"x"
    )
    await send(producer, settings, command)
    rejected = await rejection_of(settings, command)
    assert (rejected.reason, rejected.expected_offset) == (reason, 4)


async def test_chunk_over_the_maximum_is_rejected(producer, settings):
    upload_id = await open_upload(producer, settings)
    data = b"\0" * (settings.max_chunk_bytes + 1)
    command = AppendChunk(upload_id=upload_id, repository="hostile/target", offset=0, data=data)
    await send(producer, settings, command)
    assert (await rejection_of(settings, command)).reason == "CHUNK_TOO_LARGE"


async def test_commands_for_unknown_uploads_are_rejected(producer, settings):
    upload_id = str(uuid.uuid4())
    for command in (
        AppendChunk(upload_id=upload_id, repository="a", offset=0, data=b"x"),
        FinishUpload(upload_id=upload_id, repository="a", size=1, digest="sha256:" + "0" * 64),
        CancelUpload(upload_id=upload_id, repository="a"),
    ):
        await send(producer, settings, command)
        assert (await rejection_of(settings, command)).reason == "UNKNOWN_UPLOAD"
    not_a_uuid = StartUpload(upload_id="../../etc/passwd", repository="a")
    await send(producer, settings, not_a_uuid)
    assert (await rejection_of(settings, not_a_uuid)).reason == "INVALID_UPLOAD_ID"


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:abcd",
        "sha256:" + "A" * 64,
        "md5:" + "0" * 32,
        "sha256" + "0" * 64,
        "tarsum.v1+rot13:" + "0" * 64,
        "",
    ],
    ids=["short", "uppercase-hex", "unknown-algorithm", "no-colon", "unknown-cipher", "empty"],
)
async def test_malformed_digests_are_rejected(producer, settings, digest):
    upload_id = await open_upload(producer, settings, b"data")
    command = FinishUpload(upload_id=upload_id, repository="hostile/target", size=4, digest=digest)
    await send(producer, settings, command)
    assert (await rejection_of(settings, command)).reason == "INVALID_DIGEST"


async def test_negative_size_and_commands_after_the_end_are_rejected(producer, settings):
    data = b"finished layer"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    upload_id = await open_upload(producer, settings, data)
    negative = FinishUpload(
        upload_id=upload_id, repository="hostile/target", size=-1, digest=digest
    )
    await send(producer, settings, negative)
    assert (await rejection_of(settings, negative)).reason == "INVALID_SIZE"
    await send(
        producer,
        settings,
        FinishUpload(
            upload_id=upload_id, repository="hostile/target", size=len(data), digest=digest
        ),
    )
    late = AppendChunk(
        upload_id=upload_id, repository="hostile/target", offset=len(data), data=b"x"
    )
    await send(producer, settings, late)
    assert (await rejection_of(settings, late)).reason == "UPLOAD_FINISHED"

    cancelled = await open_upload(producer, settings, b"abc")
    await send(producer, settings, CancelUpload(upload_id=cancelled, repository="hostile/target"))
    after = AppendChunk(upload_id=cancelled, repository="hostile/target", offset=0, data=b"x")
    await send(producer, settings, after)
    assert (await rejection_of(settings, after)).reason == "UPLOAD_CANCELLED"


async def test_bytes_that_are_not_commands_are_dead_lettered(producer, settings):
    valid = CODEC.encode(
        AppendChunk(upload_id=str(uuid.uuid4()), repository="a", offset=0, data=b"x" * 50)
    )
    hostile = {
        b"not avro at all": "NOT_SINGLE_OBJECT_ENCODED",
        b"\xc3\x01" + b"\xee" * 8 + b"body": "UNKNOWN_FINGERPRINT",
        valid[: HEADER_SIZE + 5]: "TRUNCATED",
        valid[:HEADER_SIZE] + b"\xff" * 40: "MALFORMED_AVRO",
    }
    keys = {}
    for value, reason in hostile.items():
        key = uuid.uuid4().hex.encode()
        keys[key] = (value, reason)
        await producer.send_and_wait(settings.commands_topic, value, key=key)
    deadline = time.monotonic() + 30
    found: dict[bytes, DeadLetter] = {}
    while len(found) < len(keys):
        for partition in range(settings.partitions):
            async for logged in read_partition(settings, settings.dead_letter_topic, partition):
                letter = logged.record
                if isinstance(letter, DeadLetter) and letter.key in keys:
                    found[letter.key] = letter
        assert time.monotonic() < deadline, f"dead letters found: {len(found)} of {len(keys)}"
        await asyncio.sleep(0.2)
    for key, (value, reason) in keys.items():
        assert found[key].original == value
        assert found[key].reason == reason, found[key].detail
        assert found[key].source_topic == settings.commands_topic
    # ... and the worker goes on.
    async with LayerService(settings, finish_timeout=60) as service:
        upload = await service.upload("hostile/after")
        await upload.write(b"still working")
        layer = await upload.finish(13, "sha256:" + hashlib.sha256(b"still working").hexdigest())
        assert layer.size == 13
