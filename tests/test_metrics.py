"""Prometheus metrics: each service's /metrics moves as layers are pushed, fail and are read.

The module runs its own pipeline (topics, bucket and free ports of its own): the session's
services share the default metrics ports with anything else on the machine, and counters here
must count this module's pushes only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.client import LayerInvalidDigest, LayerService
from services.core import metrics
from services.core.codec import CODEC
from services.core.kafka import connection
from services.core.principals import Principal
from services.core.provision import provision, remove_topics
from services.core.records import AppendChunk
from services.core.settings import Settings
from tests.conftest import ROOT, ServiceProcess, free_port, run_topics, wait_for_query

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
async def pipeline(settings: Settings, tmp_path_factory) -> AsyncIterator[dict[str, str]]:
    """A worker, a verifier and a query service of this module's own; yields /metrics URLs."""
    run = uuid.uuid4().hex[:10]
    query_port = free_port()
    own = replace(
        settings,
        **run_topics(f"metrics-{run}"),
        query_listen=f"127.0.0.1:{query_port}",
        query_url=f"http://127.0.0.1:{query_port}",
        worker_metrics_listen=f"127.0.0.1:{free_port()}",
        verifier_metrics_listen=f"127.0.0.1:{free_port()}",
        index_path=str(tmp_path_factory.mktemp("metrics-index") / "index.sqlite"),
    )
    await provision(own, timeout=30)
    logs = tmp_path_factory.mktemp("metrics-logs")
    services = [ServiceProcess(name, own, logs) for name in ("upload-worker", "verifier", "query")]
    for service in services:
        service.start()
    try:
        await wait_for_query(own)
        urls = {
            "upload-worker": f"http://{own.worker_metrics_listen}/metrics",
            "verifier": f"http://{own.verifier_metrics_listen}/metrics",
            "query": f"{own.query_url}/metrics",
        }
        # Each service serves /metrics only once it is up; and the worker must own partitions
        # before a push can be applied.
        deadline = time.monotonic() + 60
        for url in urls.values():
            while await scrape_or_none(url) is None:
                assert time.monotonic() < deadline, f"nothing answers at {url}"
                await asyncio.sleep(0.2)
        yield {"settings": own, **urls}  # type: ignore[dict-item]
    finally:
        for service in services:
            service.stop()
        await remove_topics(own)


async def scrape_or_none(url: str) -> Samples | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except aiohttp.ClientError:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(url: str) -> Samples:
    found = await scrape_or_none(url)
    assert found is not None, f"no metrics at {url}"
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (found, labels) in samples if found == name]


