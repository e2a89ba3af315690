"""A client process dies mid-upload; a new process resumes by uuid and finishes it."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time

from services.client import LayerService, LayerUploadUnknown
from tests.conftest import ROOT, settings_env
from tests.layers import random_gzip_layer

CLIENT = """
import asyncio, sys
from services.client import LayerService, LayerUploadUnknown
async def main():
    data = open(sys.argv[1], "rb").read()
    async with LayerService(chunk_size=256 * 1024) as service:
        upload = await service.upload("faults/client-crash")
        print(upload.uuid, flush=True)
        await upload.write(data[: len(data) // 2])
        await upload.flush()
        print("written", flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_a_new_process_resumes_a_crashed_clients_upload(pipeline, fault_settings, tmp_path):
    data = random_gzip_layer(31, 6 << 20)
    layer_file = tmp_path / "layer.tar.gz"
    layer_file.write_bytes(data)
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        str(layer_file),
        cwd=ROOT,
        env=settings_env(fault_settings),
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdout is not None
    try:
        upload_id = (await client.stdout.readline()).decode().strip()
        assert await asyncio.wait_for(client.stdout.readline(), 60) == b"written\n"
    finally:
        client.kill()  # kill -9: no goodbye from the client
        await client.wait()

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with LayerService(fault_settings, finish_timeout=120) as service:
        deadline = time.monotonic() + 60
        while True:
            # The dead client's last chunks may still be on their way to durability.
            try:
                resumed = await service.resume(upload_id)
                if resumed.offset == len(data) // 2:
                    break
            except LayerUploadUnknown:
                pass  # not projected yet
            assert time.monotonic() < deadline, "the upload never became resumable"
            await asyncio.sleep(0.1)
        assert resumed.offset == len(data) // 2
        await resumed.write(data[resumed.offset :])
        layer = await resumed.finish(len(data), digest)
        assert await layer.read() == data
        await layer.close()
