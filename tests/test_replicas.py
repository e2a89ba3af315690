"""Replicas and restarts: workers share partitions; a restarted query service resumes."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.client import LayerService
from services.core.kafka import connection
from services.core.principals import Principal
from tests.conftest import ServiceProcess, wait_for_query

pytestmark = pytest.mark.usefixtures("stack_services")


def assignments(service: ServiceProcess) -> list[int] | None:
    found = re.findall(r"assigned partitions \[([\d, ]*)\]", service.log_path.read_text())
    if not found:
        return None
    return [int(p) for p in found[-1].split(",") if p.strip()]


async def push(service: LayerService, name: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    upload = await service.upload(name)
    await upload.write(data)
    await upload.finish(len(data), digest)
    return digest


async def test_two_workers_share_the_partitions(settings, stack_services, tmp_path):
    first = stack_services["upload-worker"]
    second = ServiceProcess("upload-worker", settings, tmp_path, label="2").start()
    try:
        deadline = time.monotonic() + 60
        while True:
            mine, theirs = assignments(first), assignments(second)
            if mine and theirs and len(mine) + len(theirs) == settings.partitions:
                break
            assert time.monotonic() < deadline, f"no shared assignment: {mine} / {theirs}"
            await asyncio.sleep(0.2)
        assert set(mine).isdisjoint(theirs)
        assert set(mine) | set(theirs) == set(range(settings.partitions))
        async with LayerService(settings, finish_timeout=60) as service:
            blobs = [f"blob {n} for two workers".encode() * 1000 for n in range(12)]
            digests = await asyncio.gather(*(push(service, "shared/work", b) for b in blobs))
            assert all([await service.exists("shared/work", d) for d in digests])
    finally:
        second.stop()
    # The survivor takes every partition back and goes on.
    deadline = time.monotonic() + 60
    while assignments(first) != list(range(settings.partitions)):
        assert time.monotonic() < deadline, f"first worker holds {assignments(first)}"
        await asyncio.sleep(0.2)
    async with LayerService(settings, finish_timeout=60) as service:
        digest = await push(service, "shared/work", b"after the second worker left")
        assert await service.exists("shared/work", digest)


async def events_in_log(settings) -> int:
    consumer = AIOKafkaConsumer(**connection(settings, Principal.AUDITOR))
    await consumer.start()
    try:
        partitions = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


async def test_restarted_query_service_resumes_from_stored_offsets(settings, stack_services):
    query = stack_services["query"]
    async with LayerService(settings, finish_timeout=120) as service:
        await push(service, "restart/before", b"committed before the restart")
        query.stop()
        assert not query.alive()
        # finish() waits for the verdict through the query service, which is down: it must
        # keep waiting, and succeed once the service is back.
        data = b"committed while the query service was down"
        pushing = asyncio.create_task(push(service, "restart/during", data))
        await asyncio.sleep(2)
        assert not pushing.done()
        query.start()
        await wait_for_query(settings)
        digest = await asyncio.wait_for(pushing, 60)
        assert await service.exists("restart/during", digest)
    async with aiohttp.ClientSession() as http:
        async with http.get(settings.query_url + "/healthz") as response:
            health = await response.json()
    # It applied only what it had not stored yet, not the whole log again.
    assert 0 < health["events_applied"] < await events_in_log(settings)
