"""Broker faults on a three-node cluster (replication factor 3, min.insync.replicas 2) in the middle
of SDK uploads and crane pushes, with the checks the single-node fault tests end with: exactly
one verdict per finished upload, byte-identical blobs, nothing staged for cancelled or failed
uploads, every index equal to a replay, every pushed image pulled back byte for byte. A probe
beside them writes numbered records with the services' producer settings: no acknowledged write
may be missing afterwards, none may be there twice.

a. kill -9 of the broker that leads the most commands and events partitions, restarted;
b. two of the three brokers down for 20 s (no controller quorum, no in-sync majority);
c. a broker whose data directory is deleted, rejoining empty (`deploy/stack wipe`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from dataclasses import dataclass

import aiohttp
import pytest

from services.client import LayerError, LayerService
from tests.cluster.brokers import (
    BROKERS,
    AckedWrites,
    Cluster,
    PartitionState,
    all_in_sync,
    leading_broker,
    until_partitions,
)
from tests.faults.audit import Outcomes, assert_consistent, assert_index_matches_replay
from tests.faults.conftest import Pipeline
from tests.faults.pushes import (
    Pushes,
    assert_manifest_puts_applied_once,
    assert_pushes_pull_back,
    assert_tags_point_at_last_push,
    run_pushes,
    until_crane_runs,
)
from tests.faults.test_crashes import run_uploads
from tests.layers import random_gzip_layer

OUTAGE_SECONDS = 20
# What a client may be told when Kafka cannot take its write: the registry's spec error for it.
REGISTRY_UNAVAILABLE = "UNAVAILABLE"


@dataclass
class Running:
    """The SDK uploads and the crane pushes a fault lands in."""

    outcomes: Outcomes
    pushes: Pushes
    uploads: asyncio.Task[None]
    pushing: asyncio.Task[None]
    pushed_enough: asyncio.Event
    started: float

    async def finish(self) -> float:
        """Lets the pushes end, waits for both; returns how long the uploads took in all."""
        self.pushed_enough.set()
        await asyncio.wait_for(self.uploads, 600)
        done = time.monotonic() - self.started
        await asyncio.wait_for(self.pushing, 600)
        return done


async def start_traffic(pipeline: Pipeline, settings, tmp_path, seed: int, uploads: int) -> Running:
    outcomes = Outcomes()
    pushes = Pushes(pipeline["registry"].settings.registry_listen)
    pushed_enough = asyncio.Event()
    running = Running(
        outcomes,
        pushes,
        asyncio.create_task(run_uploads(settings, seed, outcomes, count=uploads)),
        asyncio.create_task(run_pushes(pushes, tmp_path / "images", seed + 1, pushed_enough)),
        pushed_enough,
        time.monotonic(),
    )
    # The fault lands mid-stream: uploads writing chunks, a crane push at work.
    await asyncio.sleep(3)
    await until_crane_runs(pushes)
    assert not running.uploads.done(), "the uploads finished before the fault"
    return running


def assert_clear_push_failures(pushes: Pushes) -> None:
    """A push the fault broke was told so in the spec's terms, never with a server error."""
    for failure in pushes.failures:
        assert "500 Internal Server Error" not in failure and "UNKNOWN" not in failure, failure
        assert "Traceback" not in failure, failure


async def assert_everything_holds(
    pipeline: Pipeline,
    settings,
    store,
    running: Running,
    probe: AckedWrites,
    tmp_path,
    report: dict[str, object],
) -> None:
    registry = pipeline["registry"]
    for name, service in pipeline.services.items():
        assert service.alive(), f"{name} died during the fault"
    await probe.stop()
    report["acked_writes"] = await probe.assert_none_lost()
    report["write_stall_seconds"] = round(probe.longest_wait(), 1)
    report["probe_send_failures"] = len(probe.failures)
    report["pushes"] = len(running.pushes.pushed)
    report["push_attempts_failed"] = running.pushes.failures
    assert_clear_push_failures(running.pushes)
    await assert_consistent(settings, store, running.outcomes, tmp_path)
    await pipeline.wait_for_registry()
    await assert_pushes_pull_back(running.pushes, tmp_path / "pulled")
    await assert_tags_point_at_last_push(running.pushes)
    report["manifest_puts"] = await assert_manifest_puts_applied_once(settings, running.pushes)
    await assert_index_matches_replay(settings, tmp_path, registry.settings.registry_index_path)
    report["committed"] = len(running.outcomes.committed)