async def eventually(check: Callable[[], object], timeout: float = 30) -> None:
    """Retries an async assertion: counters move once the batch's transaction has committed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await check()  # type: ignore[misc]
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_counters_move_after_pushes_failures_and_reads(pipeline):
    settings = pipeline["settings"]
    before = {name: await scrape(pipeline[name]) for name in ("upload-worker", "verifier", "query")}
    good = uuid.uuid4().bytes * 20_000  # 320000 bytes: 5 chunks of 64 KiB
    bad = uuid.uuid4().bytes * 5_000  # 80000 bytes: 2 chunks
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        upload = await service.upload("metrics/good")
        await upload.write(good)
        await upload.finish(len(good), sha256(good))
        upload = await service.upload("metrics/bad")
        await upload.write(bad)
        with pytest.raises(LayerInvalidDigest):
            await upload.finish(len(bad), "sha256:" + "0" * 64)
        layer = await service.fetch("metrics/good", sha256(good))
        assert await layer.read() == good
        await layer.close()
    # A chunk for an upload that never started (rejected) and bytes that are no command at all.
    producer = AIOKafkaProducer(**connection(settings, Principal.CLIENT), acks="all")
    await producer.start()
    try:
        stray = str(uuid.uuid4())
        chunk = AppendChunk(upload_id=stray, repository="metrics/stray", offset=0, data=b"x")
        await producer.send_and_wait(settings.commands_topic, CODEC.encode(chunk), stray.encode())
        await producer.send_and_wait(settings.commands_topic, b"not a command", b"junk")
    finally:
        await producer.stop()

    async def worker_moved() -> None:
        now, was = await scrape(pipeline["upload-worker"]), before["upload-worker"]

        def moved(name: str, **labels: str) -> float:
            return value(now, name, **labels) - value(was, name, **labels)

        assert moved("layerlog_ingested_bytes_total") == len(good) + len(bad)
        assert moved("layerlog_ingested_chunks_total") == 7
        assert moved("layerlog_chunk_append_seconds_count") == 7
        assert moved("layerlog_chunk_append_seconds_sum") > 0
        rejected = {"command": "AppendChunk", "reason": "UNKNOWN_UPLOAD"}
        assert moved("layerlog_commands_rejected_total", **rejected) == 1
        assert moved("layerlog_dead_letters_total", reason="NOT_SINGLE_OBJECT_ENCODED") == 1
        assert moved("layerlog_events_published_total", event="UploadFinished") == 2
        lag = series(now, "layerlog_consumer_lag_records")
        assert {s["partition"] for s in lag} == {str(p) for p in range(settings.partitions)}
        assert {s["topic"] for s in lag} == {settings.commands_topic}

    async def verifier_moved() -> None:
        now, was = await scrape(pipeline["verifier"]), before["verifier"]

        def moved(name: str, **labels: str) -> float:
            return value(now, name, **labels) - value(was, name, **labels)

        assert moved("layerlog_verification_seconds_count", outcome="committed") == 1
        assert moved("layerlog_verification_seconds_count", outcome="failed") == 1
        assert moved("layerlog_verification_failures_total", reason="INVALID_DIGEST") == 1
        assert moved("layerlog_events_published_total", event="BlobLinked") == 1
        assert series(now, "layerlog_consumer_lag_records")

    async def query_moved() -> None:
        now, was = await scrape(pipeline["query"]), before["query"]

        def moved(name: str, **labels: str) -> float:
            return value(now, name, **labels) - value(was, name, **labels)

        # 2 UploadStarted, 7 ChunkAppended, 2 UploadFinished, 2 verdicts, the committed one's
        # BlobLinked, 1 CommandRejected.
        assert moved("layerlog_projection_events_applied_total") == 15
        assert value(now, "layerlog_projection_last_event_timestamp_seconds") > time.time() - 300
        lag = series(now, "layerlog_projection_lag_records")
        assert {s["partition"] for s in lag} == {str(p) for p in range(settings.partitions)}
        # The SDK reads with Range requests: 206.
        get = {"route": "blob", "method": "GET", "status": "206"}
        assert moved("layerlog_http_requests_total", **get) >= 1
        head = {"route": "blob", "method": "HEAD", "status": "200"}
        assert moved("layerlog_http_requests_total", **head) >= 1
        assert moved("layerlog_http_requests_total", route="verdict", method="GET", status="200")
        assert moved("layerlog_http_request_duration_seconds_count", route="blob") >= 2

    await eventually(worker_moved)
    await eventually(verifier_moved)
    await eventually(query_moved)
    # Once caught up, the projection lags by nothing.
    await eventually(
        lambda: _no_lag(pipeline["query"], "layerlog_projection_lag_records"), timeout=15
    )


async def _no_lag(url: str, name: str) -> None:
    now = await scrape(url)
    assert all(v == 0 for (found, _), v in now.items() if found == name), now


def test_a_taken_port_is_logged_and_the_service_goes_on(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="services.core.metrics"):
            stop = metrics.serve(f"127.0.0.1:{port}", "upload-worker")
        stop()  # a no-op, and safe to call
    assert f"cannot serve metrics on 127.0.0.1:{port}" in caplog.text


def test_serve_answers_and_stop_frees_the_port():
    port = free_port()
    stop = metrics.serve(f"127.0.0.1:{port}", "verifier")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        stop()
    assert "# TYPE layerlog_chunk_append_seconds histogram" in text
    assert "layerlog_ingested_bytes_total" in text
    assert "_created" not in text  # disabled: noise for every scrape
    with pytest.raises(OSError):  # nothing listens after stop()
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def exported_names() -> set[str]:
    """Every sample name the services can export, from the metric definitions themselves."""
    import services.query.http  # noqa: F401  (registers the HTTP metrics)

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("layerlog_")
        for suffix in suffixes.get(family.type, [""])
    }


def test_the_dashboard_only_uses_metrics_the_services_export():
    dashboard = json.loads((ROOT / "deploy/grafana/layerlog-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"layerlog_[a-z_]+", expr)}
    exported = exported_names()
    assert used <= exported, used - exported
    # Each thing the issue asks to see is on the dashboard.
    for wanted in (
        "layerlog_ingested_bytes_total",
        "layerlog_ingested_chunks_total",
        "layerlog_chunk_append_seconds_bucket",
        "layerlog_verification_seconds_bucket",
        "layerlog_verification_failures_total",
        "layerlog_consumer_lag_records",
        "layerlog_projection_lag_records",
        "layerlog_http_requests_total",
    ):
        assert wanted in used, wanted


def test_the_scrape_config_targets_the_default_listen_addresses():
    config = (ROOT / "deploy/prometheus.yml").read_text()
    defaults = Settings()
    targets = re.findall(r'targets: \["([^"]+)"\]', config)
    assert sorted(targets) == sorted(
        [
            defaults.worker_metrics_listen,
            defaults.verifier_metrics_listen,
            defaults.query_listen,
            defaults.gc_metrics_listen,
        ]
    )
