"""`layerlog upload-worker|verifier|query|registry|gc-service` and `run-all`: services in the
foreground."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.auth.errors import AuthSetupError
from services.cli import auth as auth_cli
from services.cli.exits import EXIT_NO, EXIT_OK, EXIT_USAGE
from services.core.principals import Principal
from services.core.settings import Settings

SERVICES = ("upload-worker", "verifier", "query", "registry", "gc-service")
# Each service logs in to Kafka as a principal of its own (services/core/access.py).
PRINCIPALS = {
    "upload-worker": Principal.UPLOAD_WORKER,
    "verifier": Principal.VERIFIER,
    "query": Principal.QUERY,
    "registry": Principal.REGISTRY,
    "gc-service": Principal.GC,
}


def run_service(args: argparse.Namespace) -> int:
    from services.core.memory import tune_malloc

    tune_malloc()  # before any thread or big buffer exists
    settings = Settings.from_env()
    if args.service == "query" and args.read_only:
        from services.query.index import check_index

        problem = check_index(args.index or settings.index_path)
        if problem is not None:
            # Caught here, once: otherwise every request would answer a 500 about a missing file.
            print(f"layerlog: {problem}", file=sys.stderr)
            return EXIT_USAGE

    principal = PRINCIPALS[args.service]
    uses_kafka = not (args.service == "query" and args.read_only)  # a replayed index does not
    if uses_kafka:
        settings.kafka_login(principal)  # a missing password file stops it here (exit status 2)

    async def serve(stop: asyncio.Event) -> None:
        from services.core.login import login_problem

        # A refused login is worth no retry; Kafka not answering yet is, so that goes on.
        problem = await login_problem(settings, principal) if uses_kafka else None
        if problem is not None:
            raise problem
        if args.service == "upload-worker":
            from services.upload_worker import service

            await service.run(settings, stop)
        elif args.service == "verifier":
            from services.verifier import service

            await service.run(settings, stop)
        elif args.service == "registry":
            from services.registry import service

            await service.run(settings, stop)
        elif args.service == "gc-service":
            from services.gc import service

            await service.run(settings, stop)
        else:
            from services.query import service

            await service.run(settings, stop, index_path=args.index, read_only=args.read_only)

    try:
        asyncio.run(_until_signalled(serve))
    except AuthSetupError as bad:
        print(f"layerlog: {args.service}: {bad}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


async def _until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await serve(stop)


def run_all(args: argparse.Namespace) -> int:
    """Starts each service as its own process; Ctrl-C (or one of them dying) stops them all."""
    settings = Settings.from_env()  # a bad setting should fail here, once, not once per service
    for principal in PRINCIPALS.values():
        settings.kafka_login(principal)
    env = dict(os.environ)
    if settings.auth:
        # Absolute, as the index paths: every service reads the same files wherever it runs.
        for variable, path in (
            ("LAYERLOG_AUTH_HTPASSWD_FILE", settings.auth_htpasswd_file),
            ("LAYERLOG_AUTH_POLICY_FILE", settings.auth_policy_file),
            ("LAYERLOG_AUTH_KEYS_DIR", settings.auth_keys_dir),
        ):
            env.setdefault(variable, str(Path(path).resolve()))
        status = auth_cli.prepare(Settings.from_env(env), quiet=False)
        if status != EXIT_OK:
            return status
    else:
        print(
            "layerlog: LAYERLOG_AUTH=off: anyone who reaches the registry and the query service "
            "may push, pull and delete",
            file=sys.stderr,
        )
    env.setdefault("LAYERLOG_INDEX_PATH", str(Path(".cache/query/index.sqlite").resolve()))
    env.setdefault(
        "LAYERLOG_REGISTRY_INDEX_PATH", str(Path(".cache/registry/index.sqlite").resolve())
    )
    env.setdefault("LAYERLOG_GC_INDEX_PATH", str(Path(".cache/gc/index.sqlite").resolve()))
    for index in ("LAYERLOG_INDEX_PATH", "LAYERLOG_REGISTRY_INDEX_PATH", "LAYERLOG_GC_INDEX_PATH"):
        Path(env[index]).parent.mkdir(parents=True, exist_ok=True)
    children = [
        subprocess.Popen([sys.executable, "-m", "services.cli", name], env=env) for name in SERVICES
    ]
    started = ", ".join(f"{n} (pid {c.pid})" for n, c in zip(SERVICES, children, strict=True))
    print(f"layerlog: started {started}; Ctrl-C stops them", flush=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # Explicit handlers: started from a script, this process may begin with SIGINT ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    status = EXIT_OK
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    if not stopping:
        # Ctrl-C reaches the services too and they may exit a moment before we hear of it.
        time.sleep(1)
    if not stopping:
        status = EXIT_NO
        print("layerlog: a service exited; stopping the others", file=sys.stderr)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
    return status
