"""A three-node Kafka cluster of the tests' own (`deploy/stack up --brokers 3`), what its
partitions look like, and a probe that counts the writes Kafka acknowledged through a fault."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError

from services.core import kafka
from services.core.principals import Principal
from services.core.settings import Settings
from tests.conftest import ROOT

BROKERS = 3
# The cluster's own .cache, beside the single-node stack's: its own credentials, CA, data and
# pid files, so `deploy/stack down` with its variables stops exactly its processes.
CLUSTER_CACHE = ROOT / ".cache" / "cluster-tests"
# Where the jars and the S3 binary already are (the stack `make test` brought up).
PARENT_CACHE = Path(os.environ.get("LAYERLOG_CACHE") or ROOT / ".cache")
STACK_TIMEOUT = 300.0


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(first: int, count: int) -> bool:
    return all(_free(port) for port in range(first, first + count))


def pick_ports() -> tuple[int, int]:
    """The first node's port (the nodes take it and the eight after it) and the S3 port:
    LAYERLOG_TEST_CLUSTER_PORT and LAYERLOG_TEST_CLUSTER_S3_PORT, else free ones below the
    kernel's ephemeral range (32768 on): there, any outgoing connection may take a node's port
    between the check and the bind, which runs on this busy machine showed happen."""
    chosen = os.environ.get("LAYERLOG_TEST_CLUSTER_PORT")
    s3 = os.environ.get("LAYERLOG_TEST_CLUSTER_S3_PORT")
    if chosen:
        return int(chosen), int(s3 or int(chosen) + 3 * BROKERS)
    for first in range(29100, 29900, 10):
        if _free_ports(first, 3 * BROKERS + 1):
            return first, first + 3 * BROKERS
    raise RuntimeError("no ten free ports between 29100 and 29900 for the test cluster")


@dataclass
class Cluster:
    """The test cluster: deploy/stack run with its variables, node by node."""

    first_port: int
    s3_port: int
    cache: Path = CLUSTER_CACHE

    def port(self, node: int) -> int:
        return self.first_port + 3 * (node - 1)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{self.port(n)}" for n in range(1, BROKERS + 1))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERLOG_")}
        env.update(
            LAYERLOG_CACHE=str(self.cache),
            LAYERLOG_KAFKA_BROKERS=str(BROKERS),
            LAYERLOG_KAFKA_BOOTSTRAP=self.bootstrap,
            LAYERLOG_S3_ENDPOINT=f"127.0.0.1:{self.s3_port}",
        )
        return env

    def settings(self) -> Settings:
        return Settings.from_env(
            {
                "LAYERLOG_KAFKA_BOOTSTRAP": self.bootstrap,
                "LAYERLOG_KAFKA_CREDENTIALS_DIR": str(self.cache / "kafka" / "credentials"),
                "LAYERLOG_KAFKA_REPLICATION_FACTOR": str(BROKERS),
                "LAYERLOG_S3_ENDPOINT": f"127.0.0.1:{self.s3_port}",
            }
        )

    def stack(self, *args: str) -> str:
        """deploy/stack ARGS for this cluster; its output. A failure raises with the output."""
        done = subprocess.run(
            [str(ROOT / "deploy" / "stack"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=STACK_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"deploy/stack {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout + done.stderr

    async def run(self, *args: str) -> str:
        return await asyncio.to_thread(self.stack, *args)

    def data_dir(self, node: int) -> Path:
        return self.cache / "kafka" / "cluster" / f"node-{node}" / "data"

    def fresh(self) -> None:
        """Stops what an earlier session may have left running (by its pid files), then
        starts from an empty cache that borrows the parent's jars and binaries."""
        if self.cache.exists():
            self.stack("down")
            shutil.rmtree(self.cache)
        (self.cache / "kafka").mkdir(parents=True)
        (self.cache / "kafka" / "libs").symlink_to(PARENT_CACHE / "kafka" / "libs")
        (self.cache / "bin").symlink_to(PARENT_CACHE / "bin")


# --- what the partitions look like ---


@dataclass(frozen=True)
class PartitionState:
    leader: int  # -1: none
    replicas: tuple[int, ...]
    isr: tuple[int, ...]

    @property
    def in_sync(self) -> bool:
        return self.leader >= 0 and set(self.isr) == set(self.replicas)


async def partitions(
    settings: Settings, topics: list[str] | None = None
) -> dict[tuple[str, int], PartitionState]:
    """Every partition of the topics (None: all, Kafka's internal ones too), as the metadata
    of whichever broker answers says."""
    client = kafka.admin(settings, Principal.ADMIN, request_timeout_ms=5_000)
    await client.start()
    try:
        found = {}
        for topic in await client.describe_topics(topics):
            for p in topic["partitions"]:
                found[(topic["topic"], p["partition"])] = PartitionState(
                    p["leader"], tuple(p["replicas"]), tuple(p["isr"])
                )
        return found
    finally:
        await client.close()