def led_elsewhere(gone: set[int]):
    """Every partition has a leader, and none of them is a broker in `gone`."""

    def check(states: dict[tuple[str, int], PartitionState]) -> bool:
        return all(s.leader >= 0 and s.leader not in gone for s in states.values())

    return check


@pytest.mark.timeout(1200)
async def test_kill_9_of_the_broker_leading_commands_and_events(
    cluster: Cluster,
    registry_pipeline: Pipeline,
    fault_settings,
    fault_store,
    acked_writes: AckedWrites,
    fault_report: dict[str, object],
    tmp_path,
):
    settings = fault_settings
    running = await start_traffic(registry_pipeline, settings, tmp_path, 41, uploads=30)
    leader, led = await leading_broker(settings)
    fault_report["killed"] = f"kafka-{leader}, leading {led}"
    killed_at = time.monotonic()
    await cluster.run("kill", f"kafka-{leader}")
    topics = [settings.commands_topic, settings.events_topic]
    fault_report["new_leaders_seconds"] = round(
        await until_partitions(settings, led_elsewhere({leader}), "new leaders", topics=topics), 1
    )
    # The uploads and pushes go on against two nodes for a while (min.insync.replicas=2).
    await asyncio.sleep(max(0.0, 15 - (time.monotonic() - killed_at)))
    assert not running.uploads.done(), "the uploads finished while the broker was down"
    await cluster.run("start", f"kafka-{leader}")
    fault_report["down_seconds"] = round(time.monotonic() - killed_at, 1)
    fault_report["in_sync_again_seconds"] = round(
        await until_partitions(settings, all_in_sync, "every partition in sync again"), 1
    )
    fault_report["uploads_seconds"] = round(await running.finish(), 1)
    await assert_everything_holds(
        registry_pipeline, settings, fault_store, running, acked_writes, tmp_path, fault_report
    )
    assert fault_report["committed"] == 24


@dataclass
class Call:
    """One client call made while the cluster had lost its majority."""

    what: str
    ok: bool
    finished: float  # time.monotonic() when it returned or raised
    said: str  # the error's text, or the answer's status


async def sdk_upload_during_outage(settings, finish_timeout: float, seed: int) -> Call:
    """A whole small upload, started while Kafka has no majority."""
    data = await asyncio.to_thread(random_gzip_layer, seed, 300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    what = f"SDK upload (finish_timeout={finish_timeout:.0f}s)"
    try:
        async with LayerService(settings, finish_timeout=finish_timeout) as service:
            upload = await service.upload("faults/outage")
            await upload.write(data)
            layer = await upload.finish(len(data), digest)
            assert layer.size == len(data)
            return Call(what, True, time.monotonic(), "committed")
    except LayerError as error:
        return Call(what, False, time.monotonic(), f"{type(error).__name__}: {error}")


async def registry_upload_during_outage(registry_url: str) -> Call:
    """POST of a blob upload (which puts a StartUpload on the log) while Kafka has no majority."""
    what = "registry POST /v2/<name>/blobs/uploads/"
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(f"{registry_url}/v2/faults/outage/blobs/uploads/") as response:
            body = await response.text()
            if response.status == 202:
                return Call(what, True, time.monotonic(), "202")
            return Call(what, False, time.monotonic(), f"{response.status} {body}")


def assert_clear(call: Call, recovered_at: float) -> None:
    """A call either succeeded once the brokers were back, or failed saying so plainly."""
    if call.ok:
        assert call.finished >= recovered_at, f"{call.what} succeeded without a majority"
        return
    assert "Traceback" not in call.said and 'File "' not in call.said, call.said
    if call.what.startswith("registry"):
        status, _, body = call.said.partition(" ")
        assert status == "503", call.said
        (error,) = json.loads(body)["errors"]
        assert error["code"] == REGISTRY_UNAVAILABLE and error["message"], call.said
    else:
        # The SDK's own error, one line that says what did not happen: Kafka did not take the
        # commands in time, or no verdict came in time (the pipeline catching up afterwards).
        assert call.said.startswith("Layer") and "\n" not in call.said, call.said


@pytest.mark.timeout(1200)
async def test_two_of_three_brokers_down_for_20_seconds(
    cluster: Cluster,
    registry_pipeline: Pipeline,
    fault_settings,
    fault_store,
    acked_writes: AckedWrites,
    fault_report: dict[str, object],
    tmp_path,
):
    settings = fault_settings
    registry_url = registry_pipeline["registry"].settings.registry_url
    running = await start_traffic(registry_pipeline, settings, tmp_path, 51, uploads=20)
    leader, _ = await leading_broker(settings)
    down = [leader, next(n for n in range(1, BROKERS + 1) if n != leader)]
    fault_report["killed"] = [f"kafka-{n}" for n in down]
    killed_at = time.monotonic()
    await asyncio.gather(*(cluster.run("kill", f"kafka-{n}") for n in down))
    await asyncio.sleep(1)
    calls = asyncio.gather(
        sdk_upload_during_outage(settings, 3, 5101),
        sdk_upload_during_outage(settings, 180, 5102),
        registry_upload_during_outage(registry_url),
    )
    await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - killed_at)))
    assert not running.uploads.done(), "the uploads finished during the outage"
    restarting_at = time.monotonic()
    await asyncio.gather(*(cluster.run("start", f"kafka-{n}") for n in down))
    fault_report["down_seconds"] = round(time.monotonic() - killed_at, 1)
    fault_report["in_sync_again_seconds"] = round(
        await until_partitions(settings, all_in_sync, "every partition in sync again"), 1
    )
    first_ack = acked_writes.first_ack_after(restarting_at)
    assert first_ack is not None, "no write was acknowledged after the brokers came back"
    fault_report["writes_again_seconds_after_restart"] = round(first_ack - restarting_at, 1)
    answered = await asyncio.wait_for(calls, 300)
    fault_report["calls_during_outage"] = [
        {
            "call": c.what,
            "ok": c.ok,
            "answered_seconds_after_restart": round(c.finished - restarting_at, 1),
            "said": c.said[:300],
        }
        for c in answered
    ]
    for call in answered:
        assert_clear(call, restarting_at)
    # The SDK keeps to its finish_timeout, though Kafka's client would wait for the majority
    # without end: the short call fails while the brokers are still down, saying why; the
    # patient one waits them out and commits.
    short, patient, _ = answered
    assert not short.ok and "Kafka" in short.said and "try again once Kafka is back" in short.said
    assert short.finished < restarting_at, short
    assert patient.ok, patient
    # Nothing written while Kafka had no majority was acknowledged: the probe's acknowledgements
    # stop at the kill (give or take the requests already on their way) and resume after.
    stalled = [w for _, w in acked_writes.acked if killed_at + 2 < w < restarting_at]
    assert not stalled, f"{len(stalled)} writes acknowledged without a majority"
    fault_report["uploads_seconds"] = round(await running.finish(), 1)
    await assert_everything_holds(
        registry_pipeline, settings, fault_store, running, acked_writes, tmp_path, fault_report
    )
    assert fault_report["committed"] == 16


