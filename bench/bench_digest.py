"""Throughput of the layer verifier against the physical limit measured in the same run.

Two gzip layers are generated into a temporary directory: one of a few large files and one of
many small files (1-16 KiB), with compressible but not trivial content. For each, the median
of several runs is taken of:

* TarSum (tarsum.v1+sha256) through StreamingVerifier, against the limit "zlib inflate of the
  blob plus one hashlib.sha256 pass over the decompressed bytes";
* the blob sha256 through StreamingVerifier, against hashlib.sha256 alone over the blob;
* both together (what the verifier service asks for), against inflate + both hash passes.

Ratios use CPU time (time.process_time) because the benchmark may share the machine with
other work; wall-clock ratios are shown beside them. Runs of all cases are interleaved so
that changing load affects them alike.

Peak RSS is that of a fresh process running the combined verification over the layer. It is
read as RUSAGE_CHILDREN.ru_maxrss by a small launcher process: Linux carries a parent's RSS
high-water mark into a child's ru_maxrss across fork and exec, so the launcher must not be
this (large) benchmark process.

    python -m bench.bench_digest [--quick] [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.digests.digest import compute_digests  # noqa: E402

MiB = 1 << 20
CHUNK = MiB
TARSUM = "tarsum.v1+sha256"

# Targets from the issue: ratio of our throughput to the physical limit, and peak RSS.
TARGET_SHA = 0.95
TARGET_TARSUM_LARGE = 0.9
TARGET_TARSUM_SMALL = 0.5
TARGET_RSS_MIB = 100


@dataclass
class LayerResult:
    name: str
    files: int
    tar_bytes: int
    blob_bytes: int
    generate_seconds: float
    seconds: dict[str, float] = field(default_factory=dict)  # CPU time, median
    wall_seconds: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)  # limit time / our time (CPU)
    wall_ratios: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0


def _corpus(rng: random.Random) -> bytes:
    """Word salad plus a little noise: deflates about 3:1, like a typical layer."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz"
    words = [bytes(rng.choices(alphabet, k=rng.randint(2, 11))) for _ in range(4000)]
    text = b" ".join(rng.choices(words, k=500_000))
    return text + rng.randbytes(256 * 1024)


def _content(rng: random.Random, corpus: bytes, size: int) -> bytes:
    # Slices start at random places, so a file does not repeat within deflate's 32 KiB window.
    parts = []
    remaining = size
    while remaining:
        take = min(remaining, rng.randint(4096, 65536))
        start = rng.randrange(len(corpus) - take)
        parts.append(corpus[start : start + take])
        remaining -= take
    return b"".join(parts)


def generate(path: Path, sizes: list[int], seed: int) -> int:
    rng = random.Random(seed)
    corpus = _corpus(rng)
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        directories = max(1, len(sizes) // 500)
        for d in range(directories):
            info = tarfile.TarInfo(f"usr/share/d{d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1_700_000_000
            tar.addfile(info)
        for i, size in enumerate(sizes):
            info = tarfile.TarInfo(f"usr/share/d{i % directories}/file-{i}.dat")
            info.size = size
            info.mode = 0o644
            info.mtime = 1_700_000_000
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(_content(rng, corpus, size)))
    return len(sizes) + directories


def _read_chunks(path: Path, consume: Callable[[memoryview], None]) -> None:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(view):
            consume(view[:count])


def limit_inflate_hash(path: Path, hash_blob: bool, bounded: bool = False) -> int:
    """The physical limit: inflate plus sha256 of the output (and of the blob if asked).

    ``bounded`` caps each inflate call's output at CHUNK (as the verifier does); unbounded
    inflates each input chunk in one call. Which is faster depends on the machine, so the
    limit is taken as the faster of the two.
    """
    inflater = zlib.decompressobj(31)
    hasher = hashlib.sha256()
    blob_hasher = hashlib.sha256()
    total = 0
    cap = CHUNK if bounded else 0

    def consume(chunk: memoryview) -> None:
        nonlocal total, inflater
        if hash_blob:
            blob_hasher.update(chunk)
        data: bytes | memoryview = chunk
        while True:
            out = inflater.decompress(data, cap)
            hasher.update(out)
            total += len(out)
            if inflater.eof:
                data = inflater.unused_data
                inflater = zlib.decompressobj(31)
                if not data:
                    return
                continue
            data = inflater.unconsumed_tail
            if not data and (not cap or len(out) < cap):
                return

    _read_chunks(path, consume)
    return total


def limit_hash(path: Path) -> None:
    hasher = hashlib.sha256()
    _read_chunks(path, hasher.update)


def ours(path: Path, algorithms: list[str]) -> None:
    with open(path, "rb", buffering=0) as handle:
        compute_digests(handle, algorithms, chunk_size=CHUNK)


def _timed(run: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.process_time() - cpu, time.perf_counter() - wall


_PROBE = """
import sys
sys.path.insert(0, {root!r})
from services.digests.digest import compute_digests
if {path!r}:
    with open({path!r}, "rb", buffering=0) as handle:
        compute_digests(handle, [{tarsum!r}, "sha256"])
"""

_LAUNCHER = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[1]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(path: Path | None) -> float:
    """Peak RSS of a fresh interpreter verifying ``path`` (or only importing, for None)."""
    probe = _PROBE.format(root=str(ROOT), path=str(path or ""), tarsum=TARSUM)
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, probe], check=True, capture_output=True, text=True
    ).stdout
    return int(out.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def measure(name: str, path: Path, files: int, generated: float, runs: int) -> LayerResult:
    tar_bytes = limit_inflate_hash(path, hash_blob=False)  # also warms the page cache
    result = LayerResult(name, files, tar_bytes, path.stat().st_size, generated)
    cases: dict[str, Callable[[], object]] = {
        "limit_tarsum": lambda: limit_inflate_hash(path, hash_blob=False),
        "limit_tarsum_bounded": lambda: limit_inflate_hash(path, False, bounded=True),
        "tarsum": lambda: ours(path, [TARSUM]),
        "limit_sha256": lambda: limit_hash(path),
        "sha256": lambda: ours(path, ["sha256"]),
        "limit_both": lambda: limit_inflate_hash(path, hash_blob=True),
        "limit_both_bounded": lambda: limit_inflate_hash(path, True, bounded=True),
        "both": lambda: ours(path, [TARSUM, "sha256"]),
    }
    cpu: dict[str, list[float]] = {key: [] for key in cases}
    wall: dict[str, list[float]] = {key: [] for key in cases}
    for _ in range(runs):
        for key, run in cases.items():
            spent, elapsed = _timed(run)
            cpu[key].append(spent)
            wall[key].append(elapsed)
    for key in cases:
        result.seconds[key] = statistics.median(cpu[key])
        result.wall_seconds[key] = statistics.median(wall[key])
    for key in ("limit_tarsum", "limit_both"):
        bounded = key + "_bounded"
        result.seconds[key] = min(result.seconds[key], result.seconds.pop(bounded))
        result.wall_seconds[key] = min(result.wall_seconds[key], result.wall_seconds.pop(bounded))
    for key in ("tarsum", "sha256", "both"):
        result.ratios[key] = result.seconds[f"limit_{key}"] / result.seconds[key]
        result.wall_ratios[key] = result.wall_seconds[f"limit_{key}"] / result.wall_seconds[key]
    result.peak_rss_mib = peak_rss_mib(path)
    return result


def _mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:8.1f}"


