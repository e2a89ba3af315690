"""Read replicas behind one address (LAYERLOG_REUSE_PORT): two query and two registry processes,
each projecting the log itself, answer the same questions alike; a replica started empty takes
no connection until it has caught up with the log as it was when it started."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from services.core.settings import Settings
from services.oci.manifest import OCI_MANIFEST
from tests.conftest import ServiceProcess, free_port, own_topics
from tests.replicas import (
    readiness,
    replica,
    requests_answered,
    status_url,
    tail,
    wait_ready,
)
from tests.synthetic_log import SyntheticLog

pytestmark = pytest.mark.usefixtures("stack_services")

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
ROUNDS = 40  # new connections per question: both replicas get some unless the kernel is unfair


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stop_all(services: list[ServiceProcess]) -> None:
    for service in services:
        service.stop()


async def answer(http: aiohttp.ClientSession, method: str, path: str) -> tuple[object, ...]:
    """What an answer says, without what differs per request (request id, date)."""
    async with http.request(method, path) as response:
        body = await response.read()
        headers = response.headers
        return (
            method,
            path,
            response.status,
            headers.get("Content-Type"),
            headers.get("Content-Length"),
            headers.get("Docker-Content-Digest"),
            hashlib.sha256(body).hexdigest(),
        )


async def ask_on_new_connections(url: str, questions: list[tuple[str, str]]) -> set[tuple]:
    """Each question ROUNDS times, every time on a new connection; the distinct answers."""
    seen: set[tuple] = set()
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection per request
    async with aiohttp.ClientSession(base_url=url, connector=connector) as http:
        for _ in range(ROUNDS):
            for method, path in questions:
                seen.add(await answer(http, method, path))
    return seen


async def push_image(url: str, name: str) -> dict[str, str]:
    """A config, a layer and a manifest tagged v1, through the registry at url."""
    layer = uuid.uuid4().bytes * 4096
    config = json.dumps({"architecture": "amd64", "os": "linux", "run": uuid.uuid4().hex}).encode()
    async with aiohttp.ClientSession(base_url=url) as http:
        for blob in (config, layer):
            async with http.post(
                f"/v2/{name}/blobs/uploads/", params={"digest": sha256(blob)}, data=blob
            ) as response:
                assert response.status == 201, await response.text()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config), "size": len(config)},
                "layers": [{"mediaType": LAYER_TYPE, "digest": sha256(layer), "size": len(layer)}],
            }
        ).encode()
        async with http.put(
            f"/v2/{name}/manifests/v1", data=manifest, headers={"Content-Type": OCI_MANIFEST}
        ) as response:
            assert response.status == 201, await response.text()
    return {"layer": sha256(layer), "config": sha256(config), "manifest": sha256(manifest)}


@pytest.fixture(scope="module")
async def shared(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, object]]:
    """Two registry replicas on one port and two query replicas on another, all ready, and an
    image pushed through the registries' shared address."""
    logs = tmp_path_factory.mktemp("read-replicas")
    ports = {"registry": free_port(), "query": free_port()}
    services = [
        replica(kind, settings, logs, label, port=ports[kind])
        for kind in ("registry", "query")
        for label in ("a", "b")
    ]
    try:
        for service in services:
            service.start()
        for service in services:
            await wait_ready(service)
        urls = {kind: f"http://127.0.0.1:{port}" for kind, port in ports.items()}
        name = f"replicas/{uuid.uuid4().hex[:8]}"
        digests = await push_image(urls["registry"], name)
        yield {"services": services, "urls": urls, "name": name, "digests": digests}
    finally:
        stop_all(services)


def questions(name: str, digests: dict[str, str]) -> list[tuple[str, str]]:
    """Exists and Fetch of a blob, one that is not there, the manifest by tag and by digest,
    and the tag list."""
    return [
        ("HEAD", f"/v2/{name}/blobs/{digests['layer']}"),
        ("GET", f"/v2/{name}/blobs/{digests['layer']}"),
        ("HEAD", f"/v2/{name}/blobs/sha256:{'0' * 64}"),
        ("GET", f"/v2/{name}/manifests/v1"),
        ("HEAD", f"/v2/{name}/manifests/{digests['manifest']}"),
        ("GET", f"/v2/{name}/tags/list"),
    ]


