"""Manifest PUT and DELETE on the registry: every check made before a command is sent.

Most are refused before PutManifest is produced; the ones at the bottom go end to end through
the upload worker and the registry's own projection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from services.oci.manifest import MAX_DESCRIPTORS, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = b'{"architecture":"amd64","os":"linux"}'
LAYER = b"a layer's bytes"
NAME = "manifests/app"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


def image(config: bytes = CONFIG, layers: tuple[bytes, ...] = (LAYER,), **extra: object) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(CONFIG_TYPE, config),
            "layers": [descriptor(LAYER_TYPE, layer) for layer in layers],
            **extra,
        }
    ).encode()


@pytest.fixture()
def http(registry_http: aiohttp.ClientSession) -> aiohttp.ClientSession:
    return registry_http


@pytest.fixture(scope="module")
async def pushed(registry) -> None:
    """The config and layer, committed in NAME only."""
    async with aiohttp.ClientSession(base_url=registry.settings.registry_url) as http:
        for data in (CONFIG, LAYER):
            url = f"/v2/{NAME}/blobs/uploads/"
            async with http.post(url, params={"digest": sha256(data)}, data=data) as response:
                assert response.status == 201, await response.text()


async def put(
    http: aiohttp.ClientSession,
    reference: str,
    body: bytes,
    content_type: str | None = OCI_MANIFEST,
    name: str = NAME,
) -> tuple[int, dict[str, object], aiohttp.typedefs.LooseHeaders]:
    headers = {"Content-Type": content_type} if content_type else {}
    async with http.put(f"/v2/{name}/manifests/{reference}", data=body, headers=headers) as r:
        body_json = await r.json() if r.status >= 400 else {}
        return r.status, body_json, r.headers


def error_of(body: dict[str, object]) -> dict[str, object]:
    (error,) = body["errors"]  # type: ignore[misc]
    return error


@pytest.mark.parametrize(
    ("body", "content_type", "why"),
    [
        (b"{not json", OCI_MANIFEST, "not JSON"),
        (b"[1, 2]", OCI_MANIFEST, "JSON object"),
        (image(), OCI_INDEX, "does not match"),
        (image(), "application/x-anything", "does not match"),
        (json.dumps({"schemaVersion": 2, "layers": []}).encode(), None, "media type"),
        (image().replace(b'"schemaVersion": 2', b'"schemaVersion": 1'), OCI_MANIFEST, "schema"),
        (image().replace(b'"size": 15', b'"size": -1'), OCI_MANIFEST, "size"),
        (image().replace(b"sha256:", b"md5:", 1), OCI_MANIFEST, "digest"),
        (b"[" * 100_000 + b"]" * 100_000, OCI_MANIFEST, "nests"),
    ],
)
async def test_invalid_manifests_are_manifest_invalid(http, pushed, body, content_type, why):
    status, answer, _ = await put(http, "latest", body, content_type)
    assert status == 400
    error = error_of(answer)
    assert error["code"] == "MANIFEST_INVALID"
    assert why.lower() in str(error["message"]).lower()


async def test_too_many_descriptors(http, pushed):
    body = image(layers=tuple(b"%d" % i for i in range(MAX_DESCRIPTORS + 1)))
    assert len(body) < MAX_MANIFEST_BYTES
    status, answer, _ = await put(http, "many", body)
    assert status == 400
    assert error_of(answer)["code"] == "MANIFEST_INVALID"


async def test_100000_layers_is_too_big_to_read(http, pushed):
    body = image(layers=tuple(b"%d" % i for i in range(100_000)))
    status, answer, _ = await put(http, "huge", body)
    assert status == 413
    assert error_of(answer)["code"] == "MANIFEST_INVALID"


async def test_a_streamed_body_past_4_mib_is_413(http, pushed):
    async def endless() -> AsyncIterator[bytes]:
        # No Content-Length: the registry must stop reading after 4 MiB + 1 byte.
        for _ in range(64):
            yield b" " * (1 << 20)
            await asyncio.sleep(0)

    headers = {"Content-Type": OCI_MANIFEST}
    async with http.put(f"/v2/{NAME}/manifests/big", data=endless(), headers=headers) as r:
        assert r.status == 413
        assert error_of(await r.json())["code"] == "MANIFEST_INVALID"


@pytest.mark.parametrize(
    "reference",
    [
        "sha256:" + "0" * 64,  # well formed, not the body's digest
        "md5:" + "0" * 32,
        "sha256:short",
        "sha256:" + "A" * 64,
        "sha512:" + hashlib.sha256(image()).hexdigest(),  # a sha256 hex under sha512's name
    ],
)
async def test_digest_references_must_be_the_bodys(http, pushed, reference):
    status, answer, _ = await put(http, reference, image())
    assert status == 400
    assert error_of(answer)["code"] == "DIGEST_INVALID"


async def test_a_sha512_reference_is_checked_with_sha512(http, pushed):
    body = image(layers=(b"not pushed",))
    reference = "sha512:" + hashlib.sha512(body).hexdigest()
    status, answer, _ = await put(http, reference, body)
    # Past the digest check: refused only for the layer it names.
    assert status == 400
    assert error_of(answer)["code"] == "MANIFEST_BLOB_UNKNOWN"


@pytest.mark.parametrize("tag", [".hidden", "-dash", "a" * 129, "with%20space", "t@g"])
async def test_tags_outside_the_grammar(http, pushed, tag):
    status, answer, _ = await put(http, tag, image())
    assert status == 400
    assert error_of(answer)["code"] == "MANIFEST_INVALID"


async def test_bad_repository_name(http):
    status, answer, _ = await put(http, "latest", image(), name="Upper/Case")
    assert status == 400
    assert error_of(answer)["code"] == "NAME_INVALID"


async def test_every_blob_must_be_in_the_repository(http, pushed):
    missing_config = image(config=b'{"other": "config"}')
    status, answer, _ = await put(http, "v1", missing_config)
    assert status == 400
    error = error_of(answer)
    assert error["code"] == "MANIFEST_BLOB_UNKNOWN"
    assert error["detail"] == {"digest": sha256(b'{"other": "config"}')}
    missing_layer = image(layers=(LAYER, b"second layer"))
    status, answer, _ = await put(http, "v1", missing_layer)
    assert error_of(answer)["detail"] == {"digest": sha256(b"second layer")}
    # Committed in NAME, but manifests of another repository may not borrow them.
    status, answer, _ = await put(http, "v1", image(), name="manifests/elsewhere")
    assert status == 400
    assert error_of(answer)["code"] == "MANIFEST_BLOB_UNKNOWN"


async def test_deletes_refuse_bad_references(http):
    async with http.delete(f"/v2/{NAME}/manifests/md5:{'0' * 32}") as response:
        assert response.status == 400
        assert error_of(await response.json())["code"] == "DIGEST_INVALID"
    async with http.delete(f"/v2/{NAME}/manifests/.no-such-tag") as response:
        assert response.status == 404
        assert error_of(await response.json())["code"] == "MANIFEST_UNKNOWN"


# End to end: these need pieces 1 and 2 (the repository worker and the read side's tables).


async def test_put_by_tag_then_delete(http, pushed):
    subject = sha256(b"some subject")
    body = image(subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": 12})
    status, _, headers = await put(http, "release", body)
    assert status == 201
    assert headers["Docker-Content-Digest"] == sha256(body)
    assert headers["Location"] == f"/v2/{NAME}/manifests/{sha256(body)}"
    assert headers["OCI-Subject"] == subject
    async with http.delete(f"/v2/{NAME}/manifests/release") as response:
        assert response.status == 202
    async with http.delete(f"/v2/{NAME}/manifests/release") as response:
        assert response.status == 404
    async with http.delete(f"/v2/{NAME}/manifests/{sha256(body)}") as response:
        assert response.status == 202
    async with http.delete(f"/v2/{NAME}/manifests/{sha256(body)}") as response:
        assert response.status == 404


async def test_two_clients_move_one_tag_at_once(http, pushed):
    first, second = image(annotations={"n": "1"}), image(annotations={"n": "2"})
    answers = await asyncio.gather(put(http, "race", first), put(http, "race", second))
    assert [status for status, _, _ in answers] == [201, 201]


async def test_an_index_names_only_stored_manifests(http, pushed):
    child = image()
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [descriptor(OCI_MANIFEST, child)],
        }
    ).encode()
    status, answer, _ = await put(http, "multi", body, OCI_INDEX)
    assert status == 400
    assert error_of(answer)["detail"] == {"digest": sha256(child)}
    assert (await put(http, sha256(child), child))[0] == 201
    assert (await put(http, "multi", body, OCI_INDEX))[0] == 201
