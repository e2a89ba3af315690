"""Figures 4 and 6: Exists under load, and Replay, on an index of synthetic committed layers.

Pushing 100,000 real uploads would take hours here, and what these figures measure starts at the
events topic anyway. So the events a real upload leaves are written straight to a topic of this
run: per layer UploadStarted, seven ChunkAppended, UploadFinished and LayerCommitted, keyed by
upload id like the services key them, 10 events a layer (100,000 layers = 1,000,000 events).
With `tags_every=N`, every Nth layer is also pushed as an image: a ManifestStored naming it and a
TagMoved, keyed by repository like the upload worker keys them (the mix a registry's log has).

Replay is a query service started on an empty index, timed from its first applied event to its
last (its /healthz reports events_applied); the baseline is a plain Kafka consumer, configured as
the projection's, reading the same events without decoding or indexing them. Exists is measured
on the replayed index by a load generator in its own process (bench.headload); the baseline is
the same generator against a bare aiohttp server (bench.bare).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaProducer, TopicPartition

from bench.common import MIB, Context, log
from bench.stack import ROOT, Pipeline, free_port, health, new_tag, run_settings
from bench.stats import Figure, Target, median
from services.core import kafka
from services.core.codec import CODEC
from services.core.eventlog import partition_for
from services.core.layout import manifest_key
from services.core.principals import Principal
from services.core.records import (
    ChunkAppended,
    LayerCommitted,
    ManifestStored,
    TagMoved,
    UploadFinished,
    UploadStarted,
)
from services.core.settings import Settings

EVENTS_PER_LAYER = 10
CHUNKS = EVENTS_PER_LAYER - 3
# Placeholders of the same length as the values that replace them in the encoded bytes.
UPLOAD = "@" * 36
EVENT = "!" * 36
REPOSITORY = "&" * 11
DIGEST = "sha256:" + "#" * 64
MANIFEST = "sha256:" + "%" * 64
TAG = "~" * 8
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _templates() -> list[bytes]:
    """One encoded event per position in a layer's history, with placeholders for the ids."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    common = {
        "event_id": EVENT,
        "upload_id": UPLOAD,
        "repository": REPOSITORY,
        "caused_by": UPLOAD,
        "occurred_at": at,
    }
    staging = f"uploads/{UPLOAD}/data"
    size = CHUNKS * 8 * MIB
    events: list[object] = [UploadStarted(staging_key=staging, **common)]  # type: ignore[arg-type]
    for chunk in range(CHUNKS):
        events.append(
            ChunkAppended(
                offset=chunk * 8 * MIB,
                length=8 * MIB,
                durable_offset=(chunk + 1) * 8 * MIB,
                chunk_sha256="0" * 64,
                **common,  # type: ignore[arg-type]
            )
        )
    events.append(
        UploadFinished(size=size, digest=DIGEST, staged_size=size, staging_key=staging, **common)  # type: ignore[arg-type]
    )
    events.append(
        LayerCommitted(
            digest=DIGEST,
            size=size,
            object_key=staging,
            committed_at=at,
            blob_sha256="0" * 64,
            **common,  # type: ignore[arg-type]
        )
    )
    return [CODEC.encode(event) for event in events]


