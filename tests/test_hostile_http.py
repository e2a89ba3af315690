"""Hostile HTTP requests to the query service: 400/404/405/416 with a JSON error, never a 500,
and never a byte of a layer outside the repository it was committed to."""

from __future__ import annotations

import hashlib

import aiohttp
import pytest
from yarl import URL

from services.client import LayerService

pytestmark = pytest.mark.usefixtures("stack_services")

DIGEST = "sha256:" + hashlib.sha256(b"hostile http").hexdigest()


@pytest.fixture(scope="module")
async def committed(settings):
    async with LayerService(settings, finish_timeout=60) as service:
        upload = await service.upload("owner/secret")
        await upload.write(b"hostile http")
        await upload.finish(12, DIGEST)
    return DIGEST


async def request(settings, method: str, raw_path: str, **headers: str):
    url = URL(settings.query_url + raw_path, encoded=True)
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, headers=headers) as response:
            body = await response.read()
            return response.status, dict(response.headers), body


@pytest.mark.parametrize(
    ("path", "statuses"),
    [
        ("/v2/UPPER/blobs/{digest}", {400}),
        ("/v2/owner/../owner/secret/blobs/{digest}", {400, 404}),
        ("/v2/owner/%2E%2E/secret/blobs/{digest}", {400, 404}),
        ("/v2/owner%2Fsecret/blobs/{digest}", {200, 404}),
        ("/v2/someone/else/blobs/{digest}", {404}),
        ("/v2/owner/secret/blobs/sha256:SHORT", {400}),
        ("/v2/owner/secret/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", {400}),
        ("/v2/owner/secret/blobs/tarsum.v9+sha256:" + "0" * 64, {400}),
        ("/v2/" + "a/" * 5000 + "blobs/{digest}", {400}),
        ("/v2//blobs/{digest}", {400, 404}),
        ("/uploads/not-a-uuid", {400}),
        ("/uploads/0f8fad5b-d9cb-469f-a165-70867728950e", {404}),
        ("/uploads/0f8fad5b-d9cb-469f-a165-70867728950e/verdict?wait=nan", {400}),
        ("/uploads/0f8fad5b-d9cb-469f-a165-70867728950e/verdict?wait=-1", {400}),
        ("/uploads/0f8fad5b-d9cb-469f-a165-70867728950e/verdict?wait=inf", {400}),
        ("/uploads/0f8fad5b-d9cb-469f-a165-70867728950e/verdict?wait=abc", {400}),
        ("/nothing/here", {404}),
        ("/%00", {400, 404}),
    ],
)
async def test_malformed_requests_get_json_errors(settings, committed, path, statuses):
    for method in ("GET", "HEAD"):
        status, headers, body = await request(settings, method, path.format(digest=committed))
        assert status in statuses, (method, path[:80], status, body[:200])
        assert status != 500
        if method == "GET" and status >= 400:
            assert headers["Content-Type"].startswith("application/json")
            assert b'"error"' in body


@pytest.mark.parametrize(
    ("range_header", "status", "body"),
    [
        ("bytes=0-3", 206, b"host"),
        ("bytes=-4", 206, b"http"),
        ("bytes=8-", 206, b"http"),
        ("bytes=0-1,5-6", 200, b"hostile http"),
        ("bytes=12-", 416, None),
        ("bytes=5-2", 416, None),
        ("bytes=abc", 400, None),
        ("pages=1-2", 400, None),
        ("bytes=" + "9" * 5000 + "-", 416, None),
    ],
)
async def test_range_requests(settings, committed, range_header, status, body):
    got_status, headers, got_body = await request(
        settings, "GET", f"/v2/owner/secret/blobs/{committed}", Range=range_header
    )
    assert got_status == status, got_body[:200]
    if body is not None:
        assert got_body == body
    if status == 416:
        assert headers["Content-Range"] == "bytes */12"
    if status == 206:
        assert headers["Content-Range"].endswith("/12")


async def test_wrong_method_is_a_json_405(settings, committed):
    status, _, body = await request(settings, "DELETE", f"/v2/owner/secret/blobs/{committed}")
    assert status == 405
    assert b'"error"' in body
