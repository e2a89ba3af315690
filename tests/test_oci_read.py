"""The OCI read routes of the query service, fed by repository events on the real events topic:
manifests, tags, catalog, referrers, mounted and unlinked blobs, command outcomes, and an index
that a replay rebuilds the same (or as of a cut: what a tag pointed to then)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from services.core.codec import CODEC, MAGIC
from services.core.objectstore import ObjectStore
from services.core.records import (
    BlobMounted,
    BlobUnlinked,
    LayerCommitted,
    RepositoryCommandRejected,
    new_id,
    now,
)
from services.core.settings import Settings
from services.oci.manifest import OCI_INDEX, OCI_MANIFEST
from services.query.index import Index
from services.query.replay import cut_offsets
from services.verifier.service import linked
from tests.conftest import own_topics, run_cli
from tests.registry_events import (
    EventWriter,
    digest_of,
    eventually,
    image_manifest,
    query_service,
    repository_event,
    unique_repository,
)

REPOSITORY_TABLES = ("manifests", "tags", "blob_links", "outcomes", "layers")


@pytest.fixture(scope="module")
async def settings(settings: Settings) -> AsyncIterator[Settings]:
    """This module writes events and commands straight onto the log: its own topics, so that no
    other module's worker applies them and no other module's reader meets its odd records."""
    async with own_topics(settings, "oci-read") as own:
        yield own


@pytest.fixture(scope="module")
def store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings)


@pytest.fixture(scope="module")
async def query(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    """A query service of this module's own, with its own index file."""
    folder = tmp_path_factory.mktemp("oci-read")
    async with query_service(settings, folder / "query.log", index=folder / "index.sqlite") as q:
        yield q


@pytest.fixture()
async def http(query: Settings) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=query.query_url) as session:
        yield session


@pytest.fixture()
async def writer(settings: Settings) -> AsyncIterator[EventWriter]:
    async with EventWriter(settings) as events:
        yield events


async def status_of(http: aiohttp.ClientSession, path: str) -> int:
    async with http.get(path) as response:
        await response.read()
        return response.status


async def until_status(http: aiohttp.ClientSession, path: str, status: int) -> None:
    async def answered() -> bool:
        return await status_of(http, path) == status

    await eventually(answered, f"GET {path} answers {status}")