def _image_templates() -> list[bytes]:
    """A ManifestStored naming one layer (placeholders as above) and the TagMoved pointing at it."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    body = (
        '{"schemaVersion":2,"mediaType":"' + MANIFEST_TYPE + '","config":{"mediaType":'
        '"application/vnd.oci.image.config.v1+json","digest":"' + DIGEST + '","size":2},'
        '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"'
        + DIGEST
        + '","size":58720256}]}'
    ).encode()
    common = {"repository": REPOSITORY, "caused_by": EVENT, "occurred_at": at, "actor": None}
    stored = ManifestStored(
        event_id=EVENT,
        digest=MANIFEST,
        media_type=MANIFEST_TYPE,
        size=len(body),
        body=body,
        object_key=manifest_key(MANIFEST),
        subject=None,
        artifact_type=None,
        prev_hash="0" * 64,
        **common,  # type: ignore[arg-type]
    )
    moved = TagMoved(
        event_id=EVENT,
        tag=TAG,
        digest=MANIFEST,
        previous_digest=None,
        prev_hash="0" * 64,
        **common,  # type: ignore[arg-type]
    )
    return [CODEC.encode(stored), CODEC.encode(moved)]


class SyntheticLog:
    def __init__(self, layers: int, tag: str, tags_every: int = 0) -> None:
        self.layers = layers
        self.tag = tag
        self.tags_every = tags_every
        self.templates = _templates()
        self.image_templates = _image_templates()

    @property
    def images(self) -> int:
        return len(range(0, self.layers, self.tags_every)) if self.tags_every else 0

    @property
    def events(self) -> int:
        return self.layers * EVENTS_PER_LAYER + 2 * self.images

    def has_image(self, layer: int) -> bool:
        return bool(self.tags_every) and layer % self.tags_every == 0

    def manifest_digest(self, layer: int) -> str:
        return "sha256:" + hashlib.sha256(f"{self.tag}-manifest-{layer}".encode()).hexdigest()

    def image_events(self, layer: int) -> list[bytes]:
        """The layer's image: its ManifestStored and TagMoved (tag v<layer>, 8 characters)."""
        values = {
            REPOSITORY: self.repository(layer),
            DIGEST: self.digest(layer),
            MANIFEST: self.manifest_digest(layer),
            TAG: f"v{layer:07d}",
        }
        out = []
        for kind, template in enumerate(self.image_templates):
            event = f"{layer:08x}-{self.tag[:4]}-5{kind:03x}-8000-{self.tag[:10]:0>12}"
            encoded = template.replace(EVENT.encode(), event.encode())
            for placeholder, value in values.items():
                encoded = encoded.replace(placeholder.encode(), value.encode())
            out.append(encoded)
        return out

    def upload_id(self, layer: int) -> str:
        return f"{layer:08x}-{self.tag[:4]}-4000-8000-{self.tag[:10]:0>12}"

    def repository(self, layer: int) -> str:
        return f"bench/r{layer % 1000:04d}"

    def digest(self, layer: int) -> str:
        return "sha256:" + hashlib.sha256(f"{self.tag}-{layer}".encode()).hexdigest()

    def layer_events(self, layer: int) -> list[bytes]:
        upload = self.upload_id(layer).encode()
        repository = self.repository(layer).encode()
        digest = self.digest(layer).encode()
        out = []
        for kind, template in enumerate(self.templates):
            event = f"{layer:08x}-{self.tag[:4]}-4{kind:03x}-8000-{self.tag[:10]:0>12}".encode()
            out.append(
                template.replace(UPLOAD.encode(), upload)
                .replace(EVENT.encode(), event)
                .replace(REPOSITORY.encode(), repository)
                .replace(DIGEST.encode(), digest)
            )
        return out

    def check(self) -> None:
        """The substituted bytes decode to the events meant (a placeholder clash would not)."""
        decoded = [CODEC.decode(value) for value in self.layer_events(7)]
        committed = decoded[-1]
        assert isinstance(committed, LayerCommitted), committed
        assert committed.upload_id == self.upload_id(7)
        assert committed.repository == self.repository(7)
        assert committed.digest == self.digest(7)
        assert committed.object_key == f"uploads/{self.upload_id(7)}/data"
        assert len({event.event_id for event in decoded}) == EVENTS_PER_LAYER
        stored, moved = (CODEC.decode(value) for value in self.image_events(7))
        assert isinstance(stored, ManifestStored) and isinstance(moved, TagMoved)
        assert stored.digest == moved.digest == self.manifest_digest(7)
        assert stored.repository == moved.repository == self.repository(7)
        assert self.digest(7).encode() in stored.body and len(stored.body) == stored.size
        assert moved.tag == "v0000007"

    def paths(self) -> list[str]:
        return [f"/v2/{self.repository(n)}/blobs/{self.digest(n)}" for n in range(self.layers)]

    async def produce(self, settings: Settings) -> float:
        """Writes every event to settings.events_topic; returns the seconds it took."""
        producer = AIOKafkaProducer(
            **kafka.connection(settings, Principal.ADMIN),
            acks=1,
            linger_ms=20,
            max_batch_size=512 * 1024,
        )
        await producer.start()
        started = time.perf_counter()
        try:
            partitions = settings.partitions
            batches = {p: producer.create_batch() for p in range(partitions)}
            pending = []
            for layer in range(self.layers):
                keyed = [(self.upload_id(layer), value) for value in self.layer_events(layer)]
                if self.has_image(layer):
                    # After the layer's LayerCommitted, as a push orders them.
                    keyed += [(self.repository(layer), v) for v in self.image_events(layer)]
                for text, value in keyed:
                    key = text.encode()
                    partition = partition_for(text, partitions)
                    if batches[partition].append(key=key, value=value, timestamp=None) is None:
                        pending.append(
                            await producer.send_batch(
                                batches[partition], settings.events_topic, partition=partition
                            )
                        )
                        batches[partition] = producer.create_batch()
                        batches[partition].append(key=key, value=value, timestamp=None)
            for partition, batch in batches.items():
                if batch.record_count():
                    pending.append(
                        await producer.send_batch(batch, settings.events_topic, partition=partition)
                    )
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        return time.perf_counter() - started


