"""The cap on requests waiting for the log (LAYERLOG_MAX_WAITING_REQUESTS), on the real stack.

The registry here runs with no upload worker at first, so every command it sends waits for an
outcome that has not come yet: two waits fill the cap of two. The third request is refused with
429 before it sends anything, and once a worker is running, both waits are answered and the
refused request, sent again, goes through.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest

from services.core.codec import CODEC
from services.core.records import CommandRejected, RejectReason, StartUpload, new_id
from services.core.settings import Settings
from services.oci.manifest import OCI_MANIFEST
from tests.conftest import ServiceProcess, own_topics, registry_process, wait_for_query
from tests.limit_checks import commands_on_log, metric, too_many
from tests.registry_events import EventWriter, eventually, image_manifest, query_service

WAITING = "layerlog_waiting_requests"
REFUSED = "layerlog_wait_refusals_total"


@pytest.fixture(scope="module")
async def settings(settings: Settings) -> AsyncIterator[Settings]:
    """Topics of this module's own: no other module's upload worker applies its commands, so
    they wait for as long as this module wants them to."""
    async with own_topics(settings, "waits") as own:
        yield replace(own, max_waiting_requests=2)


async def _post_upload(http: aiohttp.ClientSession, name: str) -> int:
    async with http.post(f"/v2/{name}/blobs/uploads/") as response:
        await response.read()
        return response.status


async def test_the_registry_refuses_a_wait_past_the_cap_before_sending_anything(
    settings, tmp_path_factory
):
    registry = registry_process(settings, tmp_path_factory).start()
    worker: ServiceProcess | None = None
    waiting: list[asyncio.Task[int]] = []
    try:
        await wait_for_query(registry.settings, url=registry.settings.registry_url)
        async with aiohttp.ClientSession(base_url=registry.settings.registry_url) as http:
            waiting += [asyncio.create_task(_post_upload(http, "waits/held")) for _ in range(2)]

            async def both_waiting() -> bool:
                return await metric(http, WAITING) == 2

            await eventually(both_waiting, "two uploads waiting for their start")
            async with http.post("/v2/waits/refused/blobs/uploads/") as response:
                _, body = await too_many(response)
            assert body["errors"][0]["detail"] == {"max_waiting_requests": 2}
            # Every route that sends a command is capped, manifests and deletes too.
            manifest = image_manifest("waits")
            async with http.put(
                "/v2/waits/refused/manifests/v1",
                data=manifest,
                headers={"Content-Type": OCI_MANIFEST},
            ) as response:
                await too_many(response)
            async with http.delete("/v2/waits/refused/blobs/sha256:" + "a" * 64) as response:
                await too_many(response)
            # Reads wait for nothing and are served.
            async with http.get("/v2/") as response:
                assert response.status == 200
            async with http.head("/v2/waits/refused/blobs/sha256:" + "a" * 64) as response:
                assert response.status == 404
            assert await metric(http, REFUSED) == 3
            assert not any(task.done() for task in waiting)

            # The refused requests sent nothing: the log holds the two waiting starts only.
            sent = await commands_on_log(settings)
            assert len(sent) == 2
            assert all(isinstance(c, StartUpload) and c.repository == "waits/held" for c in sent)

            worker = ServiceProcess(
                "upload-worker", settings, tmp_path_factory.mktemp("waits-worker")
            ).start()
            assert await asyncio.wait_for(asyncio.gather(*waiting), 120) == [202, 202]
            assert await _post_upload(http, "waits/refused") == 202
            assert await metric(http, WAITING) == 0
    finally:
        for task in waiting:
            task.cancel()
        if worker is not None:
            worker.stop()
        registry.stop()


async def test_the_query_service_caps_verdict_waits_and_still_answers_reads(
    settings, tmp_path_factory
):
    folder = tmp_path_factory.mktemp("waits-query")
    async with query_service(settings, folder / "query.log", index=folder / "index.sqlite") as q:
        async with aiohttp.ClientSession(base_url=q.query_url) as http:
            uploads = [(str(uuid.uuid4()), new_id()) for _ in range(2)]

            async def verdict(upload_id: str, command_id: str) -> dict:
                params = {"wait": "60", "command": command_id}
                async with http.get(f"/uploads/{upload_id}/verdict", params=params) as response:
                    assert response.status == 200
                    return await response.json()

            waiting = [asyncio.create_task(verdict(*u)) for u in uploads]

            async def both_waiting() -> bool:
                return await metric(http, WAITING) == 2

            await eventually(both_waiting, "two verdict requests waiting")
            other = uuid.uuid4()
            async with http.get(f"/uploads/{other}/verdict", params={"wait": "5"}) as response:
                _, body = await too_many(response)
            assert body["error"] == "TOOMANYREQUESTS"  # the SDK's field, beside the spec's
            # Asking without waiting takes no slot.
            async with http.get(f"/uploads/{other}/verdict", params={"wait": "0"}) as response:
                assert response.status == 404
            assert await metric(http, REFUSED) == 1

            # The verdicts arrive (here, rejections written straight to the log): both waits end.
            async with EventWriter(settings) as writer:
                for upload_id, command_id in uploads:
                    rejected = CommandRejected(
                        event_id=new_id(),
                        upload_id=upload_id,
                        repository="waits/verdicts",
                        caused_by=command_id,
                        command_type="FinishUpload",
                        reason=RejectReason.UNKNOWN_UPLOAD,
                        detail="no such upload",
                    )
                    await writer.raw(upload_id, CODEC.encode(rejected))  # keyed by upload
            answers = await asyncio.wait_for(asyncio.gather(*waiting), 60)
            assert [a["state"] for a in answers] == ["rejected", "rejected"]
            assert await metric(http, WAITING) == 0
