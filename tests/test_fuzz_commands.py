"""10,000 random and mutated records through the command decoder and the worker's handler, on
the real object store: no exception escapes, and a refused record changes no state."""

from __future__ import annotations

import random
import uuid

import pytest
from aiokafka.structs import ConsumerRecord

from services.core.codec import CODEC, DecodeError
from services.core.objectstore import ObjectStore
from services.core.records import (
    COMMAND_TYPES,
    AppendChunk,
    CommandRejected,
    DeadLetter,
    ExpireUpload,
    FinishUpload,
    StartUpload,
)
from services.upload_worker.handler import CommandHandler
from services.upload_worker.staging import StagingArea, Status

RECORDS = 10_000
ALPHABET = "abcXYZ019._-/ :+é\x00"


def random_text(rng: random.Random, longest: int = 80) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, longest)))


def random_digest(rng: random.Random) -> str:
    algorithm = rng.choice(["sha256", "sha512", "md5", "tarsum.v1+sha256", "tarsum.v9+sha256", ""])
    hex_part = "".join(
        rng.choice("0123456789abcdefABCDEF") for _ in range(rng.choice([0, 63, 64, 128]))
    )
    return rng.choice([f"{algorithm}:{hex_part}", random_text(rng), hex_part])


def random_command(rng: random.Random, upload_id: str, durable: int) -> object:
    common = {
        "upload_id": rng.choice([upload_id, upload_id, str(uuid.uuid4()), random_text(rng, 40)]),
        "repository": rng.choice(["fuzz/target", "fuzz/target", random_text(rng, 300)]),
    }
    kind = rng.choice(COMMAND_TYPES)
    if kind is AppendChunk:
        offset = rng.choice([durable, durable, durable - 1, -rng.randint(1, 2**40), 2**62, 0])
        return AppendChunk(offset=offset, data=rng.randbytes(rng.randint(0, 64)), **common)
    if kind is FinishUpload:
        size = rng.choice([durable, -1, 2**62, rng.randint(0, 100)])
        return FinishUpload(size=size, digest=random_digest(rng), **common)
    if kind is ExpireUpload:
        return ExpireUpload(ttl_seconds=rng.choice([10**9, 3600]), **common)
    return kind(**common)


def mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        action = rng.randrange(4)
        if action == 0 and buffer:
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
        elif action == 1:
            del buffer[rng.randrange(len(buffer) + 1) :]
        elif action == 2:
            position = rng.randrange(len(buffer) + 1)
            buffer[position:position] = rng.randbytes(rng.randint(1, 8))
        elif buffer:
            position = rng.randrange(len(buffer))
            buffer[position : position + 1] = b"\xff" * rng.randint(1, 9)
    return bytes(buffer)


def as_record(value: bytes, offset: int) -> ConsumerRecord:
    return ConsumerRecord(
        topic="fuzz.commands",
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=(),
    )


@pytest.mark.timeout(900)
async def test_random_and_mutated_commands(settings, store: ObjectStore):
    rng = random.Random(1127)
    staging = StagingArea(store, settings.part_size)
    handler = CommandHandler(settings, staging)
    offset = 0

    async def open_upload() -> str:
        nonlocal offset
        upload_id = str(uuid.uuid4())
        start = StartUpload(upload_id=upload_id, repository="fuzz/target")
        outputs = await handler.handle(as_record(CODEC.encode(start), offset))
        await handler.settle(0)  # what the processor does before it publishes
        offset += 1
        assert "UploadStarted" in repr(CODEC.decode(outputs[0].value))
        return upload_id

    upload_id = await open_upload()
    before = await staging.load(upload_id)
    refused = accepted = 0
    for _ in range(RECORDS):
        assert before is not None
        command = random_command(rng, upload_id, before.durable_offset)
        value = CODEC.encode(command)
        roll = rng.random()
        if roll < 0.3:
            value = mutate(rng, value)
        elif roll < 0.4:
            value = rng.randbytes(rng.randint(0, 100))
        try:
            CODEC.decode(value, COMMAND_TYPES)
        except DecodeError:
            pass  # the decoder may refuse; it may not raise anything else
        outputs = await handler.handle(as_record(value, offset))
        await handler.settle(0)
        offset += 1
        decoded = [CODEC.decode(o.value) for o in outputs]
        after = await staging.load(upload_id)
        if not decoded or all(isinstance(d, (CommandRejected, DeadLetter)) for d in decoded):
            refused += 1
            assert after == before, f"a refused record changed the upload: {decoded}"
        else:
            accepted += 1
        before = after  # nothing else writes the state between two records
        if after is None or after.status != Status.OPEN:
            upload_id = await open_upload()
            before = await staging.load(upload_id)
    # The mix must exercise both sides, or the test proves little.
    assert refused > RECORDS // 2
    assert accepted > 100