async def raw_consume(settings: Settings, total: int) -> float:
    """Events/s of a bare consumer (the projection's consumer settings) reading `total` events."""
    consumer = kafka.consumer(settings, Principal.AUDITOR, [], None, max_poll_records=5000)
    await consumer.start()
    try:
        # The topic was created with settings.partitions; metadata may not have arrived yet.
        partitions = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        count, first = 0, 0.0
        while count < total:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            if batch and not first:
                first = time.perf_counter()
            count += sum(len(records) for records in batch.values())
        return total / (time.perf_counter() - first)
    finally:
        await consumer.stop()


async def replay_once(
    settings: Settings, work: Path, total: int, profile_dir: Path | None
) -> tuple[float, float, Pipeline]:
    """Starts a query service on an empty index; (events/s, seconds from spawn, the service)."""
    port = free_port()
    settings = replace(
        settings,
        index_path=str(work / f"replay-{new_tag()}.sqlite"),
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
    )
    pipeline = Pipeline(settings, work, services=("query",), profile_dir=profile_dir)
    spawned = time.perf_counter()
    await pipeline.start()
    first_time, first_count = 0.0, 0
    async with aiohttp.ClientSession() as http:
        while True:
            pipeline.check_alive()
            now = time.perf_counter()
            applied = (await health(http, settings))["events_applied"]
            if applied and not first_time:
                first_time, first_count = now, applied
            if applied >= total:
                break
            if now - spawned > 900:
                raise TimeoutError(f"replay stuck at {applied} of {total} events")
            await asyncio.sleep(0.1)
    done = time.perf_counter()
    rate = (total - first_count) / (done - first_time) if done > first_time else float("nan")
    return rate, done - spawned, pipeline


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def headload(
    url: str,
    paths: Path,
    seconds: float,
    warmup: float,
    server_pid: int,
    extra: tuple[str, ...] = (),
) -> dict[str, object]:
    """The load generator's result, plus the server's CPU microseconds per answered request.
    `extra`: more bench.headload options (--method GET, --header ...)."""
    cpu_before = cpu_seconds(server_pid)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.headload",
        url,
        str(paths),
        "--concurrency",
        "64",
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup),
        *extra,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"bench.headload exited with {process.returncode}")
    result = dict(json.loads(out.decode().strip().splitlines()[-1]))
    used = cpu_seconds(server_pid) - cpu_before
    result["server_cpu_us"] = used / max(1, int(result["all_requests"])) * 1e6
    return result


class BareServer:
    def __init__(self, paths: Path) -> None:
        self.paths = paths
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> BareServer:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.bare", str(self.port), str(self.paths), cwd=ROOT
        )
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(self.url + "/healthz") as response:
                        if response.status == 200:
                            return self
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        raise TimeoutError("bench.bare did not start")

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


