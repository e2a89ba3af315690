"""`audit verify` over repository events: each repository's hash chain, each ManifestStored's
body against its digest and against the copy in object storage."""

from __future__ import annotations

import asyncio
import sys
import uuid
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaProducer

from services.audit.verify import verify_log
from services.client import LayerService
from services.core.codec import CODEC, event_hash
from services.core.kafka import connection
from services.core.principals import Principal
from services.core.records import BlobLinked, DeleteTag, ManifestStored, MountBlob, TagMoved
from services.oci.manifest import OCI_MANIFEST
from tests.conftest import settings_env
from tests.repository_log import RepositoryLog, image_manifest, produce, put, sha256

pytestmark = pytest.mark.usefixtures("stack_services")


async def history(settings, repo: str, *, seed: str) -> RepositoryLog:
    """A repository with a blob mounted, two manifests, a tag moved twice and a rejection."""
    data = f"blob of {seed} ".encode() * 3000
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        upload = await service.upload(repo + "-src")
        await upload.write(data)
        await upload.finish(len(data), sha256(data))
    commands = [
        MountBlob(repository=repo, digest=sha256(data), source_repository=repo + "-src"),
        put(repo, "latest", image_manifest(f"{seed}-1")),
        DeleteTag(repository=repo, tag="absent"),
        put(repo, "latest", image_manifest(f"{seed}-2")),
    ]
    async with RepositoryLog(settings, [repo]) as log:
        await produce(settings, commands)
        await log.wait_for(6)
        return log


async def inject(settings, repo: str, *events: object) -> list[int]:
    """Writes events out of band (no transaction, no worker); returns their offsets."""
    producer = AIOKafkaProducer(**connection(settings, Principal.ADMIN))
    await producer.start()
    try:
        sent = [
            await producer.send_and_wait(settings.events_topic, CODEC.encode(e), key=repo.encode())
            for e in events
        ]
    finally:
        await producer.stop()
    return [metadata.offset for metadata in sent]


async def test_an_untouched_repository_verifies(settings):
    repo = f"audit/repo-{uuid.uuid4().hex[:8]}"
    log = await history(settings, repo, seed=repo)
    report = await verify_log(settings, repository=repo)
    assert report.breaks == []
    assert report.repositories == {repo} and report.uploads == set()
    assert report.events == len(log.of(repo)) == 6
    assert report.manifests == 2  # each ManifestStored's copy read back
    assert report.blobs == 1  # the mounted blob


