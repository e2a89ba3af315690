"""Uploads idle past the TTL expire: UploadExpired, staged data gone, resume unknown; an upload
still in use is left alone; only the partition's owner asks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from services.client import LayerService, LayerUploadUnknown
from services.core.records import UPLOAD_WORKER, UploadExpired
from tests.conftest import ServiceProcess
from tests.faults.audit import events_by_upload
from tests.faults.conftest import Pipeline


@pytest.fixture()
async def short_ttl_pipeline(fault_settings, tmp_path):
    settings = replace(fault_settings, upload_ttl_seconds=3, expiry_interval_seconds=1)
    running = Pipeline(settings, tmp_path)
    # Two workers: each may only ask to expire the uploads of the partitions it owns.
    running.services["upload-worker-2"] = ServiceProcess(
        "upload-worker", settings, tmp_path, label="2"
    )
    await running.start()
    yield running
    running.stop()
    print(running.logs())


async def test_idle_uploads_expire_and_busy_ones_do_not(short_ttl_pipeline, fault_store):
    settings = short_ttl_pipeline.settings
    async with LayerService(settings, finish_timeout=180) as service:
        idle = [await service.upload("faults/idle") for _ in range(6)]
        for upload in idle:
            await upload.write(b"staged and then forgotten" * 1000)
            await upload.flush()
        busy = await service.upload("faults/busy")
        deadline = time.monotonic() + 60
        while True:
            await busy.write(b"still here")
            await busy.flush()
            events = await events_by_upload(settings)
            expired = [
                u.uuid for u in idle if any(isinstance(e, UploadExpired) for e in events[u.uuid])
            ]
            if len(expired) == len(idle):
                break
            assert time.monotonic() < deadline, f"expired so far: {len(expired)} of {len(idle)}"
            await asyncio.sleep(1)
        for upload in idle:
            [expired_event] = [e for e in events[upload.uuid] if isinstance(e, UploadExpired)]
            assert expired_event.actor == UPLOAD_WORKER  # the worker's own doing, not a client's
            with pytest.raises(LayerUploadUnknown):
                await service.resume(upload.uuid)
            assert await fault_store.list_keys(f"uploads/{upload.uuid}/") == []
            assert await fault_store.multipart_uploads(f"uploads/{upload.uuid}/") == []
        assert not any(isinstance(e, UploadExpired) for e in events[busy.uuid])
        layer = await busy.finish(
            busy.offset,
            "sha256:"
            + __import__("hashlib").sha256(b"still here" * (busy.offset // 10)).hexdigest(),
        )
        assert layer.size == busy.offset
