"""Hostile requests to the registry's write routes: each gets the spec's 4xx and error body,
never a 500, and an upload refused a bad chunk stays usable from its real offset."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest
from yarl import URL

MD5 = "md5:" + hashlib.md5(b"x").hexdigest()
TARSUM = "tarsum.v1+sha256:" + hashlib.sha256(b"x").hexdigest()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture()
def http(registry_http: aiohttp.ClientSession) -> aiohttp.ClientSession:
    return registry_http


async def code_of(response: aiohttp.ClientResponse) -> str:
    body = await response.json()
    (error,) = body["errors"]
    assert set(error) == {"code", "message", "detail"}
    return error["code"]


async def new_upload(http: aiohttp.ClientSession, name: str, data: bytes = b"") -> str:
    async with http.post(f"/v2/{name}/blobs/uploads/") as response:
        assert response.status == 202
        location = response.headers["Location"]
    if data:
        async with http.patch(location, data=data) as response:
            assert response.status == 202
    return location


async def test_overlapping_range_is_416_with_the_real_offset(http):
    location = await new_upload(http, "hostile/overlap", b"a" * 100)
    headers = {"Content-Range": "50-149"}
    async with http.patch(location, data=b"b" * 100, headers=headers) as response:
        assert response.status == 416
        assert response.headers["Range"] == "0-99"
        assert await code_of(response) == "BLOB_UPLOAD_INVALID"


async def test_gapped_range_is_refused_by_the_worker_as_416(http):
    """A start past the offset is the worker's to judge (this index may lag): it refuses."""
    location = await new_upload(http, "hostile/gap", b"a" * 100)
    async with http.patch(location, data=b"b" * 100, headers={"Content-Range": "200-299"}) as r:
        assert r.status == 416
        assert r.headers["Range"] == "0-99"
    # Nothing changed: the upload goes on from its real offset and commits the right bytes.
    async with http.patch(location, data=b"c" * 10, headers={"Content-Range": "100-109"}) as r:
        assert r.status == 202
        assert r.headers["Range"] == "0-109"
    digest = sha256(b"a" * 100 + b"c" * 10)
    async with http.put(location, params={"digest": digest}) as response:
        assert response.status == 201, await response.text()


@pytest.mark.parametrize("header", ["bogus", "0-x", "10-5", "-5", "0-99999999999999999999999"])
async def test_malformed_content_range_is_416(http, header):
    location = await new_upload(http, "hostile/malformed-range")
    async with http.patch(location, data=b"x", headers={"Content-Range": header}) as response:
        assert response.status == 416
        assert response.headers["Range"] == "0-0"


async def test_content_range_must_match_the_body(http):
    location = await new_upload(http, "hostile/range-length")
    async with http.patch(location, data=b"12345", headers={"Content-Range": "0-9"}) as response:
        assert response.status == 400
        assert await code_of(response) == "BLOB_UPLOAD_INVALID"
    async with http.get(location) as response:
        assert response.status == 204
        assert response.headers["Range"] == "0-0"


async def test_patch_or_put_to_a_finished_upload_is_unknown(http):
    location = await new_upload(http, "hostile/finished", b"done")
    async with http.put(location, params={"digest": sha256(b"done")}) as response:
        assert response.status == 201
    async with http.patch(location, data=b"more") as response:
        assert response.status == 404
        assert await code_of(response) == "BLOB_UPLOAD_UNKNOWN"
    async with http.put(location, params={"digest": sha256(b"more")}, data=b"more") as response:
        assert response.status == 404
        assert await code_of(response) == "BLOB_UPLOAD_UNKNOWN"
    # The same PUT again is a retry, not an attack: it gets the verdict it had
    # (test_registry_uploads.py::test_the_same_put_again_gets_the_verdict_again).
    async with http.put(location, params={"digest": sha256(b"done")}) as response:
        assert response.status == 201


async def test_upload_ids_that_are_not_ours(http):
    location = await new_upload(http, "hostile/owner")
    upload_id = location.rsplit("/", 1)[1]
    for path in (
        f"/v2/hostile/other/blobs/uploads/{upload_id}",  # another repository's session
        "/v2/hostile/owner/blobs/uploads/00000000-0000-0000-0000-000000000000",
        "/v2/hostile/owner/blobs/uploads/not-a-uuid",
        f"/v2/hostile/owner/blobs/uploads/{upload_id.upper()}",
    ):
        for method in ("GET", "PATCH", "PUT", "DELETE"):
            params = {"digest": sha256(b"")} if method == "PUT" else {}
            async with http.request(method, path, params=params) as response:
                assert response.status == 404, (method, path)
                assert await code_of(response) == "BLOB_UPLOAD_UNKNOWN"


@pytest.mark.parametrize(
    "digest", [MD5, TARSUM, "sha256:abc", "sha256:" + "A" * 64, "sha512:" + "0" * 64, "", "x"]
)
async def test_bad_digests_are_refused_before_anything_is_sent(http, digest):
    location = await new_upload(http, "hostile/digest", b"keep me")
    async with http.put(location, params={"digest": digest}) as response:
        assert response.status == 400
        assert await code_of(response) == "DIGEST_INVALID"
    async with http.get(location) as response:
        assert response.status == 204  # still open, offset unchanged
        assert response.headers["Range"] == "0-6"
    async with http.post("/v2/hostile/digest/blobs/uploads/", params={"digest": digest}) as r:
        assert r.status == 400
    async with http.post("/v2/hostile/digest/blobs/uploads/", params={"mount": digest}) as r:
        assert r.status == 400
    if digest:
        async with http.delete(f"/v2/hostile/digest/blobs/{digest}") as response:
            assert response.status == 400
            assert await code_of(response) == "DIGEST_INVALID"


async def test_put_without_digest(http):
    location = await new_upload(http, "hostile/no-digest")
    async with http.put(location) as response:
        assert response.status == 400
        assert await code_of(response) == "DIGEST_INVALID"


@pytest.mark.parametrize(
    "raw",
    [
        "/v2/UPPER/blobs/uploads/",
        "/v2/hostile/../etc/blobs/uploads/",
        "/v2/hostile/%2e%2e/etc/blobs/uploads/",
        "/v2/./hostile/blobs/uploads/",
        "/v2/-lead/blobs/uploads/",
        "/v2/a//b/blobs/uploads/",
        "/v2/" + "a" * 300 + "/blobs/uploads/",
    ],
)
async def test_bad_names_are_name_invalid(http, registry, raw):
    url = URL(registry.settings.registry_url + raw, encoded=True)
    async with aiohttp.ClientSession() as plain:
        async with plain.post(url) as response:
            assert response.status == 400, await response.text()
            assert await code_of(response) == "NAME_INVALID"


async def test_a_cut_short_body_is_refused_and_the_upload_survives(http, registry):
    """A client that promises more than it sends and hangs up: a 4xx or a closed connection,
    and the upload still answers from its durable offset."""
    location = await new_upload(http, "hostile/short")
    host, port = registry.settings.registry_host_port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode()
        + b"only this"
    )
    await writer.drain()
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    assert not reply.startswith(b"HTTP/1.1 5")
    async with http.get(location) as response:
        assert response.status == 204
