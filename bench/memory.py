"""Figure 7: peak resident memory of each service while a 2 GiB layer is uploaded and fetched.

Each service's peak (VmHWM) is reset before the phase, so it is the phase's own peak. The same is
measured for a 256 MiB layer first: a service whose memory does not depend on the layer's size
shows the same peak for both. The baseline is a plain Python process that streams the same bytes
to S3 with put_object and back with get_object (`python -m bench.memory SIZE`, settings from the
LAYERLOG_* environment): the memory an interpreter with these libraries needs for that job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import MIB, Context, log, minio_client, new_key, read_whole_layer
from bench.data import BlockReader, PatternStream
from bench.stack import ROOT, peak_rss_mib, settings_env
from bench.stats import Figure, Target
from services.core.settings import Settings

SERVICES = ("upload-worker", "verifier", "query")


async def _upload_and_fetch(ctx: Context, size: int) -> dict[str, float]:
    assert ctx.pipeline is not None
    stream = PatternStream(size)
    if not ctx.pipeline.reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM (/proc/PID/clear_refs): peak RSS needs Linux 4+")
    async with ctx.service() as service:
        upload = await service.upload("bench/memory")
        hasher = hashlib.sha256()
        for block in stream.blocks():
            hasher.update(block)
            await upload.write(block)
        digest = "sha256:" + hasher.hexdigest()
        await upload.finish(size, digest)
        total = await read_whole_layer(service, "bench/memory", digest)
        if total != size:
            raise RuntimeError(f"fetched {total} bytes of {size}")
    return ctx.pipeline.peak_rss()


def _baseline(settings: Settings, size: int) -> float:
    """Peak RSS (MiB) of a separate process doing the same transfer with minio alone."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", str(size)],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"])


async def memory(ctx: Context) -> None:
    small, large = (64 * MIB, 512 * MIB) if ctx.quick else (256 * MIB, 2048 * MIB)
    runs = ctx.runs
    figures = {
        name: ctx.figure(
            Figure(
                f"memory_{name.replace('-', '_')}",
                f"Peak RSS, {name}, during a {large // MIB} MiB upload and fetch",
                "MiB",
                "python + minio streaming the same bytes",
                target=Target("value", "<=", 200, "<= 200 MiB"),
                higher_is_better=False,
            )
        )
        for name in SERVICES
    }
    smaller: dict[str, list[float]] = {name: [] for name in SERVICES}
    for run in range(runs):
        small_peaks = await _upload_and_fetch(ctx, small)
        started = time.perf_counter()
        large_peaks = await _upload_and_fetch(ctx, large)
        seconds = time.perf_counter() - started
        baseline = await asyncio.to_thread(_baseline, ctx.settings, large)
        for name in SERVICES:
            figures[name].add(large_peaks[name], baseline)
            smaller[name].append(small_peaks[name])
        log(
            f"memory run {run + 1}: {large // MIB} MiB in {seconds:.0f} s; peaks "
            + ", ".join(
                f"{n} {large_peaks[n]:.0f} MiB (at {small // MIB} MiB: {small_peaks[n]:.0f})"
                for n in SERVICES
            )
            + f"; baseline {baseline:.0f} MiB"
        )
    for name in SERVICES:
        figures[name].note = (
            f"with a {small // MIB} MiB layer instead: "
            + ", ".join(f"{value:.0f}" for value in smaller[name])
            + " MiB"
        )
    ctx.series["memory"] = {"small": small, "large": large, "small_peaks": smaller}


def _baseline_main(size: int) -> int:
    """Streams `size` pattern bytes to S3 and back; prints {"peak_rss_mib": ...}."""
    settings = Settings.from_env()
    client = minio_client(settings, connections=8)
    key = new_key("memory")
    # Small blocks and pool: generating the bytes must not weigh on the memory being measured.
    stream = PatternStream(size, block=MIB, pool=2 * MIB)
    client.put_object(settings.bucket, key, BlockReader(stream), size, part_size=8 * MIB)
    response = client.get_object(settings.bucket, key)
    try:
        while response.read(MIB):
            pass
    finally:
        response.close()
        response.release_conn()
    client.remove_object(settings.bucket, key)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(int(Path("/proc/self").resolve().name))}))
    return 0


if __name__ == "__main__":
    sys.exit(_baseline_main(int(sys.argv[1])))
