"""A three-node Kafka cluster for this package's tests (its own .cache/cluster-tests, its own
ports, its own S3), brought up with `deploy/stack up --brokers 3` and down by its pid files once
they are done, so the rest of the suite does not share the machine with three idle brokers;
each test gets fresh topics, a bucket and a pipeline with a registry on it.

The fixtures here do not use the root conftest's `settings`: session fixtures built on it
(`store`, `stack_services`) belong to the single-node stack.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.core.objectstore import ObjectStore
from services.core.provision import provision, remove_topics
from services.core.settings import Settings
from tests.cluster.brokers import CLUSTER_CACHE, AckedWrites, Cluster, pick_ports
from tests.conftest import free_port, registry_process
from tests.faults.conftest import Pipeline, fresh_run

REPORT = CLUSTER_CACHE / "fault-report.jsonl"


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    first, s3 = pick_ports()
    running = Cluster(first, s3)
    started = time.monotonic()
    running.fresh()
    try:
        print(running.stack("up"))
    except RuntimeError as error:
        running.stack("down")
        pytest.exit(f"the test cluster did not come up: {error}", returncode=3)
    print(f"cluster up in {time.monotonic() - started:.1f}s on {running.bootstrap}")
    yield running
    print(running.stack("down"))


@pytest.fixture(scope="package")
def cluster_settings(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    port = free_port()
    return replace(
        cluster.settings(),
        # As the single-node fault tests run: logins off, four partitions, 1 MiB chunks.
        auth=False,
        partitions=4,
        max_chunk_bytes=1 << 20,
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
        index_path=str(tmp_path_factory.mktemp("cluster-index") / "index.sqlite"),
    )


@pytest.fixture()
async def fault_settings(cluster_settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    fresh = fresh_run(cluster_settings, "cluster", tmp_path)
    await provision(fresh, timeout=120)
    yield fresh
    await remove_topics(fresh)


@pytest.fixture()
def fault_store(fault_settings: Settings) -> ObjectStore:
    return ObjectStore(fault_settings)


@pytest.fixture()
async def registry_pipeline(
    fault_settings: Settings, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pipeline]:
    running = Pipeline(fault_settings, tmp_path, registry_process(fault_settings, tmp_path_factory))
    await running.start()
    yield running
    running.stop()
    print(running.logs())


@pytest.fixture()
async def acked_writes(fault_settings: Settings) -> AsyncIterator[AckedWrites]:
    probe = AckedWrites(fault_settings, fault_settings.commands_topic.replace("commands", "probe"))
    await probe.start()
    yield probe
    await probe.stop()


def broker_memory(cluster: Cluster) -> dict[str, str]:
    """Each running node's resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
    found = {}
    for pid_file in sorted((cluster.cache / "run").glob("kafka-*.pid")):
        status = Path(f"/proc/{pid_file.read_text().strip()}/status")
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        except OSError:
            continue
        rss, peak = (int(fields[key].split()[0]) // 1024 for key in ("VmRSS", "VmHWM"))
        found[pid_file.stem] = f"{rss} MiB (peak {peak} MiB)"
    return found


@pytest.fixture()
def fault_report(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[dict[str, object]]:
    """What the test measured, printed and kept in .cache/cluster-tests/fault-report.jsonl
    (one line a test, this session's), for the README's fault table."""
    started = time.monotonic()
    report: dict[str, object] = {"test": request.node.name}
    yield report
    report["test_seconds"] = round(time.monotonic() - started, 1)
    report["broker_memory"] = broker_memory(cluster)
    print("fault report: " + json.dumps(report, indent=1))
    with REPORT.open("a") as file:
        file.write(json.dumps(report) + "\n")
