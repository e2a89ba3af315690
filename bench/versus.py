"""Layerlog's registry against CNCF Distribution on the same S3 server: `python -m bench.versus`
(`make bench` runs it too, and puts its table in bench/RESULTS.md).

Each figure comes from the same client against both registries, runs interleaved (Layerlog,
Distribution, Layerlog, ...) so a slow spell of the shared machine falls on both:
  push       `crane append` of one 256 MiB gzip layer onto an empty image, timed until crane
             returns (the manifest PUT answered); MB/s of the layer's bytes
  concurrent 32 `crane append` processes at once, an 8 MiB gzip layer each; MB/s of all of them
  pull       `crane blob` of the 256 MiB layer to a file; MB/s
  commit     a 64 KiB blob, monolithic (POST a session, PUT the bytes with the digest), p50 and
             p99 over 50 with aiohttp
  lookups    HEAD blob and GET manifest by tag, 64 clients, 100,000 layers and 10,000 tags
             (bench.lookups)
  memory     the peak RSS (VmHWM, reset first) of each Layerlog service during the 32 concurrent
             pushes, and during one 2 GiB push (once, not per run)
Each push uses bytes of its own (a unique gzip member appended), because both registries skip
a blob they already hold. Writes bench/out/versus-*.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from bench import lookups
from bench.common import load_average, log
from bench.data import MIB, gzip_layer, unique_suffix
from bench.events import cpu_seconds
from bench.peer import Distribution
from bench.stack import (
    OUT,
    ROOT,
    Pipeline,
    free_port,
    new_tag,
    peak_rss_mib,
    reset_peak_rss,
    run_settings,
    wait_for_url,
)

LAYER_BYTES = 256 * MIB
CONCURRENT_PUSHES = 32
CONCURRENT_BYTES = 8 * MIB
BIG_PUSH_LAYERS = 8  # the memory figure's push: eight 256 MiB layers in one gzip stream, 2 GiB
BLOB_BYTES = 64 * 1024
ROUNDS = 50
MB = 1_000_000  # MB/s in decimal megabytes, as crane and most tools print them
# digest -> size of the pushed file, to check each pull got the whole layer.
LAYER_BYTES_ON_DISK: dict[str, int] = {}


@dataclass
class Target:
    name: str
    url: str  # http://host:port
    host: str  # host:port, the way crane names a registry


def crane_binary() -> str:
    done = subprocess.run(
        [str(ROOT / "deploy" / "clients"), "which", "crane"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or "deploy/clients which crane failed")
    return done.stdout.strip()


def crane(binary: str, *args: str, stdout: Any = subprocess.DEVNULL) -> float:
    """Runs crane and returns its wall time; crane's own startup is part of what a user waits."""
    started = time.perf_counter()
    done = subprocess.run(
        [binary, *args, "--insecure"], stdout=stdout, stderr=subprocess.PIPE, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"crane {' '.join(args)} failed: {done.stderr.decode()[-2000:]}")
    return seconds


def layer_file(work: Path, base: bytes, label: str) -> tuple[Path, str]:
    """The base layer plus a unique gzip member, on disk for crane; its digest, computed here
    so neither registry's figure includes it."""
    data = base + unique_suffix(label)
    path = work / f"layer-{label}.tar.gz"
    path.write_bytes(data)
    return path, "sha256:" + hashlib.sha256(data).hexdigest()


def push(binary: str, target: Target, path: Path, tag: str) -> float:
    return crane(binary, "append", "-f", str(path), "-t", f"{target.host}/bench/versus:{tag}")


