"""The upload pipeline end to end through the SDK: commands on Kafka, the upload worker, the
verifier and the query service as separate processes, against the real Kafka and S3.

These follow the behaviour of the registry's original storage tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time

import aiohttp
import pytest

from services.client import (
    LayerInvalidDigest,
    LayerInvalidLength,
    LayerService,
    LayerTarSumVersionUnsupported,
    LayerUnknown,
    LayerUploadUnknown,
)
from services.core.objectstore import ObjectStore
from services.digests.digest import compute_digests
from tests.layers import random_tar, uneven_pieces

pytestmark = pytest.mark.usefixtures("stack_services")


def tarsum(data: bytes, algorithm: str = "tarsum.v1+sha256") -> str:
    return str(compute_digests(io.BytesIO(data), [algorithm])[algorithm])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture()
async def layers(settings):
    # Small chunks so that a test layer crosses pending objects, parts and the final flush.
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        yield service


async def wait_durable(settings, upload_id: str, offset: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{settings.query_url}/uploads/{upload_id}") as response:
                body = await response.json()
                if response.status == 200 and body["offset"] == offset:
                    return
            assert time.monotonic() < deadline, f"durable offset stuck at {body}"
            await asyncio.sleep(0.05)


async def assert_nothing_staged(store: ObjectStore, upload_id: str) -> None:
    assert await store.list_keys(f"uploads/{upload_id}/") == []
    assert await store.multipart_uploads(f"uploads/{upload_id}/") == []


async def test_start_then_cancel_then_resume_is_unknown(layers, store):
    upload = await layers.upload("library/cancelled")
    await upload.write(b"some bytes that will be thrown away")
    await upload.flush()
    await upload.cancel()
    with pytest.raises(LayerUploadUnknown):
        await layers.resume(upload.uuid)
    await assert_nothing_staged(store, upload.uuid)


async def test_upload_resume_finish_and_read_back(layers, settings, store):
    data = random_tar(seed=1, files=16, max_size=1_500_000)
    assert len(data) > 2 * settings.part_size  # crosses multipart parts
    digest = tarsum(data)
    pieces = uneven_pieces(data, seed=1)
    half = len(pieces) // 2

    upload = await layers.upload("library/ubuntu")
    written = 0
    for piece in pieces[:half]:
        assert await upload.write(piece) == len(piece)
        written += len(piece)
        assert upload.offset == written
    await upload.flush()
    await wait_durable(settings, upload.uuid, written)

    resumed = await layers.resume(upload.uuid)
    assert (resumed.uuid, resumed.name, resumed.offset) == (upload.uuid, "library/ubuntu", written)
    for piece in pieces[half:]:
        await resumed.write(piece)
    assert resumed.offset == len(data)
    layer = await resumed.finish(len(data), digest)
    assert (layer.name, layer.digest, layer.size) == ("library/ubuntu", digest, len(data))

    with pytest.raises(LayerUploadUnknown):
        await layers.resume(upload.uuid)
    assert await layers.exists("library/ubuntu", digest)
    fetched = await layers.fetch("library/ubuntu", digest)
    assert await fetched.read() == data
    assert fetched.seek(len(data) // 3) == len(data) // 3
    assert await fetched.read(1000) == data[len(data) // 3 : len(data) // 3 + 1000]
    assert fetched.tell() == len(data) // 3 + 1000
    fetched.seek(-10, 2)
    assert await fetched.read() == data[-10:]
    await fetched.close()
    assert await store.multipart_uploads(f"uploads/{upload.uuid}/") == []
    assert not [k for k in await store.list_keys(f"uploads/{upload.uuid}/") if "pending" in k]


async def test_fetch_of_unknown_layer_raises(layers):
    digest = sha256(b"never uploaded")
    assert not await layers.exists("library/ubuntu", digest)
    with pytest.raises(LayerUnknown):
        await layers.fetch("library/ubuntu", digest)


@pytest.mark.parametrize(
    ("size_delta", "digest_of", "error"),
    [
        (0, lambda data: tarsum(random_tar(seed=99, files=1)), LayerInvalidDigest),
        (0, lambda data: sha256(data + b"x"), LayerInvalidDigest),
        (1, tarsum, LayerInvalidLength),
        (0, lambda data: "tarsum.v9+sha256:" + "0" * 64, LayerTarSumVersionUnsupported),
    ],
    ids=["wrong-tarsum", "wrong-sha256", "wrong-size", "unknown-tarsum-version"],
)
async def test_failed_validation_raises_and_leaves_nothing(
    layers, store, size_delta, digest_of, error
):
    data = random_tar(seed=id(digest_of), files=3, max_size=100_000)
    upload = await layers.upload("library/rejected")
    await upload.write(data)
    digest = digest_of(data)
    with pytest.raises(error):
        await upload.finish(len(data) + size_delta, digest)
    await assert_nothing_staged(store, upload.uuid)
    assert not await layers.exists("library/rejected", tarsum(data))
    assert not await layers.exists("library/rejected", sha256(data))
    with pytest.raises(LayerUploadUnknown):
        await layers.resume(upload.uuid)


async def test_malformed_digest_is_refused_and_the_upload_stays_open(layers, settings):
    data = random_tar(seed=5, files=2, max_size=10_000)
    upload = await layers.upload("library/typo")
    await upload.write(data)
    with pytest.raises(LayerInvalidDigest, match="INVALID_DIGEST"):
        await upload.finish(len(data), "sha256:" + hashlib.sha256(data).hexdigest().upper())
    resumed = await layers.resume(upload.uuid)
    assert resumed.offset == len(data)
    layer = await resumed.finish(len(data), sha256(data))
    assert await layer.read() == data


async def test_same_layer_in_two_repositories_is_stored_once(layers, store):
    data = random_tar(seed=3, files=4, max_size=50_000, compress=True)
    digest = sha256(data)
    keys = []
    for name in ("team-a/app", "team-b/app"):
        upload = await layers.upload(name)
        await upload.write(data)
        await upload.finish(len(data), digest)
        keys.append(await store.list_keys(f"uploads/{upload.uuid}/"))
    assert await layers.exists("team-a/app", digest)
    assert await layers.exists("team-b/app", digest)
    assert len(keys[0]) == 1, "the first upload's assembled object is the stored copy"
    assert keys[1] == [], "the second upload's copy is dropped in favour of the first"
    for name in ("team-a/app", "team-b/app"):
        layer = await layers.fetch(name, digest)
        assert await layer.read() == data
        await layer.close()


async def test_layer_is_visible_only_in_its_repository(layers):
    data = b"plain blob, not a tar"
    upload = await layers.upload("owner/visible")
    await upload.write(data)
    await upload.finish(len(data), sha256(data))
    assert await layers.exists("owner/visible", sha256(data))
    assert not await layers.exists("someone/else", sha256(data))
    with pytest.raises(LayerUnknown):
        await layers.fetch("someone/else", sha256(data))


async def test_sha512_and_empty_layers(layers):
    data = random_tar(seed=4, files=2)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    upload = await layers.upload("library/sha512")
    await upload.write(data)
    assert (await upload.finish(len(data), digest)).size == len(data)
    empty = await layers.upload("library/empty")
    layer = await empty.finish(0, sha256(b""))
    assert layer.size == 0
    assert await layer.read() == b""