@pytest.mark.timeout(1200)
async def test_a_broker_whose_data_is_deleted_rejoins_empty_and_catches_up(
    cluster: Cluster,
    registry_pipeline: Pipeline,
    fault_settings,
    fault_store,
    acked_writes: AckedWrites,
    fault_report: dict[str, object],
    tmp_path,
):
    settings = fault_settings
    running = await start_traffic(registry_pipeline, settings, tmp_path, 61, uploads=20)
    victim, led = await leading_broker(settings)
    fault_report["wiped"] = f"kafka-{victim}, leading {led}"
    killed_at = time.monotonic()
    await cluster.run("kill", f"kafka-{victim}")
    # The disk is gone: nothing of the node's log, its metadata log, its meta.properties.
    await asyncio.to_thread(shutil.rmtree, cluster.data_dir(victim))
    said = await cluster.run("wipe", f"kafka-{victim}")
    assert f"kafka-{victim} is a voter of the controller quorum again" in said, said
    fault_report["rejoined_quorum_seconds"] = round(time.monotonic() - killed_at, 1)

    def caught_up(states: dict[tuple[str, int], PartitionState]) -> bool:
        return all(victim in s.isr for s in states.values() if victim in s.replicas)

    catching_up_from = time.monotonic()
    await until_partitions(settings, caught_up, f"kafka-{victim} in sync everywhere", 300)
    fault_report["in_sync_again_seconds_after_wipe"] = round(time.monotonic() - catching_up_from, 1)
    # Every partition it holds, the internal ones too, is back in full.
    await until_partitions(settings, all_in_sync, "every partition in sync again")
    for topic in (settings.commands_topic, settings.events_topic):
        for partition in range(settings.partitions):
            assert (cluster.data_dir(victim) / f"{topic}-{partition}").is_dir(), (topic, partition)
    fault_report["uploads_seconds"] = round(await running.finish(), 1)
    await assert_everything_holds(
        registry_pipeline, settings, fault_store, running, acked_writes, tmp_path, fault_report
    )
    assert fault_report["committed"] == 16
