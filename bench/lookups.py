"""Lookups against Distribution: HEAD blob and GET manifest by tag, 64 clients, on registries
that each hold 100,000 layers in 1,000 repositories and 10,000 tags (bench.versus runs this).

Pushing 100,000 layers through either registry's HTTP API would take hours here, and neither
figure depends on how the layers got there. So each registry's source of truth is written
directly, in the form its own pushes leave it:
- Layerlog: the events a committed upload leaves, on a topic of this run (bench.events'
  SyntheticLog); the registry projects them into its index before it is measured.
- Distribution: the objects its S3 driver writes for a pushed blob, in its bucket: the blob's
  `data` and the repository's `_layers/.../link` (files in the local versitygw's directory, or
  PutObject on another S3 server).
The tags are real manifest PUTs through each registry's API, so each holds its own manifests as
its own code stored them. Each blob is the bytes `TAG-N`, whose sha256 is the digest both use.

The load is bench.headload in its own process, runs interleaved (Layerlog, Distribution, x runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import log
from bench.events import EVENTS_PER_LAYER, SyntheticLog, headload
from bench.peer import Distribution
from bench.stack import ROOT, Pipeline, free_port, run_settings, wait_for_url
from services.core.objectstore import ObjectStore
from services.core.provision import provision
from services.core.settings import Settings

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONCURRENCY = 64
# Distribution's S3 driver keeps its tree under rootdirectory "/" as keys without the slash.
DISTRIBUTION_ROOT = "docker/registry/v2"
# deploy/stack's versitygw serves `.cache/s3data` (LAYERLOG_CACHE moves it), a directory a bucket.
S3_DATA = Path(os.environ.get("LAYERLOG_CACHE", ROOT / ".cache")) / "s3data"


@dataclass(frozen=True)
class Sizes:
    layers: int
    tags: int


def sizes(quick: bool) -> Sizes:
    return Sizes(10_000, 1_000) if quick else Sizes(100_000, 10_000)


class Catalog:
    """What both registries hold: SyntheticLog's layers, and `tags` tagged manifests."""

    def __init__(self, synthetic: SyntheticLog, tags: int) -> None:
        self.synthetic = synthetic
        self.tags = tags
        assert synthetic.layers >= 2 * tags, "each tag's manifest names two layers of its own"

    def blob(self, layer: int) -> bytes:
        # sha256 of these bytes is SyntheticLog.digest(layer): the same digest in both.
        return f"{self.synthetic.tag}-{layer}".encode()

    def tag_layers(self, tag: int) -> tuple[int, int]:
        """(config, layer) of tag `tag`'s manifest, both in the tag's repository: layers of one
        repository are congruent modulo the number of repositories (1,000)."""
        return tag, tag + self.tags

    def repository(self, tag: int) -> str:
        return self.synthetic.repository(tag)

    def manifest(self, tag: int, blob_size: int | None) -> bytes:
        """The tag's image manifest; `blob_size`: the size each registry holds (Layerlog's
        synthetic layers are 56 MiB, Distribution's blobs their few bytes)."""
        config, layer = self.tag_layers(tag)

        def descriptor(n: int, media_type: str) -> dict[str, Any]:
            size = blob_size if blob_size is not None else len(self.blob(n))
            return {"mediaType": media_type, "digest": self.synthetic.digest(n), "size": size}

        body = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": descriptor(config, CONFIG_TYPE),
            "layers": [descriptor(layer, LAYER_TYPE)],
        }
        return json.dumps(body, separators=(",", ":")).encode()

    def head_paths(self) -> list[str]:
        return self.synthetic.paths()

    def manifest_paths(self) -> list[str]:
        return [f"/v2/{self.repository(t)}/manifests/v{t}" for t in range(self.tags)]


