"""What every figure's module shares: the run's context and timed SDK and S3 operations."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio

from bench.stack import Pipeline
from bench.stats import Figure
from services.client import LayerService
from services.core.settings import Settings

MIB = 1 << 20


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def minio_client(settings: Settings, connections: int = 64) -> Minio:
    """The baseline's client: plain minio, with enough pooled connections for every thread."""
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
        http_client=urllib3.PoolManager(
            maxsize=connections, timeout=urllib3.Timeout(connect=5, read=120)
        ),
    )


@dataclass
class Context:
    settings: Settings
    pipeline: Pipeline | None
    work: Path
    quick: bool
    runs: int
    profile_dir: Path | None
    figures: list[Figure] = field(default_factory=list)
    # Series for the plots and per-figure extras, by figure key; saved in the run's JSON.
    series: dict[str, Any] = field(default_factory=dict)
    peak_rss: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _minio: Minio | None = None

    @property
    def minio(self) -> Minio:
        if self._minio is None:
            self._minio = minio_client(self.settings)
        return self._minio

    def figure(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def service(self, **overrides: Any) -> LayerService:
        return LayerService(self.settings, **overrides)


def new_key(prefix: str) -> str:
    return f"baseline/{prefix}/{uuid.uuid4().hex}"


def put_object(client: Minio, bucket: str, data: bytes | memoryview) -> float:
    """Seconds for minio's put_object of `data` (blocking: run it in a thread)."""
    started = time.perf_counter()
    client.put_object(bucket, new_key("put"), io.BytesIO(data), len(data))
    return time.perf_counter() - started


def get_object(
    client: Minio, bucket: str, key: str, offset: int = 0, length: int = 0, read: int = MIB
) -> tuple[float, int]:
    """Seconds to read an object (or a range) to its end with get_object, and the bytes read."""
    started = time.perf_counter()
    response = client.get_object(bucket, key, offset=offset, length=length)
    total = 0
    try:
        while chunk := response.read(read):
            total += len(chunk)
    finally:
        response.close()
        response.release_conn()
    return time.perf_counter() - started, total


async def sdk_upload(
    service: LayerService,
    repository: str,
    pieces: Iterable[bytes | memoryview],
    size: int,
    digest: str,
) -> tuple[float, float]:
    """(seconds from upload() to finish()'s return, seconds of finish() alone).

    Pieces are written in the SDK's chunk size, as `layerlog push` does with a file."""
    started = time.perf_counter()
    upload = await service.upload(repository)
    step = service.chunk_size
    for piece in pieces:
        view = memoryview(piece)
        for position in range(0, len(view), step):
            await upload.write(view[position : position + step])
    finishing = time.perf_counter()
    await upload.finish(size, digest)
    done = time.perf_counter()
    return done - started, done - finishing


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


async def in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.to_thread(function, *args)


async def read_whole_layer(service: LayerService, repository: str, digest: str) -> int:
    """Bytes of a committed layer read through the SDK (fetch(), then read() 1 MiB at a time)."""
    layer = await service.fetch(repository, digest)
    total = 0
    try:
        while chunk := await layer.read(MIB):
            total += len(chunk)
    finally:
        await layer.close()
    return total
