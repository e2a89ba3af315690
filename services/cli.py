"""`layerlog`: the services, the client commands and the tools, one subcommand each.

Exit statuses: 0 success; 1 the answer is no (exists) or the operation failed; 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.core.settings import Settings, SettingsError

SERVICES = ("upload-worker", "verifier", "query")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=os.environ.get("LAYERLOG_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except SettingsError as error:
        print(f"layerlog: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerlog",
        description="Layerlog: an event-sourced store for container image layers.",
        epilog="Settings come from LAYERLOG_* environment variables (see README.md).",
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    for name, about in (
        ("upload-worker", "consume upload commands, stage chunks in S3, emit events"),
        ("verifier", "check finished uploads and publish LayerCommitted or a failure"),
    ):
        service = sub.add_parser(name, help=about, description=about)
        service.set_defaults(handler=_run_service, service=name)

    query = sub.add_parser("query", help="serve Exists/Fetch from the index projected from events")
    query.add_argument("--index", help="SQLite index file (default: LAYERLOG_INDEX_PATH)")
    query.add_argument(
        "--read-only", action="store_true", help="serve a replayed index as it is; no projection"
    )
    query.set_defaults(handler=_run_service, service="query")

    run_all = sub.add_parser("run-all", help="run the three services until Ctrl-C")
    run_all.set_defaults(handler=_run_all)

    push = sub.add_parser("push", help="upload a layer file; prints its digest")
    push.add_argument("--repo", required=True, help="repository name")
    push.add_argument("--digest", help="digest to finish with (default: the file's sha256)")
    push.add_argument("file", help="layer file")
    push.set_defaults(handler=_client(_push))

    pull = sub.add_parser("pull", help="download a layer to a file")
    pull.add_argument("--repo", required=True)
    pull.add_argument("digest")
    pull.add_argument("-o", "--output", required=True, help="file to write")
    pull.set_defaults(handler=_client(_pull))

    exists = sub.add_parser("exists", help="exit 0 and print true if the layer exists, else 1")
    exists.add_argument("--repo", required=True)
    exists.add_argument("digest")
    exists.set_defaults(handler=_client(_exists))

    provision = sub.add_parser("provision", help="create the topics and bucket (idempotent)")
    provision.set_defaults(
        handler=lambda _: __import__("services.core.provision").core.provision.main()
    )

    from services.core import digest_cli

    digest_cli.register(sub)
    return parser


def _run_service(args: argparse.Namespace) -> int:
    settings = Settings.from_env()

    async def serve(stop: asyncio.Event) -> None:
        if args.service == "upload-worker":
            from services.upload_worker import service

            await service.run(settings, stop)
        elif args.service == "verifier":
            from services.verifier import service

            await service.run(settings, stop)
        else:
            from services.query import service

            await service.run(settings, stop, index_path=args.index, read_only=args.read_only)

    asyncio.run(_until_signalled(serve))
    return 0


async def _until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await serve(stop)


def _run_all(args: argparse.Namespace) -> int:
    """Starts each service as its own process; Ctrl-C (or one of them dying) stops them all."""
    Settings.from_env()  # a bad setting should fail here, once, not three times
    env = dict(os.environ)
    env.setdefault("LAYERLOG_INDEX_PATH", str(Path(".cache/query/index.sqlite").resolve()))
    Path(env["LAYERLOG_INDEX_PATH"]).parent.mkdir(parents=True, exist_ok=True)
    children = [
        subprocess.Popen([sys.executable, "-m", "services.cli", name], env=env) for name in SERVICES
    ]
    started = ", ".join(f"{n} (pid {c.pid})" for n, c in zip(SERVICES, children, strict=True))
    print(f"layerlog: started {started}; Ctrl-C stops them", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    status = 0
    try:
        while all(child.poll() is None for child in children):
            try:
                children[0].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        status = 1
        print("layerlog: a service exited; stopping the others", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
    return status


def _client(
    function: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from services.client import LayerError

        try:
            return asyncio.run(function(args))
        except LayerError as error:
            print(f"layerlog: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        except OSError as error:
            print(f"layerlog: {error}", file=sys.stderr)
            return 2

    return run


async def _push(args: argparse.Namespace) -> int:
    from services.client import LayerService
    from services.core.digest import compute_digests

    path = Path(args.file)
    digest = args.digest
    if digest is None:

        def sha256_of_file() -> str:
            with path.open("rb") as source:
                return str(compute_digests(source, ["sha256"])["sha256"])

        digest = await asyncio.to_thread(sha256_of_file)
    source = await asyncio.to_thread(path.open, "rb")
    try:
        size = os.fstat(source.fileno()).st_size
        async with LayerService() as service:
            upload = await service.upload(args.repo)
            while chunk := await asyncio.to_thread(source.read, service.chunk_size):
                await upload.write(chunk)
            layer = await upload.finish(size, digest)
    finally:
        source.close()
    print(layer.digest)
    return 0


async def _pull(args: argparse.Namespace) -> int:
    from services.client import LayerService

    async with LayerService() as service:
        layer = await service.fetch(args.repo, args.digest)
        out = await asyncio.to_thread(open, args.output, "wb")
        try:
            while chunk := await layer.read(1 << 20):
                await asyncio.to_thread(out.write, chunk)
        finally:
            out.close()
            await layer.close()
    return 0


async def _exists(args: argparse.Namespace) -> int:
    from services.client import LayerService

    async with LayerService() as service:
        found = await service.exists(args.repo, args.digest)
    print("true" if found else "false")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
