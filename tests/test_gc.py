"""The garbage collector on the real stack: what no repository links goes, with a BlobReclaimed
first; what something links stays; every index stops serving a reclaimed copy (404
BLOB_UNKNOWN); the grace period keeps; `layerlog gc --dry-run` lists and changes nothing;
manifests too, a PUT that races the delete getting its copy back; the audit explains each
absence; indexes equal a replay (a forged reclaim: tests/test_audit.py). The race of a push
against a sweep is tests/test_gc_race.py's."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from services.audit.verify import verify_log
from services.client import LayerError
from services.core.checkpoints import Step
from services.core.codec import CODEC
from services.core.kafka import connection
from services.core.layout import blob_pointer_key, manifest_key
from services.core.objectstore import ObjectNotFound
from services.core.principals import Principal
from services.core.records import (
    GARBAGE_COLLECTOR,
    BlobReclaimed,
    PointerFate,
    ReclaimReason,
    at_ms,
    derived_id,
)
from services.gc.plan import KeptReason, Kind
from services.oci.manifest import OCI_MANIFEST
from tests.conftest import run_cli, settings_env
from tests.faults.audit import assert_index_matches_replay
from tests.gc_stack import GcStack, gc_stack, sha256
from tests.repository_log import image_blobs, image_manifest

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
async def stack(settings, tmp_path_factory) -> GcStack:
    async with gc_stack(settings, tmp_path_factory.mktemp("gc"), "gc") as running:
        yield running


@pytest.fixture()
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def exists(stack: GcStack, key: str) -> bool:
    try:
        await stack.store.stat(key)
        return True
    except ObjectNotFound:
        return False


async def committed_copy(stack: GcStack, repository: str, digest: str) -> str:
    await stack.caught_up()
    row = stack.index.blob(repository, digest)
    assert row is not None, (repository, digest)
    return row.object_key


async def audit_clean(stack: GcStack) -> None:
    report = await verify_log(stack.settings)
    assert report.breaks == [], "\n".join(map(str, report.breaks))


async def test_an_unlinked_blob_is_reclaimed_and_no_index_serves_it(stack, http, tmp_path):
    data = os.urandom(20_000)
    digest = sha256(data)
    await stack.push("gc/lonely", data)
    key = await committed_copy(stack, "gc/lonely", digest)
    assert await exists(stack, key) and await exists(stack, blob_pointer_key(digest))
    await stack.unlink(http, "gc/lonely", digest)

    report = await stack.sweeper.sweep()
    reclaimed = [c for c in report.reclaimed if c.digest == digest]
    assert [(c.kind, c.object_key, c.size, c.reason, c.pointer) for c in reclaimed] == [
        (Kind.BLOB, key, len(data), ReclaimReason.UNLINKED, PointerFate.WITHDRAWN)
    ]
    assert not await exists(stack, key)
    assert not await exists(stack, blob_pointer_key(digest))
    # The log says why, and every index stops serving the copy.
    await stack.caught_up()
    (row,) = [r for r in stack.index.reclaims() if r.object_key == key]
    assert (row.kind, row.digest, row.reason) == ("blob", digest, "UNLINKED")
    status, body = await stack.registry_get(http, "gc/lonely", digest)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    async with http.get(f"{stack.settings.query_url}/v2/gc/lonely/blobs/{digest}") as answer:
        assert answer.status == 404
    # A second sweep has nothing more to do with it.
    again = await stack.sweeper.sweep()
    assert digest not in {c.digest for c in again.reclaimed}
    await audit_clean(stack)
    # Pushed again: a copy of its own, served as before.
    await stack.push("gc/lonely", data)
    assert await stack.fetch("gc/lonely", digest) == data
    assert await committed_copy(stack, "gc/lonely", digest) != key
    await audit_clean(stack)
    await assert_index_matches_replay(stack.settings, tmp_path)
    await assert_index_matches_replay(
        stack.settings, tmp_path, index_path=stack.settings.registry_index_path
    )
    await assert_index_matches_replay(
        stack.settings, tmp_path, index_path=stack.settings.gc_index_path
    )


async def test_a_blob_another_repository_links_stays(stack, http):
    data = os.urandom(10_000)
    digest = sha256(data)
    await stack.push("gc/kept-a", data)
    await stack.push("gc/kept-b", data)  # deduplicated onto a's copy
    key = await committed_copy(stack, "gc/kept-a", digest)
    assert await committed_copy(stack, "gc/kept-b", digest) == key
    await stack.unlink(http, "gc/kept-a", digest)
    report = await stack.sweeper.sweep()
    assert key not in {c.object_key for c in report.reclaimed}
    assert await stack.fetch("gc/kept-b", digest) == data
    assert await exists(stack, blob_pointer_key(digest))


async def test_the_grace_period_keeps_and_dry_run_changes_nothing(stack, http, capsys, monkeypatch):
    data = os.urandom(12_000)
    digest = sha256(data)
    await stack.push("gc/graced", data)
    key = await committed_copy(stack, "gc/graced", digest)
    await stack.unlink(http, "gc/graced", digest)
    for name, value in settings_env(stack.settings).items():
        if name.startswith("LAYERLOG_"):
            monkeypatch.setenv(name, value)

    monkeypatch.setenv("LAYERLOG_GC_GRACE_SECONDS", "3600")
    status, out, _ = await run_cli(capsys, "gc", "--dry-run", "--json")
    assert status == 0
    report = json.loads(out)
    (kept,) = [k for k in report["kept"] if k["object_key"] == key]
    assert kept["kept"] == KeptReason.GRACE and kept["size"] == len(data)
    assert key not in {c["object_key"] for c in report["would_reclaim"]}

    monkeypatch.setenv("LAYERLOG_GC_GRACE_SECONDS", "0")
    status, out, _ = await run_cli(capsys, "gc", "--dry-run", "--json")
    assert status == 0
    report = json.loads(out)
    (would,) = [c for c in report["would_reclaim"] if c["object_key"] == key]
    assert would["reason"] == "UNLINKED" and report["bytes"] >= len(data)
    assert report["dry_run"] is True
    assert await exists(stack, key) and await exists(stack, blob_pointer_key(digest))

    status, out, _ = await run_cli(capsys, "gc", "--dry-run")
    assert status == 0 and "would reclaim" in out and key in out

    status, out, _ = await run_cli(capsys, "gc", "--json")
    assert status == 0
    report = json.loads(out)
    assert key in {c["object_key"] for c in report["reclaimed"]}
    assert not await exists(stack, key)
    await audit_clean(stack)


async def push_image(stack: GcStack, http: aiohttp.ClientSession, repository: str, seed: str):
    for blob in image_blobs(seed):
        await stack.registry_push(http, repository, blob)
    body = image_manifest(seed)
    await put_manifest(stack, http, repository, body)
    return body


async def put_manifest(stack, http, repository: str, body: bytes) -> None:
    url = f"{stack.registry_url}/v2/{repository}/manifests/{sha256(body)}"
    headers = {"Content-Type": OCI_MANIFEST}
    async with http.put(url, data=body, headers=headers) as answer:
        assert answer.status == 201, (answer.status, await answer.text())


async def delete_manifest(stack, http, repository: str, digest: str) -> None:
    async with http.delete(f"{stack.registry_url}/v2/{repository}/manifests/{digest}") as answer:
        assert answer.status == 202, (answer.status, await answer.text())


async def test_a_deleted_manifest_is_reclaimed(stack, http):
    body = await push_image(stack, http, "gc/manifests", "deleted")
    digest = sha256(body)
    assert await exists(stack, manifest_key(digest))
    await delete_manifest(stack, http, "gc/manifests", digest)
    report = await stack.sweeper.sweep()
    (reclaimed,) = [c for c in report.reclaimed if c.digest == digest]
    assert (reclaimed.kind, reclaimed.reason, reclaimed.size) == (
        Kind.MANIFEST,
        ReclaimReason.UNSTORED,
        len(body),
    )
    assert not await exists(stack, manifest_key(digest))
    await audit_clean(stack)


async def test_a_manifest_put_racing_the_delete_gets_its_copy_back(stack, http):
    body = await push_image(stack, http, "gc/manifests-race", "raced")
    digest = sha256(body)
    await delete_manifest(stack, http, "gc/manifests-race", digest)
    plan = await stack.sweeper.mark()
    await stack.sweeper.withdraw(plan)
    await stack.sweeper.check(plan)
    assert digest in {c.digest for c in plan.candidates}
    # After the check, before the delete: the PUT's hold and copy come in, unseen by the check.
    await put_manifest(stack, http, "gc/manifests-race", body)
    report = await stack.sweeper.reclaim(plan)
    assert digest in {c.digest for c in report.reclaimed}
    assert digest in report.restored
    assert await stack.store.get(manifest_key(digest)) == body
    async with http.get(f"{stack.registry_url}/v2/gc/manifests-race/manifests/{digest}") as got:
        assert got.status == 200 and await got.read() == body
    await audit_clean(stack)


# A replayed verdict whose copy is gone anyway. The collector never takes a held copy, so this is
# an operator deleting bytes under a running registry: the audit reports the loss, and the push
# being verified must not be linked to nothing. A stack of its own: its log keeps that break.


@pytest.fixture(scope="module")
async def damaged(settings, tmp_path_factory) -> GcStack:
    async with gc_stack(settings, tmp_path_factory.mktemp("gc-damaged"), "gcdamaged") as running:
        yield running


async def verdict_replayed_after_removal(stack: GcStack, step, label: str):
    """Pushes known bytes (deduplicated onto the first push's copy), kills the verifier at
    `step`, removes that copy out of band, starts the verifier again; returns the digest, the
    removed copy, the bytes and the second push's outcome (None, or the error it raised)."""
    data = os.urandom(15_000)
    digest = sha256(data)
    await stack.push(f"gc/{label}-first", data)
    first = await committed_copy(stack, f"gc/{label}-first", digest)
    pause = stack.pauses.arm(step, digest)
    second = asyncio.create_task(stack.push(f"gc/{label}-second", data))
    await pause.wait_reached()
    await stack.kill("verifier")
    await stack.store.delete(first)
    stack.start("verifier")
    outcome = (await asyncio.gather(second, return_exceptions=True))[0]
    return digest, first, data, outcome


async def test_a_replay_falls_back_to_its_own_copy_when_the_first_is_gone(damaged):
    digest, first, data, outcome = await verdict_replayed_after_removal(
        damaged, Step.VERIFIER_VERDICT_STORED, "fallback"
    )
    assert not isinstance(outcome, BaseException), outcome
    own = await committed_copy(damaged, "gc/fallback-second", digest)
    assert own != first
    assert await damaged.fetch("gc/fallback-second", digest) == data
    assert (await damaged.store.get(own)) == data
    # The one break is the removal itself, on the first push's commit; the second is sound.
    report = await verify_log(damaged.settings)
    (removal,) = report.breaks
    assert removal.event == "LayerCommitted" and first in removal.problem


async def test_a_replay_fails_the_upload_rather_than_link_nothing(damaged):
    digest, _, _, outcome = await verdict_replayed_after_removal(
        damaged, Step.VERIFIER_DECIDED, "nothing"
    )
    assert isinstance(outcome, LayerError), outcome
    await damaged.caught_up()
    assert damaged.index.blob("gc/nothing-second", digest) is None
    failed = [
        row
        for (upload_id,) in damaged.index._connection().execute(
            "SELECT upload_id FROM uploads WHERE repository = 'gc/nothing-second'"
        )
        if (row := damaged.index.upload(upload_id)) is not None
    ]
    assert [(r.state, r.reason) for r in failed] == [("failed", "MISSING_DATA")]


async def test_a_forged_reclaim_of_a_linked_blob_deletes_nothing(damaged):
    # The sweep finishes reclaims its ledger has not (a sweeper stopped between publishing and
    # deleting); one written into the log out of band for a blob a repository links is not
    # one to finish: the bytes stay, and the audit reports the event.
    data = os.urandom(8_000)
    digest = sha256(data)
    await damaged.push("gc/forged", data)
    key = await committed_copy(damaged, "gc/forged", digest)
    cut = str(await damaged.sweeper.follower.catch_up())
    forged = BlobReclaimed(
        event_id=derived_id(key, "BlobReclaimed"),
        digest=digest,
        object_key=key,
        size=len(data),
        reason=ReclaimReason.UNLINKED,
        idle_since=at_ms(0),
        grace_seconds=0,
        sweep_id="forged",
        marked_at=cut,
        checked_at=cut,
        blob_sha256=digest,
        pointer=PointerFate.ABSENT,
        actor=GARBAGE_COLLECTOR,
    )
    producer = AIOKafkaProducer(**connection(damaged.settings, Principal.ADMIN))
    await producer.start()
    try:
        await producer.send_and_wait(
            damaged.settings.events_topic, CODEC.encode(forged), key=digest.encode()
        )
    finally:
        await producer.stop()
    report = await damaged.sweeper.sweep()
    assert key not in {c.object_key for c in report.reclaimed}
    assert await damaged.store.get(key) == data
    audit = await verify_log(damaged.settings, repository="gc/forged")
    assert [b.event for b in audit.breaks] == ["BlobReclaimed"]
