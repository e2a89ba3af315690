"""LAYERLOG_BLOB_REDIRECT: GET of a layer answers 307 to a presigned S3 URL.

A second query service with the setting on projects the same events as the session's one; the
SDK and a plain HTTP client then read whole layers and ranges straight from the real S3 server.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import time
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from minio import Minio
from minio.error import S3Error

from services.client import LayerService, LayerUnknown
from tests.conftest import ServiceProcess, free_port, wait_for_query

pytestmark = pytest.mark.usefixtures("stack_services")


@pytest.fixture()
async def redirecting(settings, tmp_path):
    port = free_port()
    redirect_settings = replace(
        settings,
        blob_redirect=True,
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
        index_path=str(tmp_path / "redirect-index.sqlite"),
    )
    query = ServiceProcess("query", redirect_settings, tmp_path, label="redirect").start()
    try:
        await wait_for_query(redirect_settings)
        yield redirect_settings
    finally:
        query.stop()


def reading_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "layerlog-layer-read")


async def wait_until_known(http: aiohttp.ClientSession, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        async with http.head(url) as response:
            if response.status == 200:
                return
        assert time.monotonic() < deadline, f"{url} not projected within {timeout}s"
        await asyncio.sleep(0.2)


async def test_get_redirects_to_s3_and_reads_match(settings, store, redirecting):
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with LayerService(settings) as pusher:
        upload = await pusher.upload("redirect/app")
        await upload.write(data)
        await upload.finish(len(data), digest)
    url = f"{redirecting.query_url}/v2/redirect/app/blobs/{digest}"
    async with aiohttp.ClientSession() as http:
        await wait_until_known(http, url)
        async with http.head(url) as head:
            assert head.status == 200
            assert head.headers["Content-Length"] == str(len(data))
        async with http.get(url, allow_redirects=False) as response:
            assert response.status == 307
            assert response.headers["Docker-Content-Digest"] == digest
            location = urlsplit(response.headers["Location"])
            assert location.netloc == settings.s3_endpoint
            assert "X-Amz-Signature=" in location.query
            # Signed with the read-only account, so a leaked URL's key can only read.
            credential = parse_qs(location.query)["X-Amz-Credential"][0]
            assert credential.startswith(settings.s3_read_access_key + "/")
        # A plain client follows it, Range header and all.
        ranged = {"Range": "bytes=1000-1999"}
        async with http.get(url, headers=ranged) as response:
            assert response.status == 206
            assert await response.read() == data[1000:2000]
        unknown = f"{redirecting.query_url}/v2/redirect/app/blobs/sha256:{'0' * 64}"
        async with http.get(unknown, allow_redirects=False) as response:
            assert response.status == 404
            assert (await response.json())["error"] == "BLOB_UNKNOWN"

    async with LayerService(redirecting) as reader:
        layer = await reader.fetch("redirect/app", digest)
        async with layer:
            assert await layer.read() == data
            layer.seek(len(data) - 100)
            assert await layer.read(50) == data[-100:-50]
            layer.seek(5)
            assert await layer.read(10) == data[5:15]
        with pytest.raises(LayerUnknown):
            await reader.fetch("redirect/other", digest)

        # Each open read of S3 has a read-ahead thread; closing the layer ends it, also when it
        # stopped half-way through the bytes.
        layer = await reader.fetch("redirect/app", digest)
        assert await layer.read(10) == data[:10]
        assert reading_threads() == 1
        await layer.close()
        for thread in threading.enumerate():
            if thread.name == "layerlog-layer-read":
                await asyncio.to_thread(thread.join, 5)
        assert reading_threads() == 0

        # Bytes gone from storage (an operator deleted them): S3's 404 is the SDK's LayerUnknown.
        await store.delete(f"uploads/{upload.uuid}/data")
        layer = await reader.fetch("redirect/app", digest)
        with pytest.raises(LayerUnknown):
            await layer.read(10)


async def test_the_read_only_account_reads_and_can_do_nothing_else(settings, store):
    reader = Minio(
        settings.s3_endpoint,
        access_key=settings.s3_read_access_key,
        secret_key=settings.s3_read_secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
    )
    await store.put("redirect/probe", b"readable")

    def attempts() -> list[str]:
        got = reader.get_object(settings.bucket, "redirect/probe")
        assert got.read() == b"readable"
        got.close()
        refused = []
        for what, attempt in (
            ("put", lambda: reader.put_object(settings.bucket, "x", io.BytesIO(b"1"), 1)),
            ("delete", lambda: reader.remove_object(settings.bucket, "redirect/probe")),
            ("list", lambda: list(reader.list_objects(settings.bucket))),
        ):
            try:
                attempt()
            except S3Error as error:
                refused.append(f"{what}:{error.code}")
        return refused

    assert await asyncio.to_thread(attempts) == [
        "put:AccessDenied",
        "delete:AccessDenied",
        "list:AccessDenied",
    ]
    assert await store.get("redirect/probe") == b"readable"
