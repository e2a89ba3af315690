"""Runs one service in this process: `python -m bench.serve NAME [ARGS...]`.

This is `layerlog NAME` (services.cli) with one difference: the upload worker's and the
verifier's Kafka consumer groups get this run's topic in their name. Their group ids are fixed
(`layerlog-upload-worker`, `layerlog-verifier`) whatever the topics, so on a shared machine every
test run that starts or stops a worker rebalances the bench's workers too, stalling them for
seconds to minutes; measured that way, the figures would be of other people's test runs. With a
group of their own they consume exactly as they would otherwise.

If services.cli does not import (another engineer mid-change), the services are started the way
the CLI starts them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from services.core.settings import Settings


def _direct(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.serve")
    parser.add_argument("service", choices=("upload-worker", "verifier", "query"))
    parser.add_argument("--index")
    parser.add_argument("--read-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LAYERLOG_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    settings = Settings.from_env()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if args.service == "query":
            from services.query import service as query

            await query.run(settings, stop, index_path=args.index, read_only=args.read_only)
        elif args.service == "upload-worker":
            from services.upload_worker import service as worker

            await worker.run(settings, stop)
        else:
            from services.verifier import service as verifier

            await verifier.run(settings, stop)

    asyncio.run(serve())
    return 0


def main(argv: list[str]) -> int:
    try:
        from services.cli import build_parser
        from services.cli import main as cli_main

        build_parser()  # imports every subcommand's module: fails now if one is broken
    except ImportError as error:
        print(f"bench.serve: services.cli does not import ({error}); starting directly")
        return _direct(argv)
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