def report(results: list[LayerResult], idle_rss: float, runs: int) -> list[str]:
    lines = [
        f"median of {runs} interleaved runs; MB/s (CPU time) of tar bytes for tarsum/both, "
        "of blob bytes for sha256",
        f"{'layer':<7}{'case':<9}{'ours MB/s':>10}{'limit MB/s':>11}{'ratio':>7}"
        f"{'wall':>6}{'target':>8}  ok",
    ]
    misses = []
    for r in results:
        targets = {
            "tarsum": TARGET_TARSUM_LARGE if r.name == "large" else TARGET_TARSUM_SMALL,
            "sha256": TARGET_SHA,
            "both": None,
        }
        for case, target in targets.items():
            nbytes = r.blob_bytes if case == "sha256" else r.tar_bytes
            ok = "-" if target is None else ("yes" if r.ratios[case] >= target else "NO")
            if ok == "NO":
                misses.append(f"{r.name} {case}")
            lines.append(
                f"{r.name:<7}{case:<9}{_mbps(nbytes, r.seconds[case]):>10}"
                f"{_mbps(nbytes, r.seconds['limit_' + case]):>11}{r.ratios[case]:>7.2f}"
                f"{r.wall_ratios[case]:>6.2f}{'' if target is None else f'>={target}':>8}  {ok}"
            )
    for r in results:
        ok = "yes" if r.peak_rss_mib <= TARGET_RSS_MIB else "NO"
        if ok == "NO":
            misses.append(f"{r.name} rss")
        lines.append(
            f"{r.name}: {r.files} files, tar {r.tar_bytes / MiB:.0f} MiB, gzip "
            f"{r.blob_bytes / MiB:.0f} MiB (generated in {r.generate_seconds:.1f}s); "
            f"peak RSS {r.peak_rss_mib:.1f} MiB (<= {TARGET_RSS_MIB}: {ok}; "
            f"an idle interpreter with the module imported: {idle_rss:.1f} MiB)"
        )
    lines.append("all targets met" if not misses else "targets missed: " + ", ".join(misses))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small layers, for a smoke run")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    runs = max(1, args.runs)
    large_total, large_count = (32 * MiB, 4) if args.quick else (256 * MiB, 8)
    small_count = 5_000 if args.quick else 50_000
    rng = random.Random(1)
    layers = {
        "large": [large_total // large_count] * large_count,
        "small": [rng.randint(1024, 16 * 1024) for _ in range(small_count)],
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-digest-") as tmp:
        for seed, (name, sizes) in enumerate(layers.items()):
            path = Path(tmp) / f"{name}.tar.gz"
            start = time.perf_counter()
            files = generate(path, sizes, seed)
            generated = time.perf_counter() - start
            print(f"measuring {name} layer ({files} files)...", file=sys.stderr, flush=True)
            results.append(measure(name, path, files, generated, runs))
            os.unlink(path)
    idle = peak_rss_mib(None)
    lines = report(results, idle, runs)
    print("\n".join(lines))
    if args.json:
        payload = {
            "runs": runs,
            "quick": args.quick,
            "idle_rss_mib": idle,
            "targets": {
                "sha256": TARGET_SHA,
                "tarsum_large": TARGET_TARSUM_LARGE,
                "tarsum_small": TARGET_TARSUM_SMALL,
                "rss_mib": TARGET_RSS_MIB,
            },
            "layers": [asdict(r) for r in results],
            "summary": lines[-1],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