async def push_many(binary: str, target: Target, paths: list[Path], label: str) -> float:
    """Every file pushed by a crane process of its own, all at once; seconds until the last ends."""
    started = time.perf_counter()
    processes = [
        await asyncio.create_subprocess_exec(
            binary,
            "append",
            "-f",
            str(path),
            "-t",
            f"{target.host}/bench/concurrent{number % 4}:{label}-{number}",
            "--insecure",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for number, path in enumerate(paths)
    ]
    outcomes = await asyncio.gather(*(process.communicate() for process in processes))
    seconds = time.perf_counter() - started
    for process, (_, err) in zip(processes, outcomes, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"{target.name}: crane append failed: {err.decode()[-2000:]}")
    return seconds


def concurrent_files(
    work: Path, base: bytes, label: str, count: int = CONCURRENT_PUSHES
) -> list[Path]:
    paths = []
    for number in range(count):
        path = work / f"concurrent-{label}-{number}.tar.gz"
        path.write_bytes(base + unique_suffix(f"{label}-{number}"))
        paths.append(path)
    return paths


def big_file(work: Path, base: bytes) -> Path:
    """Eight copies of the 256 MiB layer, 2 GiB of tar in one gzip stream (gzip members
    concatenate into one valid stream), written without compressing 2 GiB again."""
    path = work / "big.tar.gz"
    with path.open("wb") as out:
        for _ in range(BIG_PUSH_LAYERS):
            out.write(base)
        out.write(unique_suffix("big"))
    return path


def stack_pids() -> dict[str, int]:
    """The Kafka broker's and the S3 server's pids, from deploy/stack's pid files (if local)."""
    run = Path(os.environ.get("LAYERLOG_CACHE", ROOT / ".cache")) / "run"
    pids = {}
    for name, label in (("kafka", "kafka broker"), ("s3", "versitygw")):
        try:
            pid = int((run / f"{name}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if Path(f"/proc/{pid}").exists():
            pids[label] = pid
    return pids


class CpuSplit:
    """CPU seconds each process spent over a phase, plus every child this process reaped in it
    (the crane clients): where a CPU-bound figure's time went."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start: dict[str, float] = {}

    def reset(self) -> None:
        self.start = self._now()

    def read(self) -> dict[str, float]:
        now = self._now()
        return {name: now[name] - self.start.get(name, 0.0) for name in now}

    def _now(self) -> dict[str, float]:
        seconds = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds["crane (clients)"] = children.ru_utime + children.ru_stime
        return seconds


class Peaks:
    """The VmHWM of a set of processes over a phase: reset at its start, read at its end."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def reset(self) -> None:
        for pid in self.pids.values():
            reset_peak_rss(pid)

    def read(self) -> dict[str, float]:
        return {name: peak_rss_mib(pid) for name, pid in self.pids.items()}


def pull(binary: str, target: Target, digest: str, work: Path) -> float:
    out = work / "pulled.tar.gz"
    with out.open("wb") as sink:
        seconds = crane(binary, "blob", f"{target.host}/bench/versus@{digest}", stdout=sink)
    size = out.stat().st_size
    out.unlink()
    if size != LAYER_BYTES_ON_DISK[digest]:
        raise RuntimeError(f"{target.name}: pulled {size} bytes of {digest}")
    return seconds


def with_digest(location: str, digest: str) -> str:
    # Distribution's Location already carries a query (_state); Layerlog's may not.
    return location + ("&" if "?" in location else "?") + "digest=" + digest


async def commit_latencies(target: Target) -> list[float]:
    """POST then monolithic PUT of a fresh 64 KiB blob, timed from the POST to the PUT's 201."""
    seconds = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for round_ in range(ROUNDS):
            data = os.urandom(BLOB_BYTES)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            started = time.perf_counter()
            async with http.post(target.url + "/v2/bench/latency/blobs/uploads/") as response:
                assert response.status == 202, await response.text()
                # Location may be absolute (Distribution) or a path (Layerlog).
                location = str(response.url.join(URL(response.headers["Location"])))
            async with http.put(with_digest(location, digest), data=data) as response:
                assert response.status == 201, f"round {round_}: {await response.text()}"
            seconds.append(time.perf_counter() - started)
    return sorted(seconds)


async def blob_get_status(target: Target, digest: str) -> int:
    """The status of a blob GET not followed: 307 means the pull read S3 directly, 200 that the
    registry streamed the bytes itself. Recorded so the pull figure says which path it measured."""
    async with aiohttp.ClientSession() as http:
        url = f"{target.url}/v2/bench/versus/blobs/{digest}"
        async with http.get(url, allow_redirects=False) as response:
            return response.status


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[int(fraction * (len(sorted_values) - 1))]


FIGURES = ("push_s", "concurrent_s", "pull_s", "commit_p50_ms", "commit_p99_ms")


@dataclass(frozen=True)
class Goal:
    key: str  # in the summary
    label: str
    unit: str
    higher_is_better: bool
    ratio: float | None  # Layerlog / Distribution must be >= (or <=) this; None: no goal
    # What the profiles (bench/PROFILING.md, round 3, and the CPU split this run prints) say
    # about a miss of this goal; RESULTS.md prints it only for the goals this run missed.
    when_missed: str = ""


BYTES_THROUGH_KAFKA = (
    "every byte of a layer crosses three processes before S3 where Distribution's cross only "
    "Distribution itself: "
    "the registry produces it to Kafka, the broker stores it, the upload worker fetches and "
    "decodes it and only then writes it to versitygw"
)
GOALS = [
    Goal(
        "push_mb_s",
        "Push one 256 MiB gzip layer (`crane append`)",
        "MB/s",
        True,
        1.0,
        f"one stream: {BYTES_THROUGH_KAFKA}; the upload worker is the busiest of them "
        "(PROFILING.md round 2: a third of its CPU receives Kafka fetch responses).",
    ),
    Goal(
        "concurrent_mb_s",
        "Push 32 images of 8 MiB at once (`crane append`)",
        "MB/s",
        True,
        1.0,
        f"CPU-bound on the 2 cores: {BYTES_THROUGH_KAFKA}, so Layerlog spends about twice "
        "Distribution's CPU seconds for the same bytes (the CPU split below). More upload "
        "workers do not help on 2 cores (the scaling section).",
    ),
    Goal(
        "commit_p50_ms",
        "Commit a 64 KiB blob, POST + PUT, p50",
        "ms",
        False,
        1.5,
        "three transactional hops, each awaited in turn: the POST waits until its own "
        "projection has the upload (the worker's transaction with UploadStarted), the PUT for "
        "the worker's (staged, UploadFinished) and then the verifier's (LayerCommitted). A Kafka "
        "transaction costs 8-13 ms to commit here and 10-16 ms until a read_committed consumer "
        "sees it (PROFILING.md rounds 2 and 3: POST 34 ms, PUT 71 ms p50 timed apart); "
        "Distribution writes to S3 and answers.",
    ),
    Goal(
        "commit_p99_ms",
        "Commit a 64 KiB blob, POST + PUT, p99",
        "ms",
        False,
        2.0,
        "the same three hops as p50; a hop that waits on a transaction still writing its "
        "markers (CONCURRENT_TRANSACTIONS, retried after retry_backoff_ms) adds to the tail.",
    ),
    Goal(
        "pull_mb_s",
        "Pull the 256 MiB layer (`crane blob`)",
        "MB/s",
        True,
        1.0,
        "Layerlog streams the blob through the registry by default (LAYERLOG_BLOB_REDIRECT="
        "false) where Distribution answers 307 and crane reads versitygw itself: one more copy "
        "of every byte, through Python. Redirects stay off by default so that clients need "
        "not reach the S3 endpoint and no presigned URL leaves the registry (README, Logins "
        "and rights).",
    ),
    Goal("head_rps", "HEAD blob, 64 clients, requests/s", "/s", True, 3.0),
    Goal("head_p99_ms", "HEAD blob, 64 clients, p99", "ms", False, None),
    Goal("manifest_rps", "GET manifest by tag, 64 clients, requests/s", "/s", True, 3.0),
    Goal("manifest_p99_ms", "GET manifest by tag, 64 clients, p99", "ms", False, None),
]
RSS_LIMIT_MIB = 200
RSS_WHY = {
    "registry": "its 32 MiB body budget bounds the chunks it holds, but each lives in several "
    "copies at once (the request's buffer, the command's bytes, the encoded record, aiokafka's "
    "batch and the produce request); halving the budget took only 17 MiB off (PROFILING.md, "
    "round 3).",
}


def goal_met(goal: Goal, ratio: float) -> bool | None:
    if goal.ratio is None:
        return None
    return ratio >= goal.ratio if goal.higher_is_better else ratio <= goal.ratio


async def run(runs: int, quick: bool = False, profile_dir: Path | None = None) -> dict[str, Any]:
    binary = crane_binary()
    work = Path(tempfile.mkdtemp(prefix="versus-bench-"))
    layer_bytes = 32 * MIB if quick else LAYER_BYTES
    log(f"building a {layer_bytes // MIB} MiB gzip layer (cached in bench/out/)")
    base = gzip_layer(layer_bytes)
    small = gzip_layer(CONCURRENT_BYTES, seed=2)
    tag = new_tag()
    port = free_port()
    settings = run_settings(
        work,
        tag,
        registry_listen=f"127.0.0.1:{port}",
        registry_url=f"http://127.0.0.1:{port}",
        registry_index_path=str(work / "registry-index.sqlite"),
    )
    pipeline = Pipeline(
        settings, work, services=("upload-worker", "verifier", "registry"), profile_dir=profile_dir
    )
    peer = Distribution(settings, tag)
    figures: dict[str, dict[str, list[float]]] = {
        name: {figure: [] for figure in FIGURES} for name in ("layerlog", "distribution")
    }
    peaks: dict[str, dict[str, list[float]]] = {"concurrent": {}, "big_push": {}}
    big_push_s: dict[str, float] = {}
    blob_get: dict[str, int] = {}
    load_before = load_average()
    started = time.perf_counter()
    try:
        await pipeline.start()
        await wait_for_url(settings.registry_url + "/v2/")
        await peer.start()
        targets = [
            Target("layerlog", settings.registry_url, settings.registry_url.split("//", 1)[1]),
            Target("distribution", peer.url, peer.host),
        ]
        pids = {name: service.service_pid() for name, service in pipeline.services.items()}
        watch = Peaks({**pids, "distribution": peer.pid})
        cpu = CpuSplit({**pids, "distribution": peer.pid, **stack_pids()})
        cpu_split: dict[str, list[dict[str, float]]] = {"layerlog": [], "distribution": []}
        for number in range(runs):
            # Alternate which registry goes first, so neither always gets the quieter moment.
            for target in targets if number % 2 == 0 else targets[::-1]:
                label = f"{target.name}-{number}"
                path, digest = layer_file(work, base, label)
                LAYER_BYTES_ON_DISK[digest] = path.stat().st_size
                pushed = push(binary, target, path, label)
                path.unlink()
                pulled = pull(binary, target, digest, work)
                blob_get[target.name] = await blob_get_status(target, digest)
                latencies = await commit_latencies(target)
                files = concurrent_files(work, small, label)
                watch.reset()
                cpu.reset()
                many = await push_many(binary, target, files, label)
                cpu_split[target.name].append(cpu.read())
                for name, mib in watch.read().items():
                    peaks["concurrent"].setdefault(name, []).append(mib)
                for file in files:
                    file.unlink()
                figure = figures[target.name]
                figure["push_s"].append(pushed)
                figure["concurrent_s"].append(many)
                figure["pull_s"].append(pulled)
                figure["commit_p50_ms"].append(statistics.median(latencies) * 1000)
                figure["commit_p99_ms"].append(percentile(latencies, 0.99) * 1000)
                log(
                    f"run {number + 1}/{runs} {target.name}: push {pushed:.2f} s, "
                    f"{CONCURRENT_PUSHES} pushes {many:.2f} s, pull {pulled:.2f} s, commit p50 "
                    f"{figure['commit_p50_ms'][-1]:.1f} ms p99 {figure['commit_p99_ms'][-1]:.1f} ms"
                )
            pipeline.check_alive()
            if not peer.alive():
                raise RuntimeError(f"Distribution exited; its log ends:\n{peer.tail()}")
        if not quick:
            big = big_file(work, base)
            for target in targets:
                watch.reset()
                big_push_s[target.name] = push(binary, target, big, "big")
                for name, mib in watch.read().items():
                    peaks["big_push"].setdefault(name, []).append(mib)
                took = big_push_s[target.name]
                log(f"2 GiB push {target.name}: {took:.1f} s, peaks {watch.read()}")
            big_bytes = big.stat().st_size
            big.unlink()
        pipeline.check_alive()
    finally:
        pipeline.stop()
        peer.stop()
        await pipeline.remove_data()
        await peer.remove_data()
    log("lookups: seeding both registries")
    looked = await lookups.measure(work, tag, runs, quick)
    load_after = load_average()
    size = len(base) + len(unique_suffix("x"))
    concurrent_bytes = CONCURRENT_PUSHES * (len(small) + len(unique_suffix("x")))
    summary: dict[str, dict[str, float]] = {}
    for name, figure in figures.items():
        lookup = looked["raw"][name]
        summary[name] = {
            "push_mb_s": size / MB / statistics.median(figure["push_s"]),
            "concurrent_mb_s": concurrent_bytes / MB / statistics.median(figure["concurrent_s"]),
            "pull_mb_s": size / MB / statistics.median(figure["pull_s"]),
            "commit_p50_ms": statistics.median(figure["commit_p50_ms"]),
            "commit_p99_ms": statistics.median(figure["commit_p99_ms"]),
            **{key: statistics.median(values) for key, values in lookup.items()},
        }
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_before": load_before,
        "load_after": load_after,
        "minutes": (time.perf_counter() - started) / 60,
        "runs": runs,
        "quick": quick,
        "layer_bytes": size,
        "concurrent_bytes": concurrent_bytes,
        "big_push_bytes": big_bytes if not quick else 0,
        "big_push_s": big_push_s,
        "blob_bytes": BLOB_BYTES,
        "commit_rounds": ROUNDS,
        "layerlog_blob_redirect": settings.blob_redirect,
        "blob_get_status": blob_get,
        "peak_rss_mib": {phase: {k: max(v) for k, v in by.items()} for phase, by in peaks.items()},
        # Per registry, per process: the median over the runs of CPU seconds in the 32 pushes.
        "concurrent_cpu_s": {
            name: {key: statistics.median(run[key] for run in runs_) for key in runs_[0]}
            for name, runs_ in cpu_split.items()
            if runs_
        },
        "lookups": {k: v for k, v in looked.items() if k != "raw"},
        "raw": {"push": figures, "lookups": looked["raw"], "peak_rss_mib": peaks},
        "summary": summary,
    }


DESCRIPTION = [
    "- Both registries run on the same versitygw, each in a bucket of its own, with no logins "
    "(Distribution has none configured). Distribution: its S3 driver, "
    "`storage.cache.blobdescriptor: inmemory`, redirects on, deletes on. Layerlog: the upload "
    "worker, verifier and registry as `make run` starts them, `LAYERLOG_BLOB_REDIRECT` at its "
    "default.",
    "- Client: crane v0.22.1 (`--insecure`) for pushes and pulls, aiohttp for the commit "
    "latency (50 commits per run), `bench.headload` (a process of its own) for the lookups.",
    "- Push: `crane append -f` onto an empty image, until crane returns (the manifest PUT "
    "answered); the time includes crane hashing the layer. The 32 concurrent pushes are 32 crane "
    "processes at once, each with an 8 MiB gzip layer of its own.",
    "- Peak RSS: VmHWM of each service, reset before the phase; the 2 GiB push is once per "
    "registry, after the runs.",
]


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def table(result: dict[str, Any]) -> str:
    """The comparison, one row a goal; then the memory rows (a bound, not a ratio)."""
    layerlog, peer = result["summary"]["layerlog"], result["summary"]["distribution"]
    lines = [
        "| figure | Layerlog | Distribution | Layerlog / Distribution | goal | met |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for goal in GOALS:
        ours, theirs = layerlog[goal.key], peer[goal.key]
        ratio = ours / theirs
        met = goal_met(goal, ratio)
        sign = ">=" if goal.higher_is_better else "<="
        wanted = "-" if goal.ratio is None else f"{sign} {goal.ratio}x"
        verdict = "-" if met is None else ("**yes**" if met else "no")
        lines.append(
            f"| {goal.label} | {number(ours)} {goal.unit} | {number(theirs)} {goal.unit} "
            f"| {ratio:.2f}x | {wanted} | {verdict} |"
        )
    phases = {"concurrent": "32 concurrent pushes", "big_push": "one 2 GiB push"}
    for phase, label in phases.items():
        peaks = result["peak_rss_mib"].get(phase) or {}
        for name, mib in peaks.items():
            if name == "distribution":
                continue
            met = "**yes**" if mib <= RSS_LIMIT_MIB else "no"
            theirs = peaks.get("distribution")
            lines.append(
                f"| Peak RSS, {name}, during {label} | {mib:.0f} MiB | "
                f"{'-' if theirs is None else f'{theirs:.0f} MiB (the registry)'} | - "
                f"| <= {RSS_LIMIT_MIB} MiB | {met} |"
            )
    return "\n".join(lines)


def cpu_table(result: dict[str, Any]) -> str:
    """Where the CPU went during the 32 concurrent pushes, per process, for each registry."""
    split = result.get("concurrent_cpu_s") or {}
    if not split:
        return ""
    names = sorted(
        {
            name
            for by in split.values()
            for name in by
            if any(by.get(name, 0) > 0.05 for by in split.values())
        }
    )
    lines = [
        "| CPU seconds during the 32 concurrent pushes | Layerlog | Distribution |",
        "| --- | ---: | ---: |",
    ]
    for name in names:
        cells = [f"{split.get(r, {}).get(name, 0.0):.1f}" for r in ("layerlog", "distribution")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    totals = [sum(split.get(r, {}).values()) for r in ("layerlog", "distribution")]
    lines.append(f"| all | {totals[0]:.1f} | {totals[1]:.1f} |")
    return "\n".join(lines)


def number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def goals_met(result: dict[str, Any]) -> tuple[int, list[str]]:
    layerlog, peer = result["summary"]["layerlog"], result["summary"]["distribution"]
    met, missed = 0, []
    for goal in GOALS:
        verdict = goal_met(goal, layerlog[goal.key] / peer[goal.key])
        if verdict is True:
            met += 1
        elif verdict is False:
            missed.append(goal.key)
    for phase, peaks in result["peak_rss_mib"].items():
        for name, mib in peaks.items():
            if name != "distribution":
                if mib <= RSS_LIMIT_MIB:
                    met += 1
                else:
                    missed.append(rss_key(name, phase))
    return met, missed


def rss_key(name: str, phase: str) -> str:
    return f"rss_{name}_{phase}"


def why_missed(result: dict[str, Any], missed: list[str]) -> list[str]:
    """One line per goal in `missed` (goals_met's), with what the profiles say about it."""
    lines = [
        f"- **{goal.label}**: {goal.when_missed}"
        for goal in GOALS
        if goal.key in missed and goal.when_missed
    ]
    for phase, peaks in result["peak_rss_mib"].items():
        for name, mib in peaks.items():
            if rss_key(name, phase) in missed:
                why = RSS_WHY.get(name, "see bench/PROFILING.md, round 3.")
                lines.append(f"- **Peak RSS, {name}, {phase}** ({mib:.0f} MiB): {why}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per registry (median taken)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="the pushes' services under py-spy; collapsed stacks in bench/out/profiles/ "
        "(`python -m bench.flame FILE`)",
    )
    args = parser.parse_args()
    profiles = OUT / "profiles" if args.profile else None
    result = asyncio.run(run(args.runs, args.quick, profiles))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"versus-{int(time.time())}.json"
    path.write_text(json.dumps(result, indent=2))
    print(table(result))
    print()
    print(cpu_table(result))
    print(
        f"\nload average before {result['load_before']}, after {result['load_after']}; "
        f"{result['machine']}; {result['runs']} runs each; blob GET status (unfollowed) "
        f"{result['blob_get_status']}; JSON in {path.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
