"""Errors agree and say nothing internal (issue 11, defects 3 and 6; LayerService.close)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.client import (
    LayerInvalidDigest,
    LayerService,
    LayerTarSumVersionUnsupported,
)
from services.core.objectstore import ObjectStore
from services.query.http import QueryApi
from services.query.index import Index
from tests.conftest import ROOT, settings_env

HEX = "ab" * 32
# digest -> (SDK exception, HTTP error code)
BAD_DIGESTS = {
    f"tarsum.v9+sha256:{HEX}": (LayerTarSumVersionUnsupported, "TARSUM_VERSION_UNSUPPORTED"),
    "sha256:" + "zz" * 32: (LayerInvalidDigest, "DIGEST_INVALID"),
    "sha256:abc": (LayerInvalidDigest, "DIGEST_INVALID"),
    f"md5:{HEX[:32]}": (LayerInvalidDigest, "DIGEST_INVALID"),
}


@pytest.mark.usefixtures("stack_services")
@pytest.mark.parametrize("digest", list(BAD_DIGESTS))
async def test_a_bad_digest_fails_the_same_way_everywhere(settings, digest):
    expected, code = BAD_DIGESTS[digest]
    data = os.urandom(1000)
    async with LayerService(settings, finish_timeout=60) as service:
        upload = await service.upload("errors/digest")
        await upload.write(data)
        with pytest.raises(expected):
            await upload.finish(len(data), digest)
        with pytest.raises(expected):
            await service.exists("errors/digest", digest)
        with pytest.raises(expected):
            await service.fetch("errors/digest", digest)
    async with aiohttp.ClientSession() as http:
        for method in ("GET", "HEAD"):
            url = f"{settings.query_url}/v2/errors/digest/blobs/{digest}"
            async with http.request(method, url) as response:
                assert response.status == 400
                if method == "GET":
                    assert (await response.json())["error"] == code


@pytest.mark.usefixtures("stack_services")
@pytest.mark.parametrize("digest", list(BAD_DIGESTS))
def test_the_cli_fails_the_same_way_for_exists_and_push(settings, digest, tmp_path):
    layer = tmp_path / "layer.bin"
    layer.write_bytes(os.urandom(1000))
    outcomes = []
    for argv in (
        ["exists", "--repo", "errors/cli", "--json", digest],
        ["push", "--repo", "errors/cli", "--json", "--digest", digest, str(layer)],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", *argv],
            cwd=ROOT,
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=120,
        )
        outcomes.append((done.returncode, json.loads(done.stdout.splitlines()[-1])["error"]))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][1] == BAD_DIGESTS[digest][0].__name__


async def test_a_500_carries_the_request_id_and_no_internal_text(settings, tmp_path, caplog):
    index = Index(str(tmp_path / "index.sqlite"))

    def broken(upload_id: str) -> None:
        raise RuntimeError("secret-internal-detail /var/lib/layerlog")

    index.upload = broken  # type: ignore[method-assign]
    api = QueryApi(index, ObjectStore(settings), None)
    async with TestClient(TestServer(api.app())) as client:
        with caplog.at_level(logging.ERROR, logger="services.query.http"):
            response = await client.get(f"/uploads/{uuid.uuid4()}")
            text = await response.text()
    assert response.status == 500
    request_id = response.headers["X-Request-Id"]
    body = json.loads(text)
    assert body["error"] == "INTERNAL"
    assert body["request_id"] == request_id
    assert body["errors"] == [
        {"code": "UNKNOWN", "message": body["message"], "detail": {"request_id": request_id}}
    ]
    assert "secret" not in text and "RuntimeError" not in text
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert "secret-internal-detail" in str(logged[0].exc_info[1])


async def test_close_lets_go_of_the_http_session_when_the_producer_fails_to_stop(
    settings, monkeypatch
):
    service = LayerService(settings)
    await service.start()
    stop = service._producer.stop

    async def failing_stop() -> None:
        await stop()
        raise RuntimeError("the producer did not stop cleanly")

    monkeypatch.setattr(service._producer, "stop", failing_stop)
    with pytest.raises(RuntimeError):
        await service.close()
    assert service._http is not None and service._http.closed
