"""`layerlog`: the services, the client commands and the tools, one subcommand each.

Exit statuses (the same for every subcommand; `layerlog --help` lists them):
0 success; 1 the answer is no (exists, history found nothing) or the operation failed (a layer
that does not verify, an unknown layer); 2 bad usage or input (arguments, LAYERLOG_* settings,
files); 3 Kafka, S3 or the query service cannot be reached; 130 interrupted.

The services log JSON lines (services.core.logs); the client commands print for people, or JSON
with --json for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from services.core import logs
from services.core.settings import LOG_LEVELS, Settings, SettingsError

SERVICES = ("upload-worker", "verifier", "query")

EXIT_OK = 0
EXIT_NO = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

EXIT_STATUSES = """\
exit status:
  0    success
  1    the answer is no (exists: not there; history: nothing found) or the operation failed
       (the layer did not verify, is unknown, the upload was cancelled)
  2    bad usage or input: arguments, a LAYERLOG_* setting, a file that cannot be read/written
  3    Kafka, S3 or the query service cannot be reached (or a topic does not exist)
  130  interrupted (Ctrl-C)"""


class Unavailable(Exception):
    """A server the command needs is not answering: exit status 3."""


class UsageError(Exception):
    """Arguments that argparse alone cannot check: exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        _configure_logging(args)
        return int(args.handler(args) or 0)
    except SettingsError as error:
        print(f"layerlog: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _configure_logging(args: argparse.Namespace) -> None:
    if getattr(args, "handler", None) is _run_service:
        # Services log JSON lines for a log collector; the level is a setting, checked with the
        # others (a bad LAYERLOG_LOG_LEVEL stops the service at start-up with exit status 2).
        logs.configure_json(args.service, Settings.from_env().log_level)
    else:
        # Commands are run by people; a bad level is reported by the commands that read settings.
        level = os.environ.get("LAYERLOG_LOG_LEVEL", "INFO").strip().upper()
        logs.configure_human(level if level in LOG_LEVELS else "INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerlog",
        description="Layerlog: an event-sourced store for container image layers.",
        epilog="Settings come from LAYERLOG_* environment variables (see README.md).\n\n"
        + EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, about: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=about,
            # Raw formatting keeps the exit-status table; so the prose is wrapped here.
            description=textwrap.fill(description or about, 88),
            epilog=EXIT_STATUSES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    # Services

    for name, about, listen in (
        (
            "upload-worker",
            "consume upload commands, stage chunks in S3, emit events",
            "LAYERLOG_WORKER_METRICS_LISTEN",
        ),
        (
            "verifier",
            "check finished uploads and publish LayerCommitted or a failure",
            "LAYERLOG_VERIFIER_METRICS_LISTEN",
        ),
    ):
        service = command(
            name,
            about,
            f"{about[0].upper()}{about[1:]}. Logs JSON lines on stderr (level: "
            f"LAYERLOG_LOG_LEVEL) and serves Prometheus metrics at http://{listen}/metrics.",
        )
        service.set_defaults(handler=_run_service, service=name)

    query = command(
        "query",
        "serve Exists/Fetch from the index projected from events",
        "Serve the HTTP API (HEAD/GET /v2/<name>/blobs/<digest>, /healthz, /metrics) from the "
        "SQLite index, which it keeps projecting from the events topic. With --read-only it "
        "serves an index as it is (one `layerlog replay` wrote) and starts no projection.",
    )
    query.add_argument("--index", help="SQLite index file (default: LAYERLOG_INDEX_PATH)")
    query.add_argument(
        "--read-only", action="store_true", help="serve a replayed index as it is; no projection"
    )
    query.set_defaults(handler=_run_service, service="query")

    run_all = command("run-all", "run the three services until Ctrl-C")
    run_all.set_defaults(handler=_run_all)

    # Client commands

    push = command("push", "upload a layer file; prints its digest")
    push.add_argument("--repo", required=True, help="repository name")
    push.add_argument("--digest", help="digest to finish with (default: the file's sha256)")
    _output_options(push)
    push.add_argument("file", help="layer file")
    push.set_defaults(handler=_client(_push))

    pull = command("pull", "download a layer to a file")
    pull.add_argument("--repo", required=True, help="repository name")
    pull.add_argument("digest")
    pull.add_argument("-o", "--output", required=True, help="file to write")
    _output_options(pull)
    pull.set_defaults(handler=_client(_pull))

    exists = command("exists", "exit 0 and print true if the layer exists, else 1")
    exists.add_argument("--repo", required=True, help="repository name")
    exists.add_argument("digest")
    exists.add_argument("--json", action="store_true", help="print a JSON object")
    exists.set_defaults(handler=_client(_exists))

    # Audit tools

    history = command(
        "history",
        "print the ordered history of an upload, or of every upload to a repository",
        "Replay the events topic (and the commands that caused the events) and print an "
        "upload's history: time, event, causing command, log positions (PARTITION@OFFSET), "
        "sizes, digests and verdicts. UPLOAD_ID reads only the one partition of each topic its "
        "key maps to. --repo has no key to go by and scans the WHOLE events topic once (slow on "
        "a long log), then prints each matching upload's history. Commands are kept 7 days; an "
        "older event's command is shown as gone. Chunk bytes are never printed.",
    )
    history.add_argument("upload_id", nargs="?", metavar="UPLOAD_ID", help="the upload's id")
    history.add_argument(
        "--repo", metavar="NAME", help="every upload to this repository (scans the whole log)"
    )
    history.add_argument(
        "--digest", metavar="D", help="with --repo: only the uploads finished with digest D"
    )
    history.add_argument(
        "--json", action="store_true", help="JSON lines, one per event, every field"
    )
    history.set_defaults(handler=_client(_history))

    replay = command(
        "replay",
        "rebuild the index as of a time or log position into a new file (time travel)",
        "Rebuild the query index from the events topic up to a cut, into a new SQLite file; "
        "serve it with `layerlog query --index FILE --read-only`. --until TIME (ISO-8601; UTC "
        "when it has no zone) cuts every partition before its first event at or after TIME. "
        "--until PARTITION:OFFSET (repeat it for several partitions) cuts that partition before "
        "OFFSET; partitions not named are read to their end. Without --until: up to now.",
    )
    replay.add_argument(
        "--until",
        action="append",
        metavar="TIME|PARTITION:OFFSET",
        help="where to cut the log (repeatable for PARTITION:OFFSET)",
    )
    replay.add_argument("--out", required=True, metavar="FILE", help="new index file to write")
    replay.add_argument("--json", action="store_true", help="print a JSON object")
    replay.set_defaults(handler=_client(_replay))

    audit = command("audit", "check the event log for tampering")
    audit_checks = audit.add_subparsers(metavar="CHECK")
    verify = audit_checks.add_parser(
        "verify",
        help="check every upload's hash chain and every committed blob's digest",
        description="Walk the events topic, check that each event links to the one before it "
        "in its upload's hash chain, and that each LayerCommitted's stored bytes still have "
        "its digest. Prints each break with its PARTITION:OFFSET. Exit status: 0 no break, "
        "1 breaks found, 2 bad usage or settings, 3 the log could not be read.",
    )
    verify.add_argument("--repo", metavar="NAME", help="only uploads to this repository")
    verify.add_argument(
        "--no-blobs", action="store_true", help="check the chains only, not the stored bytes"
    )
    verify.add_argument("--json", action="store_true", help="JSON lines: each break, a summary")
    verify.set_defaults(handler=_client(_audit_verify))

    provision = command("provision", "create the topics and bucket (idempotent)")
    provision.set_defaults(
        handler=lambda _: __import__("services.core.provision").core.provision.main()
    )

    from services.digests import cli as digest_cli

    digest_cli.register(sub)
    return parser


async def _audit_verify(args: argparse.Namespace) -> int:
    from services.audit.verify import run_verify

    return await run_verify(
        Settings.from_env(),
        repository=args.repo,
        check_blobs=not args.no_blobs,
        as_json=args.json,
    )


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON object, no progress")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar (there is none unless stderr is a terminal)",
    )


# Services


def _run_service(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.service == "query" and args.read_only:
        from services.audit.timetravel import check_index

        problem = check_index(args.index or settings.index_path)
        if problem is not None:
            # Caught here, once: otherwise every request would answer a 500 about a missing file.
            print(f"layerlog: {problem}", file=sys.stderr)
            return EXIT_USAGE

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
    return EXIT_OK


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


# Client commands


def _client(
    function: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    """Runs an async command and turns what can go wrong into a message and an exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(function(args))
        except SettingsError:
            raise  # main() reports it
        except Exception as error:
            status, code, message = _classify(error)
            if status is None:
                raise
            if getattr(args, "json", False):
                print(json.dumps({"error": code, "message": message}))
            print(f"layerlog: {code}: {message}", file=sys.stderr)
            return status

    return run


def _classify(error: Exception) -> tuple[int | None, str, str]:
    """(exit status, error code, message); status None for errors that are bugs."""
    import aiohttp
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from services.audit.timetravel import UntilError
    from services.client import LayerError, LayerNameInvalid
    from services.core.names import InvalidName

    usage = (UsageError, LayerNameInvalid, InvalidName, UntilError, FileExistsError)
    if isinstance(error, usage):
        return EXIT_USAGE, type(error).__name__, str(error)
    if isinstance(error, LayerError):
        return EXIT_NO, type(error).__name__, str(error)
    # Before OSError: aiohttp's connection errors are OSErrors too, but not the user's fault.
    if isinstance(error, aiohttp.ClientConnectionError | KafkaConnectionError | Unavailable):
        return EXIT_UNAVAILABLE, "Unavailable", str(error) or type(error).__name__
    if isinstance(error, KafkaError | TimeoutError | LookupError):
        return EXIT_UNAVAILABLE, "Unavailable", f"{type(error).__name__}: {error}"
    if isinstance(error, OSError):
        return EXIT_USAGE, type(error).__name__, str(error)
    return None, "", ""


class Progress:
    """A one-line progress bar on a terminal: percent, bytes, rate and ETA, redrawn with \\r.

    Drawn only when the stream is a terminal (not when piped or redirected) and not disabled
    (--quiet, --json); otherwise every call does nothing.
    """

    WIDTH = 24
    INTERVAL = 0.1  # seconds between redraws: fast enough to look live, cheap on a slow tty

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = max(0, total)
        self.stream = stream or sys.stderr
        self.enabled = enabled and _is_terminal(self.stream)
        self.clock = clock
        self.started = clock()
        self.drawn_at = -1.0
        self.done = 0
        self.width = 0

    def update(self, done: int, *, force: bool = False) -> None:
        self.done = done
        if not self.enabled:
            return
        moment = self.clock()
        if not force and moment - self.drawn_at < self.INTERVAL:
            return
        self.drawn_at = moment
        self._draw(self.line(moment))

    def status(self, text: str) -> None:
        """Replaces the bar with a note (e.g. waiting for the verifier)."""
        if self.enabled:
            self._draw(f"{self.label}  {text}")

    def close(self) -> None:
        if self.enabled:
            self.update(self.done, force=True)
            self.stream.write("\n")
            self.stream.flush()

    def line(self, moment: float) -> str:
        elapsed = max(moment - self.started, 1e-9)
        rate = self.done / elapsed
        fraction = 1.0 if self.total == 0 else min(1.0, self.done / self.total)
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        if self.done >= self.total:
            eta = f"in {_duration(elapsed)}"
        elif rate > 0:
            eta = f"ETA {_duration((self.total - self.done) / rate)}"
        else:
            eta = "ETA --:--"
        return (
            f"{self.label} {fraction * 100:3.0f}% [{bar}] {_size(self.done)} / "
            f"{_size(self.total)}  {_size(rate)}/s  {eta}"
        )

    def _draw(self, text: str) -> None:
        # Pads over what a longer previous line left behind, rather than relying on ANSI codes.
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _CountingReader:
    """A file's readinto() that reports how far it got (for the hashing pass's progress)."""

    def __init__(self, source: BinaryIO, progress: Progress) -> None:
        self.source = source
        self.progress = progress
        self.position = 0

    def readinto(self, buffer: Any) -> int:
        count = self.source.readinto(buffer)  # type: ignore[attr-defined]
        self.position += count or 0
        self.progress.update(self.position)
        return count or 0


def _show_progress(args: argparse.Namespace) -> bool:
    return not (args.quiet or args.json)


async def _push(args: argparse.Namespace) -> int:
    from services.client import LayerService
    from services.digests.digest import compute_digests

    path = Path(args.file)
    started = time.monotonic()
    source = await asyncio.to_thread(path.open, "rb")
    try:
        size = os.fstat(source.fileno()).st_size
        digest = args.digest
        if digest is None:
            hashing = Progress("hash", size, enabled=_show_progress(args))

            def sha256_of_file() -> str:
                with path.open("rb") as whole:
                    counted = _CountingReader(whole, hashing)
                    return str(compute_digests(counted, ["sha256"])["sha256"])  # type: ignore[arg-type]

            try:
                digest = await asyncio.to_thread(sha256_of_file)
            finally:
                hashing.close()
        progress = Progress("push", size, enabled=_show_progress(args))
        try:
            async with LayerService() as service:
                upload = await service.upload(args.repo)
                sent = 0
                progress.update(0, force=True)
                while chunk := await asyncio.to_thread(source.read, service.chunk_size):
                    await upload.write(chunk)
                    sent += len(chunk)
                    progress.update(sent)
                progress.update(sent, force=True)
                progress.status(f"{_size(size)} sent; waiting for the verifier")
                layer = await upload.finish(size, digest)
        finally:
            # Ends the bar's line on every path, so an error message starts on a line of its own.
            progress.close()
    finally:
        source.close()
    if args.json:
        print(
            json.dumps(
                {
                    "digest": layer.digest,
                    "repository": args.repo,
                    "size": layer.size,
                    "upload_id": upload.uuid,
                    "seconds": round(time.monotonic() - started, 3),
                }
            )
        )
    else:
        print(layer.digest)
    return EXIT_OK


async def _pull(args: argparse.Namespace) -> int:
    from services.client import LayerService

    started = time.monotonic()
    async with LayerService() as service:
        layer = await service.fetch(args.repo, args.digest)
        progress = Progress("pull", layer.size, enabled=_show_progress(args))
        out = await asyncio.to_thread(open, args.output, "wb")
        received = 0
        try:
            progress.update(0, force=True)
            while chunk := await layer.read(1 << 20):
                await asyncio.to_thread(out.write, chunk)
                received += len(chunk)
                progress.update(received)
        finally:
            out.close()
            await layer.close()
            progress.close()
    if args.json:
        print(
            json.dumps(
                {
                    "digest": layer.digest,
                    "repository": args.repo,
                    "size": received,
                    "output": await asyncio.to_thread(os.path.abspath, args.output),
                    "seconds": round(time.monotonic() - started, 3),
                }
            )
        )
    return EXIT_OK


async def _exists(args: argparse.Namespace) -> int:
    from services.client import LayerService

    async with LayerService() as service:
        found = await service.exists(args.repo, args.digest)
    if args.json:
        print(json.dumps({"repository": args.repo, "digest": args.digest, "exists": found}))
    else:
        print("true" if found else "false")
    return EXIT_OK if found else EXIT_NO


async def _history(args: argparse.Namespace) -> int:
    from services.audit import history

    if (args.upload_id is None) == (args.repo is None):
        raise UsageError("history takes an UPLOAD_ID or --repo NAME (one of them)")
    if args.digest is not None and args.repo is None:
        raise UsageError("--digest goes with --repo")
    settings = Settings.from_env()
    if args.upload_id is not None:
        found = await history.upload_history(settings, args.upload_id)
        histories = [] if found is None else [found]
        what = f"upload {args.upload_id}"
    else:
        histories = await history.repository_history(settings, args.repo, args.digest)
        what = f"uploads to {args.repo}" + (f" with digest {args.digest}" if args.digest else "")
    if not histories:
        print(f"layerlog: no events for {what} in {settings.events_topic}", file=sys.stderr)
        return EXIT_NO
    if args.json:
        history.write_json(histories, sys.stdout)
    else:
        history.write_table(histories, sys.stdout)
    return EXIT_OK


async def _replay(args: argparse.Namespace) -> int:
    from services.audit.timetravel import parse_until, replay

    until = parse_until(args.until)
    settings = Settings.from_env()
    started = time.monotonic()
    result = await replay(settings, args.out, until)
    seconds = time.monotonic() - started
    if args.json:
        print(
            json.dumps(
                {
                    "out": str(result.out.resolve()),
                    "until": until.describe(),
                    "cut": {str(p): o for p, o in sorted(result.cut.items())},
                    "events": result.events,
                    "layers": result.layers,
                    "uploads": result.uploads,
                    "seconds": round(seconds, 3),
                }
            )
        )
    else:
        cut = " ".join(f"{p}:{o}" for p, o in sorted(result.cut.items()))
        print(
            f"replayed {result.events} events {until.describe()} into {result.out} "
            f"in {seconds:.1f}s: {result.layers} layers, {result.uploads} uploads\n"
            f"cut (partition:next offset): {cut}\n"
            f"serve it: layerlog query --index {result.out} --read-only"
        )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
