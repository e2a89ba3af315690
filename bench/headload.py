"""The lookup load generator: `python -m bench.headload URL PATHS [options]`, in its own process.

HEAD by default (Exists); `--method GET --header 'Accept: ...'` makes it a manifest GET load, which
reads each body to the end so a server that streams it is timed for the whole answer.

It runs apart from the bench (so the bench's own work does not slow it) and apart from the server
(whose CPU it must not share in-process). It still shares the machine's cores with the server:
every figure it produces is compared with the same generator against a bare server.

Prints one JSON object: requests counted after the warm-up, the rate, and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from array import array
from collections import Counter
from pathlib import Path

import aiohttp

from bench.stats import percentile


async def load(
    url: str,
    paths: list[str],
    concurrency: int,
    seconds: float,
    warmup: float,
    method: str = "HEAD",
    headers: dict[str, str] | None = None,
) -> dict[str, object]:
    latencies = array("d")
    counted = [0]  # every answered request, warm-up included (for CPU per request)
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as http:
        begin = time.perf_counter()
        measure_from = begin + warmup
        end = measure_from + seconds

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            clock = time.perf_counter
            while True:
                started = clock()
                if started >= end:
                    return
                try:
                    async with http.request(method, rng.choice(paths), headers=headers) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as error:
                    errors[type(error).__name__] += 1
                    continue
                counted[0] += 1
                if started >= measure_from:
                    latencies.append(clock() - started)
                    statuses[status] += 1

        await asyncio.gather(*(client(seed) for seed in range(concurrency)))
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "all_requests": counted[0],
        "seconds": seconds,
        "rps": len(ordered) / seconds,
        "p50_ms": percentile(ordered, 50) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "max_ms": (ordered[-1] if ordered else 0.0) * 1000,
        "statuses": {str(status): count for status, count in statuses.items()},
        "errors": dict(errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.headload", description=__doc__)
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("paths", type=Path, help="file of request paths, one a line")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--method", default="HEAD", choices=("HEAD", "GET"))
    parser.add_argument(
        "--header", action="append", default=[], help="'Name: value', sent with every request"
    )
    args = parser.parse_args(argv)
    paths = args.paths.read_text().split()
    headers = dict(
        (name.strip(), value.strip())
        for name, value in (line.split(":", 1) for line in args.header)
    )
    result = asyncio.run(
        load(args.url, paths, args.concurrency, args.seconds, args.warmup, args.method, headers)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
