"""`layerlog gc-service` sweeping once a second, with no grace period, while pushes (SDK and
registry), pulls and deletes go on: nothing stops or fails, nothing linked is lost, and the
service reclaims what the deletes leave. Digests are pushed again after their delete on purpose,
so pushes race the service's sweeps as they will in production, unscripted."""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from dataclasses import replace

import aiohttp
import pytest

from services.audit.verify import verify_log
from services.client import LayerUnknown
from tests.conftest import ServiceProcess, free_port
from tests.faults.audit import assert_index_matches_replay
from tests.gc_stack import GcStack, gc_stack, sha256, until

pytestmark = pytest.mark.timeout(900)

WORKLOAD_SECONDS = 25.0
WRITERS = 3


@pytest.fixture(scope="module")
async def stack(settings, tmp_path_factory) -> GcStack:
    async with gc_stack(settings, tmp_path_factory.mktemp("gc-service"), "gcservice") as running:
        yield running


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") + r" (\S+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


async def test_sweeps_run_while_pushes_and_pulls_go_on(stack, tmp_path):
    service_settings = replace(
        stack.settings,
        gc_interval_seconds=1,
        gc_grace_seconds=0,
        gc_index_path=str(tmp_path / "service-gc-index.sqlite"),
        gc_metrics_listen=f"127.0.0.1:{free_port()}",
    )
    service = ServiceProcess("gc-service", service_settings, tmp_path).start()
    metrics_url = f"http://{service_settings.gc_metrics_listen}/metrics"
    async with aiohttp.ClientSession() as http:

        async def scrape() -> str:
            try:
                async with http.get(metrics_url) as answer:
                    return await answer.text()
            except aiohttp.ClientError:
                return ""

        async def sweeping() -> bool:
            return metric(await scrape(), "layerlog_gc_sweeps_total", outcome="done") >= 1

        try:
            await until(sweeping, timeout=60, what="the service's first sweep")
            before = await scrape()
            linked: dict[tuple[str, str], bytes] = {}
            deleted: list[bytes] = []  # bytes whose digest nothing links now
            unlinks: dict[tuple[str, str], int] = {}  # how often each was unlinked
            done = {"pushes": 0, "registry pushes": 0, "pulls": 0, "deletes": 0, "again": 0}
            deadline = time.monotonic() + WORKLOAD_SECONDS

            async def writer(number: int) -> None:
                rng = random.Random(number)
                step = 0
                while time.monotonic() < deadline:
                    step += 1
                    repository = f"svc/w{number}/r{step % 4}"
                    roll = rng.random()
                    if deleted and roll < 0.3:
                        data = deleted.pop(rng.randrange(len(deleted)))  # the race, unscripted
                        kind = "again"
                    else:
                        data = os.urandom(rng.randrange(1_000, 40_000))
                        kind = "pushes"
                    if rng.random() < 0.5:
                        await stack.push(repository, data)
                    else:
                        await stack.registry_push(http, repository, data)
                        kind = "registry pushes" if kind == "pushes" else kind
                    linked[(repository, sha256(data))] = data
                    done[kind] += 1
                    if rng.random() < 0.4:
                        key = rng.choice(sorted(linked))
                        data = linked.pop(key)
                        unlinks[key] = unlinks.get(key, 0) + 1
                        await stack.unlink(http, *key)
                        if sha256(data) not in {d for _, d in linked}:
                            deleted.append(data)
                        done["deletes"] += 1

            async def reader() -> None:
                rng = random.Random(99)
                while time.monotonic() < deadline:
                    if not linked:
                        await asyncio.sleep(0.05)
                        continue
                    (repository, digest) = rng.choice(sorted(linked))
                    data = linked.get((repository, digest))
                    if data is None:
                        continue  # unlinked meanwhile
                    seen = unlinks.get((repository, digest), 0)
                    if rng.random() < 0.5:
                        try:
                            got = await stack.fetch(repository, digest)
                        except LayerUnknown:
                            if unlinks.get((repository, digest), 0) != seen:
                                continue  # unlinked while the pull was on its way
                            raise
                    else:
                        status, got = await stack.registry_get(http, repository, digest)
                        if unlinks.get((repository, digest), 0) != seen:
                            continue
                        assert status == 200, (repository, digest, status)
                    assert got == data, (repository, digest)
                    done["pulls"] += 1

            await asyncio.gather(*(writer(n) for n in range(WRITERS)), reader(), reader())
            # Let the service sweep what the last deletes left, then compare.
            sweeps = metric(await scrape(), "layerlog_gc_sweeps_total", outcome="done")

            async def swept_again() -> bool:
                text = await scrape()
                return metric(text, "layerlog_gc_sweeps_total", outcome="done") >= sweeps + 2

            await until(swept_again, timeout=60, what="two more sweeps")
            after = await scrape()
        finally:
            service.stop()
        print(f"\nworkload: {done}")

        reclaimed = metric(after, "layerlog_gc_reclaimed_total", kind="blob")
        swept = metric(after, "layerlog_gc_sweeps_total", outcome="done") - metric(
            before, "layerlog_gc_sweeps_total", outcome="done"
        )
        print(
            f"service: {swept:.0f} sweeps during the workload, {reclaimed:.0f} blob copies "
            f"({metric(after, 'layerlog_gc_reclaimed_bytes_total', kind='blob'):.0f} bytes) "
            f"reclaimed, kept by a racing link "
            f"{metric(after, 'layerlog_gc_kept_total', kind='blob', reason='racing_link'):.0f}, "
            f"by a hold {metric(after, 'layerlog_gc_kept_total', kind='blob', reason='hold'):.0f}"
            f", failed sweeps {metric(after, 'layerlog_gc_sweeps_total', outcome='failed'):.0f}"
        )
        assert swept >= 5
        assert done["deletes"] > 0 and done["pulls"] > 0 and done["again"] > 0
        assert reclaimed > 0
        assert metric(after, "layerlog_gc_reclaimed_bytes_total", kind="blob") > 0
        assert metric(after, "layerlog_gc_sweeps_total", outcome="failed") == 0
        # Everything still linked is served, byte for byte; what the deletes left is gone.
        await stack.caught_up()
        for (repository, digest), data in sorted(linked.items()):
            assert await stack.fetch(repository, digest) == data, (repository, digest)
        for row in stack.index.reclaims():
            assert row.object_key not in {
                stack.index.blob(r, d).object_key for r, d in stack.linked()
            }
    report = await verify_log(stack.settings)
    assert report.breaks == [], "\n".join(map(str, report.breaks))
    assert report.reclaims >= reclaimed
    await assert_index_matches_replay(stack.settings, tmp_path)
    await assert_index_matches_replay(
        stack.settings, tmp_path, index_path=service_settings.gc_index_path
    )
