"""Blob uploads through the OCI registry, end to end: the registry's commands go through the real
upload worker and verifier, and the blob comes back from the registry's own index."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from services.oci.manifest import OCI_MANIFEST
from tests.conftest import registry_process, wait_for_query

MIB = 1 << 20
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture()
def http(registry_http: aiohttp.ClientSession) -> aiohttp.ClientSession:
    return registry_http


async def start(http: aiohttp.ClientSession, name: str) -> str:
    async with http.post(f"/v2/{name}/blobs/uploads/") as response:
        assert response.status == 202, await response.text()
        assert response.headers["Range"] == "0-0"
        assert response.headers["Content-Length"] == "0"
        location = response.headers["Location"]
        assert location == f"/v2/{name}/blobs/uploads/{response.headers['Docker-Upload-UUID']}"
        return location


async def blob_of(http: aiohttp.ClientSession, name: str, digest: str) -> bytes:
    async with http.get(f"/v2/{name}/blobs/{digest}") as response:
        assert response.status == 200, await response.text()
        assert response.headers["Docker-Content-Digest"] == digest
        return await response.read()


async def test_chunked_upload_commits_and_reads_back(http):
    name = "registry/chunked"
    data = os.urandom(2 * MIB + 12345)  # the first PATCH is split into several AppendChunks
    digest = sha256(data)
    location = await start(http, name)
    cut = 2 * MIB + 100
    headers = {"Content-Range": f"0-{cut - 1}", "Content-Type": "application/octet-stream"}
    async with http.patch(location, data=data[:cut], headers=headers) as response:
        assert response.status == 202, await response.text()
        assert response.headers["Range"] == f"0-{cut - 1}"
        assert response.headers["Location"] == location
    async with http.get(location) as response:
        assert response.status == 204
        assert response.headers["Range"] == f"0-{cut - 1}"
    headers = {"Content-Range": f"{cut}-{len(data) - 1}"}
    async with http.patch(location, data=data[cut:], headers=headers) as response:
        assert response.status == 202, await response.text()
        assert response.headers["Range"] == f"0-{len(data) - 1}"
    async with http.put(location, params={"digest": digest}) as response:
        assert response.status == 201, await response.text()
        assert response.headers["Location"] == f"/v2/{name}/blobs/{digest}"
        assert response.headers["Docker-Content-Digest"] == digest
    assert await blob_of(http, name, digest) == data
    async with http.get(location) as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


async def test_streamed_patch_then_put_with_the_last_piece(http):
    name = "registry/streamed"
    data = os.urandom(3 * MIB + 7)
    digest = sha256(data)

    async def body() -> AsyncIterator[bytes]:
        # Transfer-Encoding: chunked, no Content-Length and no Content-Range: docker's way.
        for at in range(0, 3 * MIB, 256 * 1024):
            yield data[at : at + 256 * 1024]

    location = await start(http, name)
    async with http.patch(location, data=body()) as response:
        assert response.status == 202, await response.text()
        assert response.headers["Range"] == f"0-{3 * MIB - 1}"
    async with http.put(location, params={"digest": digest}, data=data[3 * MIB :]) as response:
        assert response.status == 201, await response.text()
    assert await blob_of(http, name, digest) == data


async def test_monolithic_post_and_empty_blob(http):
    name = "registry/monolithic"
    for data in (b"one request, the whole blob", b""):
        digest = sha256(data)
        async with http.post(
            f"/v2/{name}/blobs/uploads/", params={"digest": digest}, data=data
        ) as response:
            assert response.status == 201, await response.text()
            assert response.headers["Docker-Content-Digest"] == digest
            assert response.headers["Location"] == f"/v2/{name}/blobs/{digest}"
        async with http.head(f"/v2/{name}/blobs/{digest}") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(data))


async def test_post_then_put_monolithic_in_two_requests(http):
    name = "registry/post-put"
    data = os.urandom(64 * 1024)
    location = await start(http, name)
    async with http.put(location, params={"digest": sha256(data)}, data=data) as response:
        assert response.status == 201, await response.text()
    assert await blob_of(http, name, sha256(data)) == data


async def test_the_same_put_again_gets_the_verdict_again(http):
    """A client that lost the answer to its PUT (a 503 while a big layer was verified, a dropped
    connection) sends it again: the upload is finished by then, and the verdict is its answer."""
    name = "registry/put-again"
    data = os.urandom(64 * 1024)
    location = await start(http, name)
    async with http.patch(location, data=data) as response:
        assert response.status == 202
    for _ in range(2):
        async with http.put(location, params={"digest": sha256(data)}) as response:
            assert response.status == 201, await response.text()
            assert response.headers["Docker-Content-Digest"] == sha256(data)
    bad = await start(http, name)
    for _ in range(2):
        async with http.put(bad, params={"digest": sha256(b"other")}, data=b"x") as response:
            assert response.status == 400
            assert (await response.json())["errors"][0]["code"] == "DIGEST_INVALID"
    async with http.put(location, params={"digest": sha256(b"other")}) as response:
        assert response.status == 404  # another digest: that finished upload is not its


async def test_wrong_digest_fails_the_upload(http):
    name = "registry/wrong-digest"
    location = await start(http, name)
    async with http.put(location, params={"digest": sha256(b"other")}, data=b"bytes") as response:
        assert response.status == 400
        error = (await response.json())["errors"][0]
        assert error["code"] == "DIGEST_INVALID"
    async with http.head(f"/v2/{name}/blobs/{sha256(b'other')}") as response:
        assert response.status == 404


async def test_cancel_makes_the_upload_unknown(http):
    name = "registry/cancel"
    location = await start(http, name)
    async with http.patch(location, data=b"abandoned") as response:
        assert response.status == 202
    async with http.delete(location) as response:
        assert response.status == 204
    async with http.get(location) as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    async with http.delete(location) as response:
        assert response.status == 404


async def test_mount_falls_back_to_an_upload_and_same_repository_is_created(http):
    name = "registry/mount"
    data = b"mount me"
    digest = sha256(data)
    # Nothing to mount yet: the spec's fallback, a new upload session.
    async with http.post(
        f"/v2/{name}/blobs/uploads/", params={"mount": digest, "from": "registry/nowhere"}
    ) as response:
        assert response.status == 202
        location = response.headers["Location"]
    async with http.put(location, params={"digest": digest}, data=data) as response:
        assert response.status == 201
    # Already in the repository: mounted at once, nothing to copy.
    async with http.post(f"/v2/{name}/blobs/uploads/", params={"mount": digest}) as response:
        assert response.status == 201
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["Location"] == f"/v2/{name}/blobs/{digest}"


async def test_unlink_of_an_unknown_blob_is_404(http):
    async with http.delete(f"/v2/registry/unlink/blobs/{sha256(b'never pushed')}") as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def head_status(http: aiohttp.ClientSession, name: str, digest: str) -> int:
    async with http.head(f"/v2/{name}/blobs/{digest}") as response:
        return response.status


async def test_unlinked_then_pushed_again_is_there_and_a_manifest_may_name_it(http):
    """Each answer is final: a DELETE's 202 means HEAD says 404, a push's 201 that HEAD says 200
    and a manifest naming the blob is accepted. Every re-push is a second copy of known bytes
    (the verifier's dedupe), alternately in one POST and as POST then PUT."""
    name = "registry/relink"
    config = b'{"architecture":"amd64","os":"linux","relink":true}'
    layer = os.urandom(32 * 1024)
    for data in (config, layer):
        async with http.post(
            f"/v2/{name}/blobs/uploads/", params={"digest": sha256(data)}, data=data
        ) as response:
            assert response.status == 201, await response.text()
    for round_ in range(20):
        async with http.delete(f"/v2/{name}/blobs/{sha256(layer)}") as response:
            assert response.status == 202, (round_, await response.text())
        assert await head_status(http, name, sha256(layer)) == 404, round_
        if round_ % 2:
            location = await start(http, name)
            pushed = http.put(location, params={"digest": sha256(layer)}, data=layer)
        else:
            url = f"/v2/{name}/blobs/uploads/"
            pushed = http.post(url, params={"digest": sha256(layer)}, data=layer)
        async with pushed as response:
            assert response.status == 201, (round_, await response.text())
        assert await head_status(http, name, sha256(layer)) == 200, round_
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config), "size": len(config)},
                "layers": [{"mediaType": LAYER_TYPE, "digest": sha256(layer), "size": len(layer)}],
                "annotations": {"round": str(round_)},
            }
        ).encode()
        headers = {"Content-Type": OCI_MANIFEST}
        async with http.put(f"/v2/{name}/manifests/r{round_}", data=manifest, headers=headers) as r:
            assert r.status == 201, (round_, await r.text())


