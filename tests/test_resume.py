"""A started upload can be resumed by its UUID from another process at once (issue 11, defect 2).

upload() and write() return when Kafka acknowledges the commands; the query service must not
answer "unknown" (or an old offset) for commands it has not applied yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from services.client import LayerService, LayerUploadUnknown
from tests.conftest import ROOT, settings_env

pytestmark = pytest.mark.usefixtures("stack_services")

ITERATIONS = 30


class Peer:
    """A tests.resume_peer process: one request per line in, one JSON line out."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, role: str, settings) -> Peer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.resume_peer",
            role,
            cwd=ROOT,
            env=settings_env(settings),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        peer = cls(process)
        assert await peer.read() == {"ready": role}
        return peer

    async def ask(self, line: str) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()
        return await self.read()

    async def read(self) -> dict:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 120)
        assert line, "the peer process exited"
        return json.loads(line)

    async def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def background_load(settings, stop: asyncio.Event) -> int:
    """Uploads finished back to back, so the worker, verifier and projection are busy."""
    finished = 0
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        while not stop.is_set():
            data = os.urandom(random.randint(256 << 10, 2 << 20))
            upload = await service.upload("load/busy")
            await upload.write(data)
            await upload.finish(len(data), "sha256:" + hashlib.sha256(data).hexdigest())
            finished += 1
    return finished


@pytest.fixture()
async def peers(settings) -> AsyncIterator[tuple[Peer, Peer]]:
    writer = await Peer.start("writer", settings)
    resumer = await Peer.start("resumer", settings)
    yield writer, resumer
    await writer.stop()
    await resumer.stop()


async def test_resume_right_after_upload_from_another_process(settings, peers):
    writer, resumer = peers
    stop = asyncio.Event()
    load = [asyncio.create_task(background_load(settings, stop)) for _ in range(3)]
    wrong = []
    try:
        for iteration in range(ITERATIONS):
            # Some uploads have no writes at all: upload() alone must be enough to resume.
            pieces = [random.randint(1, 200_000) for _ in range(iteration % 4)]
            started = await writer.ask(f"resume/iter{iteration} {','.join(map(str, pieces))}")
            assert started["offset"] == sum(pieces)
            resumed = await resumer.ask(started["uuid"])
            if resumed != started:
                wrong.append((iteration, started, resumed))
    finally:
        stop.set()
        done = await asyncio.gather(*load)
    print(f"background uploads finished meanwhile: {sum(done)}")
    assert not wrong, f"{len(wrong)} of {ITERATIONS} resumes went wrong: {wrong[:5]}"


async def test_unknown_upload_is_unknown(settings):
    unknown = str(uuid.uuid4())
    async with LayerService(settings, finish_timeout=30) as service:
        with pytest.raises(LayerUploadUnknown):
            await service.resume(unknown)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{settings.query_url}/uploads/{unknown}") as response:
            assert response.status == 404
            assert (await response.json())["error"] == "BLOB_UPLOAD_UNKNOWN"