@pytest.mark.parametrize("kind", ["registry", "query"])
async def test_both_replicas_answer_on_the_shared_port_and_alike(shared, kind):
    services = [s for s in shared["services"] if s.name == kind]
    before = [await requests_answered(s) for s in services]
    asked = questions(shared["name"], shared["digests"])
    seen = await ask_on_new_connections(shared["urls"][kind], asked)
    # One answer per question, whichever replica the kernel gave each connection to.
    assert len(seen) == len(asked), sorted(seen)
    by_question = {(method, path): status for method, path, status, *_ in seen}
    assert [by_question[q] for q in asked] == [200, 200, 404, 200, 200, 200]
    after = [await requests_answered(s) for s in services]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == ROUNDS * len(asked)
    assert all(count > 0 for count in served), f"one replica took every connection: {served}"


async def test_the_query_and_registry_replicas_give_the_same_answers(shared):
    asked = questions(shared["name"], shared["digests"])
    registry = await ask_on_new_connections(shared["urls"]["registry"], asked)
    query = await ask_on_new_connections(shared["urls"]["query"], asked)
    assert registry == query


@pytest.fixture(scope="module")
async def long_log(settings: Settings) -> AsyncIterator[tuple[Settings, SyntheticLog]]:
    """Topics of their own holding 160,000 events: seconds of catch-up for a new replica."""
    async with own_topics(settings, "catch-up") as own:
        synthetic = SyntheticLog(own, uuid.uuid4().hex[:8])
        await synthetic.write(range(40_000))
        yield own, synthetic


async def test_a_replica_takes_no_connection_until_it_has_caught_up(long_log, tmp_path):
    own, synthetic = long_log
    port = free_port()
    first = replica("query", own, tmp_path, "first", port=port)
    second = replica("query", own, tmp_path, "second", port=port)
    layer = synthetic.layer(39_999)  # the last one written
    path = f"/v2/{layer.repository}/blobs/{layer.digest}"
    try:
        first.start()
        await wait_ready(first)
        second.start()
        behind: list[int] = []
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession() as status,
            aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector) as http,
        ):
            while True:
                assert second.alive(), tail(second)
                try:
                    code, body = await readiness(status, second)
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)  # its status address is not up yet
                    continue
                if code == 200:
                    break
                assert code == 503 and body["status"] in ("starting", "restoring", "catching_up")
                if body["behind"] is not None:
                    behind.append(body["behind"])
                # Meanwhile the shared port answers, and only the first replica does.
                async with http.head(path) as response:
                    assert response.status == 200
                assert await requests_answered(second) == 0
                async with status.get(status_url(second) + "/healthz") as response:
                    assert response.status == 200  # alive: /healthz is liveness, as before
                await asyncio.sleep(0.1)
            assert body["behind"] == 0 and body["status"] == "ready"
            assert all(body["positions"][p] >= o for p, o in body["start_offsets"].items())
            # It said how far it had to go, and that only shrank.
            assert behind and behind[0] > 0, "never seen catching up: the log is too short"
            assert behind == sorted(behind, reverse=True)
            # Ready, it listens on the shared port too, and the kernel gives it connections.
            for _ in range(ROUNDS):
                async with http.head(path) as response:
                    assert response.status == 200
            assert await requests_answered(second) > 0
    finally:
        stop_all([first, second])


async def test_without_reuse_port_a_replica_answers_503_until_it_has_caught_up(
    long_log, tmp_path: Path
):
    own, synthetic = long_log
    alone = replica("query", own, tmp_path, "alone", port=free_port(), reuse_port=False)
    layer = synthetic.layer(0)
    url = alone.settings.query_url
    try:
        alone.start()
        refusals = 0
        async with aiohttp.ClientSession(url) as http:
            while True:
                assert alone.alive(), tail(alone)
                try:
                    async with http.get("/readyz") as response:
                        ready = response.status == 200
                        body = await response.json()
                    async with http.get("/healthz") as response:
                        assert response.status == 200  # alive all along: liveness, as before
                    async with http.get(f"/v2/{layer.repository}/blobs/{layer.digest}") as got:
                        answered, refusal = got.status, await got.read()
                        headers = got.headers
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)  # not listening yet
                    continue
                if ready:
                    break
                assert body["status"] != "ready"
                if answered == 503:
                    refusals += 1
                    error = json.loads(refusal)
                    assert headers["Retry-After"] == "1"
                    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
                    assert error["errors"][0]["code"] == "UNAVAILABLE"
                    assert error["error"] == "UNAVAILABLE"  # the SDK's field too
                    assert "not ready" in error["message"]
                else:
                    # Between the /readyz above and this request it became ready.
                    assert answered == 200
                await asyncio.sleep(0.1)
            assert refusals > 0, "never seen catching up: the log is too short"
            async with http.head(f"/v2/{layer.repository}/blobs/{layer.digest}") as response:
                assert response.status == 200
                assert response.headers["Content-Length"] == str(layer.size)
    finally:
        alone.stop()