async def put_manifests(url: str, catalog: Catalog, blob_size: int | None) -> float:
    """Every tag's manifest PUT, CONCURRENCY at a time; returns the seconds it took."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for tag in range(catalog.tags):
        queue.put_nowait(tag)
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as http:

        async def worker() -> None:
            while not queue.empty():
                tag = queue.get_nowait()
                path = f"/v2/{catalog.repository(tag)}/manifests/v{tag}"
                body = catalog.manifest(tag, blob_size)
                for attempt in range(5):
                    async with http.put(
                        path, data=body, headers={"Content-Type": MANIFEST_TYPE}
                    ) as response:
                        if response.status == 201:
                            break
                        text = await response.text()
                        # 503 with Retry-After is a registry asking for patience, not a failure.
                        if response.status != 503 or attempt == 4:
                            raise RuntimeError(f"PUT {path}: {response.status} {text[:500]}")
                    await asyncio.sleep(1)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return time.perf_counter() - started


def seed_distribution_blobs(settings: Settings, catalog: Catalog) -> tuple[float, str]:
    """Each layer's data and its repository link, as Distribution's S3 driver lays them out;
    returns the seconds it took and how the objects were written."""
    layers = range(catalog.synthetic.layers)

    def objects(layer: int) -> list[tuple[str, bytes]]:
        digest = catalog.synthetic.digest(layer)
        hexdigest = digest.split(":", 1)[1]
        repository = catalog.synthetic.repository(layer)
        return [
            (
                f"{DISTRIBUTION_ROOT}/blobs/sha256/{hexdigest[:2]}/{hexdigest}/data",
                catalog.blob(layer),
            ),
            (
                f"{DISTRIBUTION_ROOT}/repositories/{repository}/_layers/sha256/{hexdigest}/link",
                digest.encode(),
            ),
        ]

    started = time.perf_counter()
    # The local versitygw (deploy/stack) keeps each bucket as a directory, one file an object:
    # 200,000 files written there take seconds, where as many PutObject calls take minutes on
    # these 2 cores. Its PutObject would add only an etag, which Distribution never reads.
    bucket_dir = S3_DATA / settings.bucket
    if bucket_dir.is_dir():
        for layer in layers:
            for key, data in objects(layer):
                path = bucket_dir / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        return time.perf_counter() - started, "files in versitygw's posix directory"
    store = ObjectStore(settings)
    client, bucket = store.client, store.bucket

    def put(layer: int) -> None:
        for key, data in objects(layer):
            client.put_object(bucket, key, BytesIO(data), len(data))

    with ThreadPoolExecutor(max_workers=16) as threads:
        list(threads.map(put, layers, chunksize=256))
    return time.perf_counter() - started, "S3 PutObject"


async def wait_caught_up(url: str, events: int, timeout: float = 900) -> float:
    """Until the registry's /healthz has applied `events`; returns the seconds it took."""
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(url + "/healthz") as response:
                applied = int((await response.json())["events_applied"])
            if applied >= events:
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"registry index stuck at {applied} of {events} events")
            await asyncio.sleep(0.2)


FIGURES = tuple(
    f"{load}_{figure}"
    for load in ("head", "manifest")
    for figure in ("rps", "p50_ms", "p99_ms", "cpu_us")
)


def sanity(result: dict[str, Any], what: str) -> None:
    if set(result["statuses"]) != {"200"} or result["errors"]:
        raise RuntimeError(f"{what} answered other than 200: {result}")


