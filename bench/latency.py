"""Figure 3: commit latency, from the finish() call to its return, for small and large layers.

The data is written first (write() hands it to the SDK); finish() then sends what is buffered and
FinishUpload, and returns once the verifier's verdict is in the index. The baseline is the latency
of put_object of the same bytes: the time to store them with no guarantee beyond S3's.
"""

from __future__ import annotations

import os
import time

from bench.common import MIB, Context, in_thread, log, put_object
from bench.data import sha256_digest
from bench.stats import Figure, Target, percentile

SIZES = {"64KiB": 64 << 10, "8MiB": 8 * MIB}


async def commit_latency(ctx: Context) -> None:
    samples = {"64KiB": 12, "8MiB": 5} if ctx.quick else {"64KiB": 100, "8MiB": 20}
    targets = {
        ("64KiB", 50): Target("value", "<=", 50, "<= 50 ms"),
        ("64KiB", 99): Target("value", "<=", 200, "<= 200 ms"),
    }
    figures: dict[tuple[str, int], Figure] = {}
    for label in SIZES:
        for p in (50, 99):
            figures[(label, p)] = ctx.figure(
                Figure(
                    f"commit_{label}_p{p}",
                    f"Commit latency, {label} layer, p{p} (finish() call to return)",
                    "ms",
                    f"put_object of {label}, p{p}",
                    target=targets.get((label, p)),
                    higher_is_better=False,
                )
            )
    every: dict[str, list[float]] = {label: [] for label in SIZES}
    async with ctx.service() as service:
        for run in range(ctx.runs):
            for label, size in SIZES.items():
                finishes: list[float] = []
                puts: list[float] = []
                for _ in range(samples[label]):
                    data = os.urandom(size)
                    digest = sha256_digest(data)
                    upload = await service.upload("bench/latency")
                    await upload.write(data)
                    started = time.perf_counter()
                    await upload.finish(size, digest)
                    finishes.append((time.perf_counter() - started) * 1000)
                    puts.append(
                        await in_thread(put_object, ctx.minio, ctx.settings.bucket, data) * 1000
                    )
                every[label] += finishes
                for p in (50, 99):
                    figures[(label, p)].add(percentile(finishes, p), percentile(puts, p))
                log(
                    f"commit {label} run {run + 1}: p50 {percentile(finishes, 50):.0f} ms "
                    f"p99 {percentile(finishes, 99):.0f} ms (put_object p50 "
                    f"{percentile(puts, 50):.1f} ms)"
                )
    ctx.series["commit_latency"] = {"samples_ms": every, "per_run": samples}
