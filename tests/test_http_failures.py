"""S3 going away in the middle of a layer GET (issue 11, defect 6).

The query service under test reads the real versitygw through a forwarding TCP proxy on
loopback that this test starts and cuts mid-transfer; the shared S3 server keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from dataclasses import replace

import aiohttp
import pytest

from services.client import LayerService
from tests.conftest import ServiceProcess, free_port, wait_for_query

pytestmark = pytest.mark.usefixtures("stack_services")

LAYER_BYTES = 16 << 20


class CuttingProxy:
    """Forwards loopback connections to S3; once armed, closes every connection after that many
    more bytes came back from S3."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.budget: int | None = None
        self.cuts = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def arm(self, after_bytes: int) -> None:
        self.budget = after_bytes

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        self._cut()
        await self.server.wait_closed()

    def _cut(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter):
        s3_in, s3_out = await asyncio.open_connection(*self.upstream)
        self.writers |= {client_out, s3_out}
        await asyncio.gather(
            self._pump(client_in, s3_out, counted=False),
            self._pump(s3_in, client_out, counted=True),
            return_exceptions=True,
        )
        for writer in (client_out, s3_out):
            self.writers.discard(writer)
            writer.close()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, counted: bool
    ) -> None:
        while data := await source.read(64 << 10):
            sink.write(data)
            await sink.drain()
            if counted and self.budget is not None:
                self.budget -= len(data)
                if self.budget <= 0:
                    self.budget = None
                    self.cuts += 1
                    self._cut()
                    return
        with contextlib.suppress(OSError):
            sink.write_eof()


@pytest.fixture()
async def proxied_query(settings, tmp_path):
    proxy = await CuttingProxy(settings.s3_endpoint).start()
    # Its own address and index; the session's topics; S3 only through the proxy.
    listen = f"127.0.0.1:{free_port()}"
    index = tmp_path / "proxied-index.sqlite"
    proxied = replace(settings, query_listen=listen, query_url="http://" + listen)
    proxied = replace(proxied, s3_endpoint=f"127.0.0.1:{proxy.port}", index_path=str(index))
    service = ServiceProcess("query", proxied, tmp_path, "proxied").start()
    await wait_for_query(proxied)
    yield proxied, proxy, service
    service.stop()
    await proxy.close()


async def committed_layer(settings, proxied) -> tuple[str, bytes]:
    data = os.urandom(LAYER_BYTES)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with LayerService(settings, finish_timeout=120) as service:
        upload = await service.upload("failures/big")
        await upload.write(data)
        await upload.finish(len(data), digest)
    async with LayerService(proxied, finish_timeout=60) as service:
        for _ in range(600):  # the proxied service's own projection catches up
            if await service.exists("failures/big", digest):
                break
            await asyncio.sleep(0.1)
    return digest, data


async def test_storage_cut_mid_body_ends_the_response_and_the_service_goes_on(
    settings, proxied_query
):
    proxied, proxy, service = proxied_query
    digest, data = await committed_layer(settings, proxied)
    url = f"{proxied.query_url}/v2/failures/big/blobs/{digest}"
    got = bytearray()
    proxy.arm(3 << 20)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200
            assert response.content_length == len(data)
            request_id = response.headers["X-Request-Id"]
            with pytest.raises(aiohttp.ClientPayloadError):
                async for piece in response.content.iter_chunked(1 << 20):
                    got += piece
        assert proxy.cuts == 1
        # A short body of the layer's own bytes: no second response, no error text inside it.
        assert 0 < len(got) < len(data)
        assert bytes(got) == data[: len(got)]
        # The next request is served, from storage, in full.
        async with http.get(url) as response:
            assert response.status == 200
            assert await response.read() == data

    # The SDK reads across a cut: it reopens from its offset.
    proxy.arm(5 << 20)
    async with LayerService(proxied, finish_timeout=60) as layers:
        layer = await layers.fetch("failures/big", digest)
        assert await layer.read() == data
        await layer.close()
    assert proxy.cuts == 2

    service.stop()
    lines = [json.loads(line) for line in service.log_path.read_text().splitlines() if line]
    logged = [line for line in lines if line.get("request_id") == request_id]
    assert len(logged) == 1, logged
    assert logged[0]["level"] == "ERROR"
    assert "Traceback" in logged[0]["exception"]
    assert request_id in logged[0]["message"]