async def raw_get(query: Settings, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET path exactly as written, over a fresh connection; the status, headers and body."""
    host, port = query.query_host_port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


async def oci_error(response: aiohttp.ClientResponse) -> str:
    body = await response.json()
    (only,) = body["errors"]
    assert set(only) >= {"code", "message", "detail"}
    return only["code"]


async def test_the_base_route_says_it_speaks_registry_v2(http):
    async with http.get("/v2/") as response:
        assert response.status == 200
        assert await response.json() == {}
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_a_manifest_is_served_by_tag_and_by_digest_byte_for_byte(http, writer):
    name = unique_repository("oci/app")
    body = image_manifest("by tag and digest")
    digest = await writer.manifest(name, body, tag="v1")
    await until_status(http, f"/v2/{name}/manifests/v1", 200)
    for reference in ("v1", digest):
        async with http.get(f"/v2/{name}/manifests/{reference}") as response:
            assert response.status == 200
            assert await response.read() == body
            assert response.headers["Content-Type"] == OCI_MANIFEST
            assert response.headers["Content-Length"] == str(len(body))
            assert response.headers["Docker-Content-Digest"] == digest
        async with http.head(f"/v2/{name}/manifests/{reference}") as response:
            assert response.status == 200
            assert await response.read() == b""
            assert response.headers["Content-Length"] == str(len(body))
            assert response.headers["Content-Type"] == OCI_MANIFEST
            assert response.headers["Docker-Content-Digest"] == digest


async def test_a_sha512_reference_answers_with_the_sha512_digest(http, writer):
    name = unique_repository("oci/sha512")
    body = image_manifest("pushed by its sha512 digest")
    digest = await writer.manifest(name, body, algorithm="sha512")
    assert digest.startswith("sha512:")
    await until_status(http, f"/v2/{name}/manifests/{digest}", 200)
    async with http.get(f"/v2/{name}/manifests/{digest}") as response:
        assert response.headers["Docker-Content-Digest"] == digest
        assert await response.read() == body
    # The same bytes were not stored under their sha256: that is another manifest, unknown.
    async with http.get(f"/v2/{name}/manifests/{digest_of(body)}") as response:
        assert response.status == 404
        assert await oci_error(response) == "MANIFEST_UNKNOWN"


async def test_moving_a_tag_serves_the_new_manifest(http, writer):
    name = unique_repository("oci/moving")
    first = await writer.manifest(name, image_manifest("first"), tag="latest")
    second_body = image_manifest("second")
    second = await writer.manifest(name, second_body, tag="latest", previous=first)

    async def moved() -> bool:
        async with http.head(f"/v2/{name}/manifests/latest") as response:
            return response.headers.get("Docker-Content-Digest") == second

    await eventually(moved, "latest points at the second manifest")
    async with http.get(f"/v2/{name}/manifests/latest") as response:
        assert await response.read() == second_body
    # The first is still there by digest: moving a tag deletes nothing.
    assert await status_of(http, f"/v2/{name}/manifests/{first}") == 200


async def test_bad_references_and_names_get_oci_errors_never_a_500(http, writer, query):
    name = unique_repository("oci/bad")
    await writer.manifest(name, image_manifest("bad input"), tag="ok")
    await until_status(http, f"/v2/{name}/manifests/ok", 200)
    cases = {
        f"/v2/{name}/manifests/nope": (404, "MANIFEST_UNKNOWN"),
        f"/v2/{name}/manifests/{digest_of(b'never stored')}": (404, "MANIFEST_UNKNOWN"),
        f"/v2/{name}/manifests/sha256:abc": (400, "DIGEST_INVALID"),
        f"/v2/{name}/manifests/sha256:{'A' * 64}": (400, "DIGEST_INVALID"),
        f"/v2/{name}/manifests/md5:{'0' * 32}": (400, "DIGEST_INVALID"),
        f"/v2/{name}/manifests/{'x' * 200}:{'0' * 64}": (400, "DIGEST_INVALID"),
        f"/v2/{name}/manifests/-dash": (400, "MANIFEST_INVALID"),
        f"/v2/{name}/manifests/{'t' * 129}": (400, "MANIFEST_INVALID"),
        "/v2/Upper/Case/manifests/latest": (400, "NAME_INVALID"),
        "/v2/a/../../etc/manifests/passwd": (400, "NAME_INVALID"),
        "/v2/a%2Fb%2F..%2Fc/manifests/latest": (400, "NAME_INVALID"),
        f"/v2/{'a' * 300}/manifests/latest": (400, "NAME_INVALID"),
        f"/v2/{name}/referrers/sha256:short": (400, "DIGEST_INVALID"),
        f"/v2/{name}/referrers/sha1:{'0' * 40}": (400, "DIGEST_INVALID"),
        f"/v2/{name}/tags/list?n=-1": (400, "PAGINATION_NUMBER_INVALID"),
        f"/v2/{name}/tags/list?n=ten": (400, "PAGINATION_NUMBER_INVALID"),
        "/v2/_catalog?n=1e3": (400, "PAGINATION_NUMBER_INVALID"),
        "/v2/never/pushed/tags/list": (404, "NAME_UNKNOWN"),
    }
    for path, (status, code) in cases.items():
        # Sent as raw bytes: a client library would normalise the '..' and the escapes away.
        answered, headers, body = await raw_get(query, path)
        assert answered == status, (path, body)
        (error,) = json.loads(body)["errors"]
        assert error["code"] == code, path
        assert headers["docker-distribution-api-version"] == "registry/2.0"
    # aiohttp's own refusals under /v2/ carry the spec's body too.
    async with http.post(f"/v2/{name}/tags/list") as response:
        assert response.status == 405
        assert await oci_error(response) == "UNSUPPORTED"


async def test_tags_list_in_lexical_order_with_pagination(http, writer):
    name = unique_repository("oci/tags")
    body = image_manifest("tagged many times")
    tags = ["v10", "v2", "latest", "V1", "_under", "a.b-c"]
    digest = await writer.manifest(name, body)
    for tag in tags:
        await writer.move(name, tag, digest, None, new_id())
    expected = sorted(tags)  # byte order: capitals before lowercase, as the spec asks

    async def all_tagged() -> bool:
        async with http.get(f"/v2/{name}/tags/list") as response:
            return response.status == 200 and (await response.json())["tags"] == expected

    await eventually(all_tagged, "every tag listed")
    async with http.get(f"/v2/{name}/tags/list") as response:
        assert await response.json() == {"name": name, "tags": expected}
        assert "Link" not in response.headers
    # Pages of two, following the Link header to the end.
    seen: list[str] = []
    path: str | None = f"/v2/{name}/tags/list?n=2"
    pages = 0
    while path is not None:
        async with http.get(path) as response:
            assert response.status == 200
            page = (await response.json())["tags"]
            seen += page
            link = response.headers.get("Link")
        pages += 1
        if link is None:
            path = None
        else:
            assert link.endswith('>; rel="next"') and link.startswith(f"</v2/{name}/tags/list?")
            assert "n=2" in link
            path = link[1 : link.index(">")]
    assert seen == expected and pages == 3
    async with http.get(f"/v2/{name}/tags/list", params={"n": "10", "last": "latest"}) as response:
        assert (await response.json())["tags"] == expected[expected.index("latest") + 1 :]
    async with http.get(f"/v2/{name}/tags/list?n=0") as response:
        assert await response.json() == {"name": name, "tags": []}
    async with http.get(f"/v2/{name}/tags/list?n=1000000000") as response:
        assert response.status == 200 and (await response.json())["tags"] == expected
    async with http.get(f"/v2/{name}/tags/list?n={'9' * 5000}") as response:
        assert response.status == 200 and (await response.json())["tags"] == expected


async def test_the_catalog_lists_repositories_with_pagination(http, writer):
    prefix = unique_repository("oci/catalog")
    names = [f"{prefix}/{part}" for part in ("b", "a", "c/d")]
    for name in names:
        await writer.manifest(name, image_manifest(name))
    await until_status(http, f"/v2/{names[-1]}/tags/list", 200)
    for name in names:
        await until_status(http, f"/v2/{name}/tags/list", 200)  # known, though untagged
    async with http.get("/v2/_catalog") as response:
        listed = (await response.json())["repositories"]
    assert listed == sorted(listed)
    assert [n for n in listed if n.startswith(prefix)] == sorted(names)
    async with http.get("/v2/_catalog", params={"n": "2", "last": prefix}) as response:
        assert (await response.json())["repositories"] == sorted(names)[:2]
        link = response.headers["Link"]
    assert link.startswith("</v2/_catalog?n=2&last=") and link.endswith('>; rel="next"')
    async with http.get(link[1 : link.index(">")]) as response:
        assert (await response.json())["repositories"][0] == sorted(names)[2]
    async with http.get("/v2/_catalog?n=0") as response:
        assert await response.json() == {"repositories": []}


async def test_referrers_list_the_manifests_whose_subject_is_the_digest(http, writer):
    name = unique_repository("oci/referrers")
    subject_body = image_manifest("the image")
    subject = await writer.manifest(name, subject_body, tag="latest")
    signature = image_manifest(
        "a signature",
        subject=(subject, len(subject_body)),
        artifact_type="application/vnd.example.signature",
        annotations={"org.example.signed-by": "test"},
    )
    sbom = image_manifest("an sbom", subject=(subject, len(subject_body)))  # artifactType: config's
    signed = await writer.manifest(name, signature, subject=subject)
    sbom_digest = await writer.manifest(name, sbom, subject=subject)
    path = f"/v2/{name}/referrers/{subject}"

    async def both() -> bool:
        async with http.get(path) as response:
            return len((await response.json())["manifests"]) == 2

    await eventually(both, "both referrers listed")
    async with http.get(path) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == OCI_INDEX
        assert "OCI-Filters-Applied" not in response.headers
        index = await response.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    by_digest = {m["digest"]: m for m in index["manifests"]}
    assert by_digest[signed] == {
        "mediaType": OCI_MANIFEST,
        "digest": signed,
        "size": len(signature),
        "artifactType": "application/vnd.example.signature",
        "annotations": {"org.example.signed-by": "test"},
    }
    assert by_digest[sbom_digest] == {
        "mediaType": OCI_MANIFEST,
        "digest": sbom_digest,
        "size": len(sbom),
        "artifactType": "application/vnd.oci.image.config.v1+json",
    }
    params = {"artifactType": "application/vnd.example.signature"}
    async with http.get(path, params=params) as response:
        assert response.headers["OCI-Filters-Applied"] == "artifactType"
        assert [m["digest"] for m in (await response.json())["manifests"]] == [signed]
    # A subject nobody refers to (or that was never pushed) has an empty list, not a 404.
    async with http.get(f"/v2/{name}/referrers/{digest_of(b'nothing')}") as response:
        assert response.status == 200 and (await response.json())["manifests"] == []
    # Deleting the signature takes it out of the referrers; its subject stays.
    await writer.delete_manifest(name, signed, [])

    async def one() -> bool:
        async with http.get(path) as response:
            return [m["digest"] for m in (await response.json())["manifests"]] == [sbom_digest]

    await eventually(one, "the deleted referrer is gone")
    assert await status_of(http, f"/v2/{name}/manifests/latest") == 200


async def test_deleting_a_manifest_removes_it_and_its_tags(http, writer):
    name = unique_repository("oci/delete")
    keep = await writer.manifest(name, image_manifest("kept"), tag="keep")
    digest = await writer.manifest(name, image_manifest("deleted"), tag="a")
    await writer.move(name, "b", digest, None, new_id())
    await until_status(http, f"/v2/{name}/manifests/b", 200)
    await writer.delete_manifest(name, digest, ["a", "b"])
    await until_status(http, f"/v2/{name}/manifests/{digest}", 404)
    for reference in ("a", "b", digest):
        async with http.get(f"/v2/{name}/manifests/{reference}") as response:
            assert response.status == 404
            assert await oci_error(response) == "MANIFEST_UNKNOWN"
    async with http.get(f"/v2/{name}/tags/list") as response:
        assert (await response.json())["tags"] == ["keep"]
    assert await status_of(http, f"/v2/{name}/manifests/{keep}") == 200


async def test_mounted_blobs_are_served_and_unlinked_ones_are_not(
    http, writer, store: ObjectStore, settings: Settings
):
    source, target = unique_repository("oci/source"), unique_repository("oci/target")
    data = b"a blob in two repositories " * 1000
    digest = digest_of(data)
    key = f"blobs/test/{new_id()}"
    await store.put(key, data)
    # Pushed to source (LayerCommitted, keyed by its upload id), mounted into target.
    upload_id = new_id()
    await writer.raw(
        upload_id,
        CODEC.encode(
            LayerCommitted(
                event_id=new_id(),
                upload_id=upload_id,
                repository=source,
                caused_by=None,
                digest=digest,
                size=len(data),
                object_key=key,
                committed_at=now(),
                blob_sha256=digest.removeprefix("sha256:"),
            )
        ),
    )
    mounted = dict(digest=digest, source_repository=source, size=len(data), object_key=key)
    sha = digest.removeprefix("sha256:")
    await writer.events(repository_event(BlobMounted, target, new_id(), **mounted, blob_sha256=sha))
    for name in (source, target):
        await until_status(http, f"/v2/{name}/blobs/{digest}", 200)
        async with http.get(f"/v2/{name}/blobs/{digest}") as response:
            assert await response.read() == data
        async with http.head(f"/v2/{name}/blobs/{digest}") as response:
            assert response.headers["Content-Length"] == str(len(data))
            assert response.headers["Docker-Content-Digest"] == digest
    # Unlinking from the source (where it was pushed) leaves the target's link alone.
    await writer.events(repository_event(BlobUnlinked, source, new_id(), digest=digest))
    await until_status(http, f"/v2/{source}/blobs/{digest}", 404)
    async with http.get(f"/v2/{source}/blobs/{digest}") as response:
        assert await oci_error(response) == "BLOB_UNKNOWN"
    assert await status_of(http, f"/v2/{target}/blobs/{digest}") == 200
    await writer.events(repository_event(BlobUnlinked, target, new_id(), digest=digest))
    await until_status(http, f"/v2/{target}/blobs/{digest}", 404)
    async with http.get("/v2/_catalog", params={"n": "10000"}) as response:
        listed = (await response.json())["repositories"]
    assert source not in listed and target not in listed


async def test_outcomes_say_what_each_command_did(http, writer, query: Settings):
    name = unique_repository("oci/outcomes")
    put = new_id()
    await writer.manifest(name, image_manifest("outcome"), tag="t", command_id=put)
    refused = new_id()
    refusal = dict(command_type="DeleteManifest", reason="MANIFEST_UNKNOWN", detail="no such")
    await writer.events(repository_event(RepositoryCommandRejected, name, refused, **refusal))
    await until_status(http, f"/v2/{name}/manifests/t", 200)
    index = Index(query.index_path)

    async def known() -> bool:
        return await asyncio.to_thread(index.outcome, refused) is not None

    await eventually(known, "the rejection is projected")
    applied = await asyncio.to_thread(index.outcome, put)
    assert applied is not None and applied.applied
    assert applied.kinds == ("ManifestStored", "TagMoved")
    rejected = await asyncio.to_thread(index.outcome, refused)
    assert rejected is not None and not rejected.applied
    assert (rejected.command_type, rejected.reason, rejected.detail) == (
        "DeleteManifest",
        "MANIFEST_UNKNOWN",
        "no such",
    )
    assert await asyncio.to_thread(index.outcome, new_id()) is None


async def test_records_the_projection_does_not_know_are_skipped(http, writer):
    name = unique_repository("oci/unknown")
    # A record of a schema this version has never seen, and bytes that are no record at all.
    await writer.raw(name, MAGIC + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x00" * 20)
    await writer.raw(name, b"not avro")
    await writer.manifest(name, image_manifest("after the unknown"), tag="after")
    await until_status(http, f"/v2/{name}/manifests/after", 200)


async def test_replay_rebuilds_the_same_index(
    settings: Settings, query: Settings, http, writer, cli_env, capsys, tmp_path: Path
):
    name = unique_repository("oci/replay")
    first = await writer.manifest(name, image_manifest("replayed one"), tag="latest")
    await writer.manifest(name, image_manifest("replayed two"), tag="latest", previous=first)
    await writer.delete_manifest(name, first, [])
    await until_status(http, f"/v2/{name}/manifests/{first}", 404)
    live_rows, replayed_rows = await live_and_replayed(settings, query, capsys, tmp_path)
    assert live_rows.keys() == replayed_rows.keys()
    for table in REPOSITORY_TABLES:
        assert live_rows[table] == replayed_rows[table], table
    assert any(row[0] == name for row in live_rows["manifests"])


async def live_and_replayed(
    settings: Settings, query: Settings, capsys, tmp_path: Path
) -> tuple[dict[str, list[tuple[object, ...]]], dict[str, list[tuple[object, ...]]]]:
    """The live index's repository tables once it holds the whole log, and a replay's of it."""
    cut = await cut_offsets(settings)
    live = Index(query.index_path)

    async def caught_up() -> bool:
        stored = await asyncio.to_thread(live.offsets, settings.events_topic)
        return all(stored.get(p, 0) >= o for p, o in cut.items())

    await eventually(caught_up, "the live index reaches the cut")
    until = [f"--until={p}:{o}" for p, o in sorted(cut.items())]
    out = tmp_path / "replayed.sqlite"
    status, _, err = await run_cli(capsys, "replay", *until, "--out", str(out))
    assert status == 0, err
    return await asyncio.to_thread(_tables, Path(query.index_path)), await asyncio.to_thread(
        _tables, out
    )


async def push(
    writer: EventWriter, repository: str, data: bytes, object_key: str, at: datetime
) -> None:
    """A blob's commit as the verifier publishes it, stamped `at` by the verifier's clock: the
    LayerCommitted keyed by its upload, the BlobLinked keyed by the repository."""
    upload_id = new_id()
    digest = digest_of(data)
    committed = LayerCommitted(
        event_id=new_id(),
        upload_id=upload_id,
        repository=repository,
        caused_by=new_id(),
        occurred_at=at,
        digest=digest,
        size=len(data),
        object_key=object_key,
        committed_at=at,
        blob_sha256=digest,
    )
    await writer.raw(upload_id, CODEC.encode(committed))
    await writer.events(linked(committed))


async def test_blob_links_follow_the_log_not_the_clocks(
    settings: Settings,
    query: Settings,
    http,
    writer,
    store: ObjectStore,
    cli_env,
    capsys,
    tmp_path: Path,
):
    data = b"linked, unlinked, linked again " * 500
    digest = digest_of(data)
    key = f"blobs/test/{new_id()}"
    await store.put(key, data)
    base = now()
    relinked, unlinked = unique_repository("oci/relinked"), unique_repository("oci/unlinked")
    # Pushed, unlinked by a worker whose clock is 10 s ahead, pushed again by the verifier,
    # whose clock is right: the log says linked, though the unlink's time is the later.
    await push(writer, relinked, data, key, base)
    late = base + timedelta(seconds=10)
    await writer.events(
        repository_event(BlobUnlinked, relinked, new_id(), digest=digest, occurred_at=late)
    )
    await push(writer, relinked, data, key, base + timedelta(seconds=5))
    # Pushed by a verifier whose clock is 20 s ahead, then unlinked: gone, though the commit's
    # time is the later.
    await push(writer, unlinked, data, key, base + timedelta(seconds=20))
    await writer.events(
        repository_event(BlobUnlinked, unlinked, new_id(), digest=digest, occurred_at=late)
    )
    live_rows, replayed_rows = await live_and_replayed(settings, query, capsys, tmp_path)
    assert await status_of(http, f"/v2/{relinked}/blobs/{digest}") == 200
    assert await status_of(http, f"/v2/{unlinked}/blobs/{digest}") == 404
    # Links are decided inside the repository's partition: the replay, which reads the
    # partitions in another interleaving, agrees row for row.
    assert live_rows["blob_links"] == replayed_rows["blob_links"]
    assert {row[:3] for row in live_rows["blob_links"] if row[0] in (relinked, unlinked)} == {
        (relinked, digest, 1),
        (unlinked, digest, 0),
    }


async def test_a_replay_until_a_time_serves_what_a_tag_pointed_to_then(
    settings: Settings, http, writer, cli_env, capsys, tmp_path: Path
):
    name = unique_repository("oci/travel")
    then_body = image_manifest("latest at three o'clock")
    then = await writer.manifest(name, then_body, tag="latest")
    await until_status(http, f"/v2/{name}/manifests/latest", 200)
    await asyncio.sleep(0.05)  # the log's timestamps are milliseconds: keep the two apart
    moment = datetime.now(UTC)
    await asyncio.sleep(0.05)
    later_body = image_manifest("latest after three")
    later = await writer.manifest(name, later_body, tag="latest", previous=then)
    await writer.move(name, "new", later, None, new_id())
    out = tmp_path / "as-of.sqlite"
    status, stdout, err = await run_cli(
        capsys, "replay", "--until", moment.isoformat(), "--out", str(out), "--json"
    )
    assert status == 0, err
    report = json.loads(stdout)
    assert report["manifests"] >= 1 and report["tags"] >= 1
    async with query_service(
        settings, tmp_path / "read-only.log", index=out, read_only=True
    ) as served:
        async with aiohttp.ClientSession(base_url=served.query_url) as then_http:
            async with then_http.get(f"/v2/{name}/manifests/latest") as response:
                assert response.status == 200
                assert response.headers["Docker-Content-Digest"] == then
                assert await response.read() == then_body
            async with then_http.get(f"/v2/{name}/manifests/{later}") as response:
                assert response.status == 404
            async with then_http.get(f"/v2/{name}/tags/list") as response:
                assert (await response.json())["tags"] == ["latest"]

    # The live service has moved on.
    async def moved_on() -> bool:
        async with http.head(f"/v2/{name}/manifests/latest") as response:
            return response.headers.get("Docker-Content-Digest") == later

    await eventually(moved_on, "the live index has the later latest")


def _tables(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the tables the repository events fill, in key order (rowids aside)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = {}
        for table in REPOSITORY_TABLES:
            columns = [c[1] for c in db.execute(f"PRAGMA table_info({table})")]
            listed = ", ".join(columns)
            rows[table] = db.execute(f"SELECT {listed} FROM {table} ORDER BY {listed}").fetchall()
        return rows
    finally:
        db.close()
