"""The upload worker's sha256 of the bytes it stages (UploadFinished.content_sha256) and the
verifier's use of it: a sha256 layer is judged without reading it back, and anything the
worker's digest cannot vouch for is read back as before."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from services.client import LayerService
from services.core.eventlog import upload_records
from services.core.objectstore import ObjectStore
from services.core.records import FailureReason, LayerCommitted, UploadFinished
from services.core.settings import Settings
from services.upload_worker.digests import INLINE_BYTES, RunningDigests
from services.verifier.verdicts import Judge


def hexdigest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stage(digests: RunningDigests, upload: str, offset: int, data: bytes) -> str:
    """One chunk hashed and staged, as the worker's _append does it."""
    chunk, running = await digests.hash_chunk(upload, 0, offset, data)
    digests.advance(upload, running)
    return chunk


async def test_chunks_in_order_give_the_layers_sha256() -> None:
    digests = RunningDigests()
    pieces = [b"a" * 10, b"b" * (INLINE_BYTES + 5), b"c"]  # on the loop and in a thread
    offset = 0
    for piece in pieces:
        assert await stage(digests, "u", offset, piece) == hexdigest(piece)
        offset += len(piece)
    assert digests.digest("u", offset) == hexdigest(b"".join(pieces))
    assert digests.digest("u", offset - 1) is None  # not all of those bytes
    assert digests.digest("other", offset) is None


async def test_a_chunk_not_staged_leaves_the_digest_as_it_was() -> None:
    digests = RunningDigests()
    await stage(digests, "u", 0, b"first")
    await digests.hash_chunk("u", 0, 5, b"lost")  # staging failed: no advance
    await stage(digests, "u", 5, b"second")
    assert digests.digest("u", 11) == hexdigest(b"firstsecond")


async def test_anything_out_of_line_drops_the_digest() -> None:
    digests = RunningDigests()
    await stage(digests, "gap", 0, b"12345")
    await stage(digests, "gap", 9, b"late")  # not where the digest ends
    assert digests.digest("gap", 13) is None
    await stage(digests, "gap", 13, b"more")  # and it does not come back
    assert digests.digest("gap", 17) is None

    await stage(digests, "again", 0, b"12345")
    await stage(digests, "again", 0, b"12345")  # offset 0 starts over (a new staging)
    assert digests.digest("again", 5) == hexdigest(b"12345")

    await stage(digests, "dropped", 0, b"x")
    digests.drop(["dropped"])
    assert digests.digest("dropped", 1) is None


async def test_a_partition_taken_over_drops_its_uploads() -> None:
    digests = RunningDigests()
    for upload, partition in (("p1", 1), ("p2", 2)):
        _, running = await digests.hash_chunk(upload, partition, 0, b"data")
        digests.advance(upload, running)
    digests.drop_partitions({1})
    assert digests.digest("p1", 4) is None
    assert digests.digest("p2", 4) == hexdigest(b"data")


async def test_the_oldest_upload_goes_past_the_limit() -> None:
    digests = RunningDigests(max_uploads=2)
    for upload in ("a", "b", "c"):
        await stage(digests, upload, 0, b"z")
    assert [digests.digest(u, 1) is not None for u in ("a", "b", "c")] == [False, True, True]


@pytest.mark.usefixtures("stack_services")
async def test_the_upload_finished_carries_the_staged_bytes_sha256(settings: Settings) -> None:
    data = bytes(range(256)) * 2000  # 512,000 bytes in 64 KiB chunks: pending objects and parts
    digest = "sha256:" + hexdigest(data)
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        upload = await service.upload("content/digest")
        await upload.write(data)
        layer = await upload.finish(len(data), digest)
        assert layer.digest == digest
        fetched = await service.fetch("content/digest", digest)
        assert await fetched.read() == data
        await fetched.close()
    records = [r.record for r in await upload_records(settings, settings.events_topic, upload.uuid)]
    finished = [r for r in records if isinstance(r, UploadFinished)]
    committed = [r for r in records if isinstance(r, LayerCommitted)]
    assert [f.content_sha256 for f in finished] == [hexdigest(data)]
    assert [c.blob_sha256 for c in committed] == [digest]


async def put(store: ObjectStore, data: bytes) -> str:
    key = f"uploads/{uuid.uuid4()}/data"
    await store.put(key, data)
    return key


@pytest.mark.usefixtures("stack_services")
async def test_the_judge_reads_back_what_the_workers_digest_cannot_vouch_for(
    store: ObjectStore,
) -> None:
    judge = Judge(store)
    data, other = b"the staged bytes", b"what the client claimed"
    key = await put(store, data)
    size = len(data)

    ok = await judge.judge(key, size, size, "sha256:" + hexdigest(data), hexdigest(data))
    assert (ok.committed, ok.object_key, ok.blob_sha256) == (True, key, "sha256:" + hexdigest(data))

    # The client's digest and the worker's disagree: the bytes decide.
    wrong = await judge.judge(key, size, size, "sha256:" + hexdigest(other), hexdigest(data))
    assert (wrong.committed, wrong.reason) == (False, FailureReason.INVALID_DIGEST)
    assert wrong.actual == "sha256:" + hexdigest(data)

    # They agree, but S3 holds another size than was staged: read back, and the bytes decide.
    claimed = hexdigest(data + b"!")
    grown = await judge.judge(key, size + 1, size + 1, "sha256:" + claimed, claimed)
    assert (grown.committed, grown.reason) == (False, FailureReason.INVALID_DIGEST)

    await store.delete(key)
    gone = await judge.judge(key, size, size, "sha256:" + hexdigest(data), hexdigest(data))
    assert (gone.committed, gone.reason) == (False, FailureReason.MISSING_DATA)