async def events(ctx: Context, *, replay: bool, exists: bool) -> None:
    layers = 10_000 if ctx.quick else 100_000
    tag = new_tag()
    settings = run_settings(ctx.work, f"ev-{tag}", partitions=ctx.settings.partitions)
    # One image (manifest and tag) per ten layers: 10,000 tags on 100,000 layers.
    synthetic = SyntheticLog(layers, tag, tags_every=10)
    synthetic.check()
    from services.core.provision import provision

    await provision(settings, timeout=60)
    pipeline: Pipeline | None = None
    try:
        seconds = await synthetic.produce(settings)
        log(f"produced {synthetic.events:,} events in {seconds:.1f} s")
        replay_figure = None
        if replay:
            replay_figure = ctx.figure(
                Figure(
                    "replay",
                    f"Replay: events/s rebuilding the index from {synthetic.events:,} events "
                    f"({synthetic.layers:,} layers, {synthetic.images:,} manifests and tags)",
                    "events/s",
                    "Kafka consumer reading the same events, no decoding or index",
                    target=Target("value", ">=", 50_000, ">= 50,000/s"),
                )
            )
        walls: list[float] = []
        for run in range(ctx.runs if replay else 1):
            if pipeline is not None:
                pipeline.stop()
            rate, wall, pipeline = await replay_once(
                settings, ctx.work, synthetic.events, ctx.profile_dir
            )
            walls.append(wall)
            if replay_figure is not None:
                baseline = await raw_consume(settings, synthetic.events)
                replay_figure.add(rate, baseline)
                log(
                    f"replay run {run + 1}: {rate:,.0f} events/s ({wall:.1f} s from spawn) vs "
                    f"bare consumer {baseline:,.0f} events/s"
                )
        if replay_figure is not None:
            replay_figure.note = "whole rebuild from process start: " + ", ".join(
                f"{w:.0f} s" for w in walls
            )
        if exists and pipeline is not None:
            await _exists(ctx, pipeline, synthetic)
        if pipeline is not None:
            ctx.peak_rss["replay + exists"] = pipeline.peak_rss()
    finally:
        if pipeline is not None:
            pipeline.stop()
            for path in ctx.work.glob("replay-*.sqlite*"):
                path.unlink()
        from bench.stack import delete_bucket, delete_topics

        await delete_topics(settings)
        await delete_bucket(settings)


async def _exists(ctx: Context, pipeline: Pipeline, synthetic: SyntheticLog) -> None:
    paths = ctx.work / "exists-paths.txt"
    paths.write_text("\n".join(synthetic.paths()) + "\n")
    seconds, warmup = (2.0, 0.5) if ctx.quick else (5.0, 1.0)
    label = f"{synthetic.layers:,} layers, 64 concurrent clients"
    rps = ctx.figure(
        Figure(
            "exists_rps",
            f"Exists: HEAD requests/s ({label})",
            "req/s",
            "bare aiohttp server (dict lookup), same load generator",
            target=Target("value", ">=", 5_000, ">= 5,000/s"),
        )
    )
    p50 = ctx.figure(
        Figure(
            "exists_p50",
            f"Exists: HEAD latency p50 ({label})",
            "ms",
            "bare aiohttp server, p50",
            higher_is_better=False,
        )
    )
    p99 = ctx.figure(
        Figure(
            "exists_p99",
            f"Exists: HEAD latency p99 ({label})",
            "ms",
            "bare aiohttp server, p99",
            target=Target("value", "<=", 10, "<= 10 ms"),
            higher_is_better=False,
        )
    )
    cpu = ctx.figure(
        Figure(
            "exists_cpu",
            "Exists: server CPU per HEAD request (what the server could do on a core of its own)",
            "µs",
            "bare aiohttp server, CPU per request",
            higher_is_better=False,
        )
    )
    url = pipeline.settings.query_url
    query_pid = pipeline.services["query"].service_pid()
    async with BareServer(paths) as bare:
        assert bare.process is not None
        for run in range(ctx.runs):
            ours = await headload(url, paths, seconds, warmup, query_pid)
            theirs = await headload(bare.url, paths, seconds, warmup, bare.process.pid)
            if set(ours["statuses"]) != {"200"}:  # type: ignore[arg-type]
                raise RuntimeError(f"Exists answered other than 200: {ours}")
            rps.add(float(ours["rps"]), float(theirs["rps"]))  # type: ignore[arg-type]
            p50.add(float(ours["p50_ms"]), float(theirs["p50_ms"]))  # type: ignore[arg-type]
            p99.add(float(ours["p99_ms"]), float(theirs["p99_ms"]))  # type: ignore[arg-type]
            cpu.add(float(ours["server_cpu_us"]), float(theirs["server_cpu_us"]))  # type: ignore[arg-type]
            log(
                f"exists run {run + 1}: {ours['rps']:,.0f} req/s p50 {ours['p50_ms']:.1f} ms "
                f"p99 {ours['p99_ms']:.1f} ms vs bare {theirs['rps']:,.0f} req/s "
                f"p99 {theirs['p99_ms']:.1f} ms; server CPU {ours['server_cpu_us']:.0f} vs "
                f"{theirs['server_cpu_us']:.0f} µs/request"
            )
    bare_cpu = median(cpu.baselines)
    cpu.note = (
        f"one core's worth of requests at the median: {1e6 / cpu.median:,.0f}/s "
        f"(bare server: {1e6 / bare_cpu:,.0f}/s)"
    )