async def wait_for_offset(http: aiohttp.ClientSession, location: str, offset: int) -> None:
    """Polls the upload until this replica's index shows the offset (it follows the log)."""
    deadline = time.monotonic() + 60
    while True:
        async with http.get(location) as response:
            if response.status == 204 and response.headers["Range"] == f"0-{offset - 1}":
                return
        assert time.monotonic() < deadline, f"{location} never reached offset {offset}"
        await asyncio.sleep(0.1)


async def test_an_upload_moves_between_registry_processes(http, settings, tmp_path_factory):
    """The session's state lives in the log: a second process (its own index) continues it."""
    other = registry_process(settings, tmp_path_factory).start()
    try:
        await wait_for_query(other.settings, url=other.settings.registry_url)
        name = "registry/replicas"
        data = os.urandom(MIB + 10)
        location = await start(http, name)
        async with http.patch(location, data=data[:MIB]) as response:
            assert response.status == 202
        async with aiohttp.ClientSession(base_url=other.settings.registry_url) as second:
            await wait_for_offset(second, location, MIB)
            headers = {"Content-Range": f"{MIB}-{len(data) - 1}"}
            async with second.patch(location, data=data[MIB:], headers=headers) as response:
                assert response.status == 202, await response.text()
        # The first process learns of the second's chunk from the log, then finishes.
        await wait_for_offset(http, location, len(data))
        async with http.put(location, params={"digest": sha256(data)}) as response:
            assert response.status == 201, await response.text()
        assert await blob_of(http, name, sha256(data)) == data
    finally:
        other.stop()


