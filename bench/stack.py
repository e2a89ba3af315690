"""Starting and stopping the three services for a bench run, each in its own process.

Like tests/conftest.py (which bench must not import), every run gets its own topics and bucket,
so a bench run never sees another run's records and can run beside `make run` and `make test`.
Processes are stopped by their pid, never by name: other engineers' services share the machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
from minio.deleteobjects import DeleteObject

from services.core.objectstore import ObjectStore
from services.core.provision import provision, remove_topics
from services.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a service read exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERLOG_")}
    for name, value in settings.__dict__.items():
        env["LAYERLOG_" + name.upper()] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    env["LAYERLOG_LOG_LEVEL"] = "WARNING"  # per-request INFO lines would cost CPU we measure
    return env


def run_settings(work: Path, tag: str, **overrides: object) -> Settings:
    """Settings with topics, bucket, port and index of their own."""
    port = free_port()
    base = Settings.from_env()
    settings = replace(
        base,
        commands_topic=f"bench-{tag}.commands",
        events_topic=f"bench-{tag}.events",
        dead_letter_topic=f"bench-{tag}.dead-letter",
        bucket=f"layerlog-bench-{tag}",
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
        index_path=str(work / f"index-{tag}.sqlite"),
        # The figures so far were taken without logins; the comparison with Distribution
        # (issue 14) is where the cost of the token checks is to be measured.
        auth=False,
    )
    return replace(settings, **overrides)  # type: ignore[arg-type]


def new_tag() -> str:
    return uuid.uuid4().hex[:10]


class ServiceProcess:
    """One service in its own process, as in production; stopped by its pid."""

    def __init__(
        self, name: str, settings: Settings, log_dir: Path, *args: str, profile_dir: Path | None
    ) -> None:
        self.name = name
        self.args = args
        self.settings = settings
        self.log_path = log_dir / f"{name}-{settings.events_topic}.log"
        self.profile_dir = profile_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServiceProcess:
        command = [sys.executable, "-m", "services.cli", self.name, *self.args]
        if self.profile_dir is not None:
            # py-spy samples the service from outside, so the profile costs the service little.
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            # Collapsed stacks: `python -m bench.flame` summarises them as text.
            flame = self.profile_dir / f"{self.name}-{int(time.time())}.txt"
            command = [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--rate",
                "250",
                "--subprocesses",
                "--format",
                "raw",
                "--output",
                str(flame),
                "--",
                *command,
            ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            env=settings_env(self.settings),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def service_pid(self) -> int:
        """The pid of the Python process running the service (py-spy's child when profiling)."""
        if self.profile_dir is None:
            return self.pid
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        for _ in range(100):
            found = children.read_text().split() if children.exists() else []
            if found:
                return int(found[0])
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: py-spy started no child")

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the most resident memory the process has had (since start or the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so a phase's own peak can be read."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


async def wait_for_url(
    url: str, timeout: float = 60, *, exited: Callable[[], str | None] | None = None
) -> None:
    """Until GET url answers 200; `exited` says why the server behind it is gone, if it is."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            gone = exited() if exited is not None else None
            if gone is not None:
                raise RuntimeError(gone)
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers 200 at {url}")
            await asyncio.sleep(0.1)


async def wait_for_query(settings: Settings, timeout: float = 60) -> None:
    await wait_for_url(settings.query_url + "/healthz", timeout)


async def health(http: aiohttp.ClientSession, settings: Settings) -> dict[str, int]:
    async with http.get(settings.query_url + "/healthz") as response:
        return dict(await response.json())


class Pipeline:
    """The upload worker, the verifier and the query service on one set of topics and bucket."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        *,
        services: tuple[str, ...] = ("upload-worker", "verifier", "query"),
        profile_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.services: dict[str, ServiceProcess] = {}
        for name in services:
            self.services[name] = ServiceProcess(name, settings, log_dir, profile_dir=profile_dir)

    async def start(self) -> Pipeline:
        Path(self.settings.index_path).parent.mkdir(parents=True, exist_ok=True)
        await provision(self.settings, timeout=60)
        for service in self.services.values():
            service.start()
        if "query" in self.services:
            await wait_for_query(self.settings)
        return self

    def check_alive(self) -> None:
        for service in self.services.values():
            if not service.alive():
                raise RuntimeError(f"{service.name} exited; its log ends:\n{service.tail()}")

    def peak_rss(self) -> dict[str, float]:
        return {name: peak_rss_mib(s.service_pid()) for name, s in self.services.items()}

    def reset_peak_rss(self) -> bool:
        return all(reset_peak_rss(s.service_pid()) for s in self.services.values())

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()

    async def remove_data(self) -> None:
        """Deletes this run's topics and bucket: a full run leaves gigabytes in S3 otherwise."""
        await delete_topics(self.settings)
        await delete_bucket(self.settings)


async def delete_topics(settings: Settings) -> None:
    await remove_topics(settings)


async def delete_bucket(settings: Settings) -> None:
    store = ObjectStore(settings)
    if not await asyncio.to_thread(store.client.bucket_exists, store.bucket):
        return
    # Through the seam, which reads every page: a bucket keeping one upload past the first
    # 1,000 cannot be removed.
    for upload in await store.multipart_uploads(""):
        await store.abort_multipart(upload.key, upload.upload_id)

    def remove() -> None:
        # DeleteObjects, 1,000 keys a request: the lookups' buckets hold hundreds of thousands
        # of objects, which one DELETE each took a quarter of an hour to remove.
        client = store.client
        listed = client.list_objects(store.bucket, recursive=True)
        failed = list(
            client.remove_objects(store.bucket, (DeleteObject(item.object_name) for item in listed))
        )
        if failed:
            raise RuntimeError(f"{len(failed)} objects were not deleted, first: {failed[0]}")
        client.remove_bucket(store.bucket)

    await asyncio.to_thread(remove)
