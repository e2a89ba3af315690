"""CNCF Distribution (the reference OCI registry) as a peer to measure Layerlog's registry against.

It runs on the same S3 server as Layerlog (the local versitygw), in a bucket of its own, so both
registries pay for the same storage. Built by `deploy/distribution install`; started and stopped
by its pid, never by name, because other engineers' registries may share the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from bench.stack import ROOT, delete_bucket, free_port, wait_for_url
from services.core.objectstore import ObjectStore
from services.core.settings import Settings


def distribution_binary() -> str:
    """The pinned binary's path; the installer is the one place that knows the version."""
    done = subprocess.run(
        [str(ROOT / "deploy" / "distribution"), "which"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or "deploy/distribution which failed")
    return done.stdout.strip()


def distribution_config(settings: Settings, bucket: str, port: int) -> dict[str, object]:
    """Distribution's configuration, as JSON (a subset of YAML, which is what it reads)."""
    return {
        "version": 0.1,
        # Warnings only and no access log: Layerlog's services run at WARNING in the bench too,
        # so neither pays for per-request log lines.
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "s3": {
                "accesskey": settings.s3_access_key,
                "secretkey": settings.s3_secret_key,
                "region": settings.s3_region,
                "regionendpoint": f"{'https' if settings.s3_secure else 'http'}://"
                f"{settings.s3_endpoint}",
                "bucket": bucket,
                # versitygw serves buckets by path, not by virtual host.
                "forcepathstyle": True,
                "secure": settings.s3_secure,
                "v4auth": True,
                "rootdirectory": "/",
            },
            "cache": {"blobdescriptor": "inmemory"},
            # Redirects on: blob GETs answer 307 to a presigned S3 URL, Distribution's usual setup.
            "redirect": {"disable": False},
            "delete": {"enabled": True},
            # No purge walk of the bucket in the background while we measure.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}"},
    }


class Distribution:
    """One Distribution process on a free port with its own bucket; a context manager."""

    def __init__(self, settings: Settings, tag: str) -> None:
        self.settings = replace(settings, bucket=f"distribution-bench-{tag}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.work = Path(tempfile.mkdtemp(prefix="distribution-bench-"))
        self.log_path = self.work / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> Distribution:
        # Distribution does not create its bucket; Layerlog's seam does, with the same keys.
        await ObjectStore(self.settings).ensure_bucket()
        config = self.work / "config.yml"
        config.write_text(
            json.dumps(distribution_config(self.settings, self.settings.bucket, self.port))
        )
        self._spawn(config)
        await self.wait_ready()
        return self

    def _spawn(self, config: Path) -> None:
        # Distribution v3 exports OpenTelemetry traces by default; no collector runs here, and
        # failing exports would cost it CPU and log noise during the measurement.
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [distribution_binary(), "serve", str(config)],
            env=env,
            cwd=self.work,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def wait_ready(self, timeout: float = 30) -> None:
        def exited() -> str | None:
            if self.process is not None and self.process.poll() is not None:
                return f"Distribution exited; its log ends:\n{self.tail()}"
            return None

        await wait_for_url(self.url + "/v2/", timeout, exited=exited)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to its pid (Distribution drains and exits on it), SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def remove_data(self) -> None:
        await delete_bucket(self.settings)

    async def __aenter__(self) -> Distribution:
        return await self.start()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
        await self.remove_data()