async def test_concurrent_streamed_patches_share_the_body_budget_and_all_commit(http):
    """Twelve streams of 24 MiB against a 32 MiB process budget: each waits its turn, none holds
    a half-gathered chunk while waiting (that deadlocked once), and every blob commits."""
    piece = os.urandom(MIB)

    async def one(number: int) -> None:
        name = f"registry/budget-{number}"
        tail = number.to_bytes(4, "big")
        digest = sha256(piece * 24 + tail)

        async def body():
            for _ in range(24):
                yield piece
            yield tail

        location = await start(http, name)
        async with http.patch(location, data=body()) as response:
            assert response.status == 202, await response.text()
        async with http.put(location, params={"digest": digest}) as response:
            assert response.status == 201, await response.text()
        async with http.head(f"/v2/{name}/blobs/{digest}") as response:
            assert response.status == 200

    await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(12))), 240)


async def test_a_client_that_goes_quiet_has_its_gathered_bytes_sent_on(http):
    """Bytes a PATCH gathered towards a chunk are sent on when its client stalls, rather than
    held against the process's body budget: while the client is quiet, the upload's offset
    already counts them."""
    name = "registry/stalled"
    head = os.urandom(3 * MIB + MIB // 2)  # three whole 1 MiB chunks, and half of a fourth
    tail = os.urandom(MIB)
    location = await start(http, name)
    resumed = asyncio.Event()

    async def body():
        yield head
        await asyncio.wait_for(resumed.wait(), 60)
        yield tail

    async def watch() -> str:
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                async with http.get(location) as response:
                    seen = response.headers.get("Range", "")
                if seen == f"0-{len(head) - 1}":
                    return seen
                await asyncio.sleep(0.2)
            return seen
        finally:
            resumed.set()

    watching = asyncio.create_task(watch())
    async with http.patch(location, data=body()) as response:
        assert response.status == 202, await response.text()
    assert await watching == f"0-{len(head) - 1}"
    async with http.put(location, params={"digest": sha256(head + tail)}) as response:
        assert response.status == 201, await response.text()
