"""Checks shared by the limit tests: a sample from a service's /metrics, the spec's 429, and
the commands a test's own commands topic holds."""

from __future__ import annotations

import re

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.core import kafka
from services.core.codec import CODEC
from services.core.principals import Principal
from services.core.records import (
    COMMAND_TYPES,
    REPOSITORY_COMMAND_TYPES,
    Command,
    RepositoryCommand,
)
from services.core.settings import Settings


async def metric(http: aiohttp.ClientSession, name: str, **labels: str) -> float:
    """The value of one sample on the service's /metrics (0 if it is not there)."""
    async with http.get("/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if line.startswith("#") or sample.split("{")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', sample))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


async def too_many(response: aiohttp.ClientResponse) -> tuple[int, dict]:
    """The spec's 429: TOOMANYREQUESTS in its error body, and Retry-After; returns both."""
    assert response.status == 429, await response.text()
    body = await response.json()
    (error,) = body["errors"]
    assert error["code"] == "TOOMANYREQUESTS" and error["message"]
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after, body


async def commands_on_log(settings: Settings) -> list[Command | RepositoryCommand]:
    """Every command on the settings' commands topic, partition by partition."""
    partitions = await kafka.topic_partitions(
        settings, Principal.AUDITOR, settings.commands_topic
    )
    consumer = AIOKafkaConsumer(
        **kafka.connection(settings, Principal.AUDITOR),
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(settings.commands_topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        commands: list[Command | RepositoryCommand] = []
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                for record in batch.get(tp, []):
                    types = COMMAND_TYPES + REPOSITORY_COMMAND_TYPES
                    commands.append(CODEC.decode(record.value or b"", types))
        return commands
    finally:
        await consumer.stop()
