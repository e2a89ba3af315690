"""kill -9 of each service (the registry too) at random moments during 50 concurrent SDK uploads
and crane pushes: nothing lost, nothing committed twice, nothing left staged, every pushed image
pulls back byte for byte, every tag names its last successful push, and each index (the query
service's and the registry's) equals a replay of the log."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from services.client import LayerError, LayerInvalidDigest, LayerService
from tests.faults.audit import Outcomes, assert_consistent, assert_index_matches_replay
from tests.faults.pushes import (
    Pushes,
    assert_manifest_puts_applied_once,
    assert_pushes_pull_back,
    assert_tags_point_at_last_push,
    run_pushes,
    until_crane_runs,
    until_manifest_put_logged,
)
from tests.layers import random_gzip_layer, uneven_pieces

UPLOADS = 50
MIB = 1 << 20


async def run_uploads(settings, seed: int, outcomes: Outcomes, count: int = UPLOADS) -> None:
    rng = random.Random(seed)
    services = [
        LayerService(settings, chunk_size=size, finish_timeout=240)
        for size in (64 * 1024, 300 * 1024, MIB)
    ]
    for service in services:
        await service.start()
    limit = asyncio.Semaphore(count)

    async def one(number: int) -> None:
        async with limit:
            service = services[number % len(services)]
            data = await asyncio.to_thread(
                random_gzip_layer, seed * 1000 + number, rng.randint(MIB, 20 * MIB)
            )
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            upload = await service.upload(f"faults/app-{number % 7}")
            for piece in uneven_pieces(data, seed + number, 1000, 700_000):
                await upload.write(piece)
            if number % 10 == 3:
                await upload.cancel()
                outcomes.cancelled.add(upload.uuid)
            elif number % 10 == 7:
                with pytest.raises(LayerInvalidDigest):
                    await upload.finish(len(data), "sha256:" + "0" * 64)
                outcomes.failed.add(upload.uuid)
            else:
                layer = await upload.finish(len(data), digest)
                assert layer.size == len(data)
                outcomes.committed[upload.uuid] = (upload.name, digest, digest.split(":")[1])

    try:
        await asyncio.gather(*(one(n) for n in range(count)))
    finally:
        for service in services:
            await service.close()


@pytest.mark.timeout(900)
async def test_kill_9_each_service_during_concurrent_uploads_and_pushes(
    registry_pipeline, fault_settings, fault_store, tmp_path
):
    pipeline = registry_pipeline
    registry = pipeline["registry"]
    rng = random.Random(20261127)
    outcomes = Outcomes()
    pushes = Pushes(registry.settings.registry_listen)
    kills_done = asyncio.Event()
    uploads = asyncio.create_task(run_uploads(fault_settings, 7, outcomes))
    pushing = asyncio.create_task(run_pushes(pushes, tmp_path / "images", 11, kills_done))
    # Each service once during the SDK uploads and the pushes, then the registry, the newest
    # code, three times more during manifest PUTs (30-400 ms each here): once 20-400 ms into
    # one, twice once its PutManifest is on the log, unanswered. Whether the registry put the
    # command on the log, and whether the worker applied it, the tag must end where the last
    # successful push left it.
    schedule = ("upload-worker", "verifier", "query", "registry", *["registry"] * 3)
    killed: list[tuple[str, bool, int, int]] = []  # the service, uploads running, cranes
    # running, cranes sending a manifest PUT
    try:
        for number, name in enumerate(schedule):
            # A registry just restarted is answering again before the next kill: each kill
            # lands among pushes at work, not in the outage the last one made.
            await pipeline.wait_for_registry()
            if number < 4:
                await asyncio.sleep(rng.uniform(1.0, 5.0))
                await until_crane_runs(pushes)
            elif number == 4:
                await until_crane_runs(pushes, putting_manifest=True)
                await asyncio.sleep(rng.uniform(0.02, 0.4))
            else:
                await until_manifest_put_logged(fault_settings, pushes)
            if pushing.done():
                break
            pipeline[name].kill()
            killed.append((name, not uploads.done(), pushes.running, len(pushes.putting)))
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            pipeline[name].start()
    finally:
        # Pushes go on until the kills are over, so crane is mid-push at every kill.
        kills_done.set()
    try:
        await uploads
        await pushing
    except LayerError:
        print(pipeline.logs())
        raise
    print(f"kills (service, uploads running, cranes running, putting manifests): {killed}")
    print(f"{len(pushes.pushed)} pushes; attempts that failed:\n" + "\n".join(pushes.failures))
    print("manifest PUTs answered:\n" + "\n".join(pushes.answers))
    assert [kill[0] for kill in killed] == list(schedule), "pushes ended before the kills"
    assert all(kill[1] for kill in killed[:4]), f"uploads ended before the kills: {killed}"
    assert len(outcomes.committed) == 40 and len(outcomes.cancelled) == 5
    await assert_consistent(fault_settings, fault_store, outcomes, tmp_path)
    await pipeline.wait_for_registry()
    await assert_pushes_pull_back(pushes, tmp_path / "pulled")
    await assert_tags_point_at_last_push(pushes)
    puts = await assert_manifest_puts_applied_once(fault_settings, pushes)
    print(f"{puts} PutManifest commands for {len(pushes.pushed)} successful pushes")
    await assert_index_matches_replay(
        fault_settings, tmp_path, registry.settings.registry_index_path
    )