async def until_partitions(
    settings: Settings,
    check: object,
    what: str,
    timeout: float = 180.0,
    topics: list[str] | None = None,
) -> float:
    """Polls the partitions until check(states) holds; returns how long that took."""
    started = time.monotonic()
    last: object = "no answer"
    while time.monotonic() - started < timeout:
        try:
            states = await partitions(settings, topics)
            if states and check(states):  # type: ignore[operator]
                return time.monotonic() - started
            last = {k: v for k, v in states.items() if not v.in_sync}
        except (KafkaError, OSError) as error:
            last = repr(error)
        await asyncio.sleep(0.25)
    raise AssertionError(f"{what} not within {timeout:.0f}s; last seen: {last}")


def all_in_sync(states: dict[tuple[str, int], PartitionState]) -> bool:
    return all(state.in_sync for state in states.values())


async def leading_broker(settings: Settings) -> tuple[int, dict[str, list[int]]]:
    """The broker that leads the most partitions of the commands and events topics, at least
    one of each; with the partitions it leads, per topic."""
    topics = [settings.commands_topic, settings.events_topic]
    states = await partitions(settings, topics)
    led: dict[int, dict[str, list[int]]] = {}
    for (topic, number), state in sorted(states.items()):
        led.setdefault(state.leader, {t: [] for t in topics})[topic].append(number)
    candidates = [b for b, per in led.items() if b >= 0 and all(per[t] for t in topics)]
    assert candidates, f"no broker leads partitions of both topics: {led}"
    best = max(candidates, key=lambda b: sum(len(v) for v in led[b].values()))
    return best, led[best]


# --- acknowledged writes through a fault ---


@dataclass
class AckedWrites:
    """Writes numbered records, one after another, with the services' own producer settings
    (idempotent, acks=all), to a topic replicated like theirs; notes which Kafka acknowledged.
    Afterwards every acknowledged record must be in the log, none twice, and nothing there that
    was never sent."""

    settings: Settings
    topic: str
    pause: float = 0.02
    sent: int = 0
    acked: list[tuple[int, float]] = field(default_factory=list)  # (number, when acknowledged)
    failures: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        client = kafka.admin(self.settings, Principal.ADMIN)
        await client.start()
        try:
            replicas = self.settings.kafka_replication_factor or BROKERS
            await client.create_topics(
                [
                    NewTopic(
                        self.topic,
                        3,
                        replicas,
                        topic_configs={"min.insync.replicas": str(kafka.min_in_sync(replicas))},
                    )
                ]
            )
        finally:
            await client.close()
        self._task = asyncio.create_task(self._write())

    async def _write(self) -> None:
        producer = kafka.producer(self.settings, Principal.ADMIN)
        await producer.start()
        try:
            while not self._stop.is_set():
                number = self.sent
                self.sent += 1
                try:
                    await producer.send_and_wait(
                        self.topic, str(number).encode(), key=str(number % 7).encode()
                    )
                    self.acked.append((number, time.monotonic()))
                except KafkaError as error:
                    self.failures.append(f"{time.monotonic():.1f} #{number}: {error!r}")
                await asyncio.sleep(self.pause)
        finally:
            await producer.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def longest_wait(self, after: float = 0.0) -> float:
        """The longest time between two acknowledgements (from `after` on): how long writes
        stalled."""
        times = [when for _, when in self.acked if when >= after]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def first_ack_after(self, moment: float) -> float | None:
        return next((when for _, when in self.acked if when > moment), None)

    async def assert_none_lost(self) -> dict[str, int]:
        """Every acknowledged record is in the log exactly once; the log holds only records
        that were sent. Returns the counts, for the report."""
        consumer = AIOKafkaConsumer(
            **kafka.connection(self.settings, Principal.ADMIN), enable_auto_commit=False
        )
        await consumer.start()
        found: Counter[int] = Counter()
        try:
            tps = [TopicPartition(self.topic, p) for p in range(3)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                while await consumer.position(tp) < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=2000)
                    for record in batch.get(tp, []):
                        found[int(record.value or b"-1")] += 1
        finally:
            await consumer.stop()
        acked = {number for number, _ in self.acked}
        lost = sorted(acked - set(found))
        twice = sorted(n for n, times in found.items() if times > 1)
        strangers = sorted(n for n in found if not 0 <= n < self.sent)
        assert not lost, f"acknowledged writes missing from the log: {lost[:20]}"
        assert not twice, f"records written twice: {twice[:20]}"
        assert not strangers, f"records nobody sent: {strangers[:20]}"
        return {
            "sent": self.sent,
            "acknowledged": len(acked),
            "in_log": len(found),
            "unacknowledged_in_log": len(set(found) - acked),
            "lost": 0,
            "duplicated": 0,
        }