async def test_a_changed_manifest_copy_is_reported(settings, store):
    repo = f"audit/copy-{uuid.uuid4().hex[:8]}"
    log = await history(settings, repo, seed=repo)
    stored = [e for e in log.raw(repo) if isinstance(e.record, ManifestStored)]
    victim = stored[1].record
    await store.put(victim.object_key, victim.body.replace(b"layer", b"LAYER"))
    breaks = (await verify_log(settings, repository=repo)).breaks
    assert [(b.offset, b.event, b.repository) for b in breaks] == [
        (stored[1].offset, "ManifestStored", repo)
    ]
    assert "differs" in breaks[0].problem
    await store.delete(victim.object_key)
    (missing,) = (await verify_log(settings, repository=repo)).breaks
    assert "missing" in missing.problem

    command = [sys.executable, "-m", "services.cli", "audit", "verify", "--repo", repo]
    done = await asyncio.create_subprocess_exec(
        *command, env=settings_env(settings), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await done.communicate()
    assert done.returncode == 1, out
    assert f"repository {repo} ManifestStored".encode() in out


async def test_forged_repository_events_break_the_chain(settings):
    repo = f"audit/forged-{uuid.uuid4().hex[:8]}"
    log = await history(settings, repo, seed=repo)
    genuine = log.raw(repo)
    stored = next(e.record for e in genuine if isinstance(e.record, ManifestStored))
    moved = next(e for e in genuine if isinstance(e.record, TagMoved))
    # A body swapped under the digest, linked where the genuine event was; a tag move that
    # starts a chain of its own; a tag move linked to the true head but pointing elsewhere
    # (chained correctly, so only the event after it shows the forgery).
    body = stored.body.replace(b"config", b"CONFIG")
    swapped = replace(stored, body=body, event_id="forged-1")
    restarted = replace(moved.record, prev_hash=None, event_id="forged-2")
    offsets = await inject(settings, repo, swapped, restarted)
    report = await verify_log(settings, repository=repo, check_blobs=False)
    assert [(b.offset, b.event) for b in report.breaks] == [
        (offsets[0], "ManifestStored"),
        (offsets[1], "TagMoved"),
    ]
    assert "body" in report.breaks[0].problem or "prev_hash" in report.breaks[0].problem
    assert "new chain" in report.breaks[1].problem

    # The worker's next event links to the last genuine one, past the forgeries.
    async with RepositoryLog(settings, [repo]) as more:
        await produce(settings, [put(repo, "later", image_manifest(f"{repo}-3"))])
        await more.wait_for(len(genuine) + 2 + 2)
    report = await verify_log(settings, repository=repo, check_blobs=False)
    assert [b.offset for b in report.breaks] == offsets


async def test_a_forged_body_with_its_own_digest_is_caught_by_the_next_event(settings):
    repo = f"audit/rehashed-{uuid.uuid4().hex[:8]}"
    log = await history(settings, repo, seed=repo)
    genuine = log.raw(repo)
    last = genuine[-1]
    body = image_manifest("planted")
    planted = ManifestStored(
        event_id="planted",
        repository=repo,
        caused_by=None,
        prev_hash=event_hash(last.raw),  # linked to the true head
        digest=sha256(body),
        media_type=OCI_MANIFEST,
        size=len(body),
        body=body,
        object_key="manifests/sha256/" + sha256(body).removeprefix("sha256:"),
        subject=None,
        artifact_type=None,
    )
    (offset,) = await inject(settings, repo, planted)
    # Well formed and linked, but no copy was ever stored under its key.
    (broken,) = (await verify_log(settings, repository=repo)).breaks
    assert (broken.offset, broken.event) == (offset, "ManifestStored")
    assert "missing" in broken.problem
    # And the worker's next event, linked to the genuine head, does not link to it.
    async with RepositoryLog(settings, [repo]) as more:
        await produce(settings, [DeleteTag(repository=repo, tag="latest")])
        events = await more.wait_for(len(genuine) + 2)
    report = await verify_log(settings, repository=repo, check_blobs=False)
    assert [(b.offset, b.event) for b in report.breaks] == [
        (more.raw(repo)[-1].offset, type(events[-1]).__name__)
    ]
    assert "prev_hash" in report.breaks[0].problem


async def test_a_blob_link_its_upload_did_not_commit_is_reported(settings):
    """BlobLinked is outside the repository's chain, so the chain cannot vouch for it: its
    upload's LayerCommitted must say the same repository, digest and object."""
    repo = f"audit/linked-{uuid.uuid4().hex[:8]}"
    data = f"pushed into {repo} ".encode() * 3000
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        upload = await service.upload(repo)
        await upload.write(data)
        await upload.finish(len(data), sha256(data))
    async with RepositoryLog(settings, [repo]) as log:
        (link,) = await log.wait_for(1, repo)
    assert isinstance(link, BlobLinked) and link.upload_id == upload.uuid
    assert link.prev_hash is None and link.digest == sha256(data)
    report = await verify_log(settings, repository=repo)
    assert report.breaks == [] and report.blobs == 1
    orphan = replace(link, event_id="forged-1", upload_id=str(uuid.uuid4()))
    elsewhere = replace(link, event_id="forged-2", object_key=f"blobs/{uuid.uuid4()}")
    # The genuine link said again in someone else's name: the push is not theirs.
    impostor = replace(link, actor="mallory")
    offsets = await inject(settings, repo, orphan, elsewhere, impostor)
    report = await verify_log(settings, repository=repo, check_blobs=False)
    assert [(b.offset, b.event, b.repository) for b in report.breaks] == [
        (offsets[0], "BlobLinked", repo),
        (offsets[1], "BlobLinked", repo),
        (offsets[2], "BlobLinked", repo),
    ]
    assert "no LayerCommitted" in report.breaks[0].problem
    assert "object_key" in report.breaks[1].problem
    assert "its actor" in report.breaks[2].problem
    # A copy of the genuine link, appended later (after an unlink, it would relink the blob),
    # and one with a made-up id.
    (copy_at, renamed_at) = await inject(settings, repo, link, replace(link, event_id="forged-3"))
    report = await verify_log(settings, repository=repo, check_blobs=False)
    problems = {b.offset: b.problem for b in report.breaks}
    assert "a copy of an earlier BlobLinked" in problems[copy_at]
    assert "event id" in problems[renamed_at]