async def measure(work: Path, tag: str, runs: int, quick: bool) -> dict[str, Any]:
    """Both registries seeded, then runs x (Layerlog, Distribution) of each load."""
    size = sizes(quick)
    synthetic = SyntheticLog(size.layers, tag)
    synthetic.check()
    catalog = Catalog(synthetic, size.tags)
    for check in (0, size.layers - 1):  # the blob bytes hash to the digest both registries use
        digest = "sha256:" + hashlib.sha256(catalog.blob(check)).hexdigest()
        assert digest == synthetic.digest(check), (digest, check)
    port = free_port()
    settings = run_settings(
        work,
        f"lk-{tag}",
        registry_listen=f"127.0.0.1:{port}",
        registry_url=f"http://127.0.0.1:{port}",
        registry_index_path=str(work / f"lookups-{tag}.sqlite"),
    )
    # No verifier: the synthetic uploads have no staged bytes, and it would answer each of their
    # UploadFinished with a failure. The worker applies the manifest PUTs.
    pipeline = Pipeline(settings, work, services=("upload-worker", "registry"))
    peer = Distribution(settings, f"lk-{tag}")
    raw: dict[str, dict[str, list[float]]] = {
        name: {figure: [] for figure in FIGURES} for name in ("layerlog", "distribution")
    }
    seeding: dict[str, float | str] = {}
    try:
        await provision(settings, timeout=60)
        seeding["layerlog_events_s"] = await synthetic.produce(settings)
        took = seeding["layerlog_events_s"]
        log(f"lookups: {synthetic.events:,} events on the log in {took:.0f} s")
        await pipeline.start()
        await wait_for_url(settings.registry_url + "/v2/", timeout=120)
        seeding["layerlog_index_s"] = await wait_caught_up(settings.registry_url, synthetic.events)
        # Layerlog's synthetic layers are CHUNKS x 8 MiB, which the index holds as their size.
        layer_size = (EVENTS_PER_LAYER - 3) * 8 * 1024 * 1024
        seeding["layerlog_tags_s"] = await put_manifests(settings.registry_url, catalog, layer_size)
        log(
            f"lookups: Layerlog indexed them in {seeding['layerlog_index_s']:.0f} s and took "
            f"{size.tags:,} manifest PUTs in {seeding['layerlog_tags_s']:.0f} s"
        )
        await peer.start()
        seeding["distribution_blobs_s"], how = await asyncio.to_thread(
            seed_distribution_blobs, peer.settings, catalog
        )
        seeding["distribution_blobs_written_as"] = how
        seeding["distribution_tags_s"] = await put_manifests(peer.url, catalog, None)
        log(
            f"lookups: Distribution's {size.layers:,} blobs and links in "
            f"{seeding['distribution_blobs_s']:.0f} s, {size.tags:,} manifest PUTs in "
            f"{seeding['distribution_tags_s']:.0f} s"
        )
        heads = work / f"lookups-head-{tag}.txt"
        heads.write_text("\n".join(catalog.head_paths()) + "\n")
        manifests = work / f"lookups-manifest-{tag}.txt"
        manifests.write_text("\n".join(catalog.manifest_paths()) + "\n")
        seconds, warmup = (2.0, 0.5) if quick else (5.0, 1.0)
        targets = {
            "layerlog": (settings.registry_url, pipeline.services["registry"].service_pid()),
            "distribution": (peer.url, peer.pid),
        }
        loads = {
            "head": (heads, ()),
            "manifest": (manifests, ("--method", "GET", "--header", f"Accept: {MANIFEST_TYPE}")),
        }
        for run in range(runs):
            for load, (paths, extra) in loads.items():
                for name, (url, pid) in targets.items():
                    result = await headload(url, paths, seconds, warmup, pid, extra)
                    sanity(result, f"{name} {load}")
                    figures = raw[name]
                    figures[f"{load}_rps"].append(float(result["rps"]))
                    figures[f"{load}_p50_ms"].append(float(result["p50_ms"]))
                    figures[f"{load}_p99_ms"].append(float(result["p99_ms"]))
                    figures[f"{load}_cpu_us"].append(float(result["server_cpu_us"]))
                    log(
                        f"lookups run {run + 1}/{runs} {load} {name}: {result['rps']:,.0f}/s "
                        f"p50 {result['p50_ms']:.1f} ms p99 {result['p99_ms']:.1f} ms, server "
                        f"{result['server_cpu_us']:.0f} µs CPU/request"
                    )
            pipeline.check_alive()
            if not peer.alive():
                raise RuntimeError(f"Distribution exited; its log ends:\n{peer.tail()}")
    finally:
        pipeline.stop()
        peer.stop()
        await pipeline.remove_data()
        await peer.remove_data()
        for path in await asyncio.to_thread(lambda: list(work.glob(f"lookups-*{tag}*"))):
            path.unlink()
    return {
        "layers": size.layers,
        "tags": size.tags,
        "repositories": len({synthetic.repository(n) for n in range(min(size.layers, 1000))}),
        "concurrency": CONCURRENCY,
        "seconds_per_load": seconds,
        "seeding_s": seeding,
        "raw": raw,
    }
