"""A worker's failure reaches a client as a fixed account, never as its own text.

The upload worker rejects a command it failed on with reason HANDLER_ERROR and a detail meant
for operators. Here such rejections are written straight onto this module's own events topic,
with a detail holding a secret-looking string, for commands a registry process sent (no upload
worker runs, so nothing else answers them); the registry's HTTP answers must not carry it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

import aiohttp
import pytest

from services.core.codec import CODEC
from services.core.records import (
    Command,
    CommandRejected,
    DeleteTag,
    RejectReason,
    RepositoryCommand,
    RepositoryCommandRejected,
    RepositoryRejectReason,
    StartUpload,
    new_id,
)
from services.core.settings import Settings
from tests.conftest import ServiceProcess, own_topics, registry_process, wait_for_query
from tests.limit_checks import commands_on_log
from tests.registry_events import EventWriter, eventually, image_manifest, unique_repository

SECRET = f"aws_secret_access_key=s3cr3t-{uuid.uuid4().hex}"
DETAIL = f"RuntimeError('{SECRET}') in /var/lib/layerlog/staging/worker.py line 12"
C = TypeVar("C", bound=Command | RepositoryCommand)


@pytest.fixture(scope="module")
async def settings(settings: Settings) -> AsyncIterator[Settings]:
    """Topics of this module's own: no upload worker reads its commands, so the rejections
    written here are the only answers they get."""
    async with own_topics(settings, "internal-text") as own:
        yield own


@pytest.fixture(scope="module")
async def registry(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceProcess]:
    service = registry_process(settings, tmp_path_factory).start()
    try:
        await wait_for_query(service.settings, url=service.settings.registry_url)
        yield service
    finally:
        service.stop()


@pytest.fixture()
async def http(registry: ServiceProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=registry.settings.registry_url) as session:
        yield session


@pytest.fixture()
async def writer(settings: Settings) -> AsyncIterator[EventWriter]:
    async with EventWriter(settings) as events:
        yield events


async def sent_command(settings: Settings, kind: type[C], repository: str) -> C:
    """The command of that kind the registry sent for the repository, once it is on the log."""
    deadline = time.monotonic() + 60
    while True:
        for command in await commands_on_log(settings):
            if isinstance(command, kind) and command.repository == repository:
                return command
        assert time.monotonic() < deadline, f"no {kind.__name__} for {repository} on the log"
        await asyncio.sleep(0.2)


async def answered(http: aiohttp.ClientSession, method: str, path: str) -> tuple[int, str]:
    async with http.request(method, path) as response:
        return response.status, await response.text()


def assert_nothing_internal(text: str) -> None:
    assert SECRET not in text and "s3cr3t" not in text
    assert "RuntimeError" not in text and "/var/lib" not in text


async def test_the_verdict_of_a_command_the_worker_failed_on_hides_its_detail(http, writer):
    upload_id, command_id = str(uuid.uuid4()), new_id()
    rejected = CommandRejected(
        event_id=new_id(),
        upload_id=upload_id,
        repository="internal/verdict",
        caused_by=command_id,
        command_type="AppendChunk",
        reason=RejectReason.HANDLER_ERROR,
        detail=DETAIL,
    )
    await writer.raw(upload_id, CODEC.encode(rejected))
    params = {"wait": "30", "command": command_id}
    async with http.get(f"/uploads/{upload_id}/verdict", params=params) as response:
        assert response.status == 200
        text = await response.text()
        body = await response.json()
    assert body["state"] == "rejected" and body["reason"] == "HANDLER_ERROR"
    assert "dead letters" in body["detail"]
    assert_nothing_internal(text)


async def test_an_upload_start_the_worker_failed_on_is_a_500_without_its_detail(
    http, writer, settings
):
    name = unique_repository("internal/start")
    answer = asyncio.create_task(answered(http, "POST", f"/v2/{name}/blobs/uploads/"))
    try:
        start = await sent_command(settings, StartUpload, name)
        rejected = CommandRejected(
            event_id=new_id(),
            upload_id=start.upload_id,
            repository=name,
            caused_by=start.command_id,
            command_type="StartUpload",
            reason=RejectReason.HANDLER_ERROR,
            detail=DETAIL,
        )
        await writer.raw(start.upload_id, CODEC.encode(rejected))
        status, text = await asyncio.wait_for(answer, 60)
    finally:
        answer.cancel()
    assert status == 500
    (error,) = json.loads(text)["errors"]
    assert error["code"] == "UNKNOWN" and "dead letters" in error["message"]
    assert_nothing_internal(text)


async def test_a_tag_delete_the_worker_failed_on_is_a_500_without_its_detail(
    http, writer, settings
):
    name = unique_repository("internal/tag")
    await writer.manifest(name, image_manifest("internal"), tag="v1")

    async def tagged() -> bool:
        async with http.get(f"/v2/{name}/manifests/v1") as response:
            return response.status == 200

    await eventually(tagged, "the tag is in the registry's index")
    answer = asyncio.create_task(answered(http, "DELETE", f"/v2/{name}/manifests/v1"))
    try:
        delete = await sent_command(settings, DeleteTag, name)
        rejected = RepositoryCommandRejected(
            event_id=new_id(),
            repository=name,
            caused_by=delete.command_id,
            command_type="DeleteTag",
            reason=RepositoryRejectReason.HANDLER_ERROR,
            detail=DETAIL,
        )
        await writer.events(rejected)
        status, text = await asyncio.wait_for(answer, 60)
    finally:
        answer.cancel()
    assert status == 500
    (error,) = json.loads(text)["errors"]
    assert error["code"] == "UNKNOWN"
    assert_nothing_internal(text)
    # Not deleted: the worker did not apply it.
    async with http.get(f"/v2/{name}/manifests/v1") as response:
        assert response.status == 200
