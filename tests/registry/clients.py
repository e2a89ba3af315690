"""The real OCI clients (`deploy/clients install`), run as subprocesses against the registry.

Each client talks plain HTTP to 127.0.0.1 only when told to: crane `--insecure`, oras
`--plain-http`, regctl a `--host ...,tls=disabled` entry, skopeo `--*-tls-verify=false`.
A missing client fails the test with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Bounded so that a registry that stops answering fails the test instead of hanging it.
CLIENT_TIMEOUT = 180.0

Done = subprocess.CompletedProcess[bytes]


@cache
def client_path(name: str) -> str:
    found = subprocess.run(
        [str(ROOT / "deploy" / "clients"), "which", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if found.returncode != 0:
        pytest.fail(f"{name} is missing: {found.stderr.strip()} (make test installs it)")
    return found.stdout.strip()


def run(
    argv: list[str],
    *,
    timeout: float = CLIENT_TIMEOUT,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    expect_ok: bool = True,
) -> Done:
    """Runs ARGV; unless expect_ok is False, a non-zero exit fails the test with its stderr."""
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=timeout, env=env, cwd=cwd, check=False
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout:.0f}s: {error.stderr!r}")
    if expect_ok and done.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited {done.returncode}:\n"
            + done.stderr.decode(errors="replace")[-3000:]
        )
    return done


def run_hashing(
    argv: list[str], timeout: float = CLIENT_TIMEOUT, env: dict[str, str] | None = None
) -> str:
    """Runs ARGV and returns the sha256 of what it writes, read as it streams: a 1 GiB blob
    never sits in the test's memory. Killed, and the test failed, after TIMEOUT."""
    hasher = hashlib.sha256()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as process:
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            assert process.stdout is not None and process.stderr is not None
            while piece := process.stdout.read(1 << 20):
                hasher.update(piece)
            error = process.stderr.read()
            status = process.wait()
        finally:
            timer.cancel()
    if status != 0:
        pytest.fail(f"{' '.join(argv)} exited {status}:\n{error.decode(errors='replace')[-3000:]}")
    return "sha256:" + hasher.hexdigest()


class Clients:
    """The four clients, each with the flags it needs for the plain-http registry at HOST."""

    def __init__(self, host: str, scratch: Path) -> None:
        self.host = host
        # Logins land in the test's own files, never the user's: crane, oras, docker and
        # skopeo read docker's config.json (skopeo through REGISTRY_AUTH_FILE), regctl its own.
        self.docker_config = scratch / "docker"
        self.docker_config.mkdir(parents=True, exist_ok=True)
        self.env = os.environ | {
            "DOCKER_CONFIG": str(self.docker_config),
            "REGISTRY_AUTH_FILE": str(self.docker_config / "config.json"),
            "REGCTL_CONFIG": str(scratch / "regctl.json"),
        }
        self.regctl_env = self.env

    def log_in(self, user: str, password: str) -> None:
        """Logs every client in: crane's login writes the docker config the others read too."""
        self.crane("auth", "login", self.host, "-u", user, "-p", password)
        self.regctl("registry", "login", self.host, "-u", user, "-p", password)

    def ref(self, repository: str, tag_or_digest: str = "") -> str:
        if not tag_or_digest:
            return f"{self.host}/{repository}"
        separator = "@" if ":" in tag_or_digest else ":"
        return f"{self.host}/{repository}{separator}{tag_or_digest}"

    def crane(self, *args: str, timeout: float = CLIENT_TIMEOUT, expect_ok: bool = True) -> Done:
        argv = [client_path("crane"), "--insecure", *args]
        return run(argv, timeout=timeout, env=self.env, expect_ok=expect_ok)

    def oras(self, *args: str, cwd: Path | None = None, expect_ok: bool = True) -> Done:
        # oras takes files by paths relative to its working directory (absolute ones are refused).
        argv = [client_path("oras"), *args, "--plain-http"]
        return run(argv, cwd=cwd, env=self.env, expect_ok=expect_ok)

    def regctl(self, *args: str, timeout: float = CLIENT_TIMEOUT, expect_ok: bool = True) -> Done:
        argv = [client_path("regctl"), "--host", f"reg={self.host},tls=disabled", *args]
        return run(argv, timeout=timeout, env=self.regctl_env, expect_ok=expect_ok)

    def skopeo(self, *args: str, timeout: float = CLIENT_TIMEOUT, expect_ok: bool = True) -> Done:
        # --insecure-policy: the test's own images need no signature policy from /etc/containers.
        argv = [client_path("skopeo"), "--insecure-policy", *args]
        return run(argv, timeout=timeout, env=self.env, expect_ok=expect_ok)
