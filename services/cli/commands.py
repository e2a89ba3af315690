"""The client commands: push, pull, exists, history, replay, snapshot, audit verify and gc."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli.exits import EXIT_NO, EXIT_OK, Unavailable, UsageError
from services.cli.progress import CountingReader, Progress, format_size
from services.core.settings import Settings

if TYPE_CHECKING:
    from services.query.snapshots import Snapshots


def _show_progress(args: argparse.Namespace) -> bool:
    return not (args.quiet or args.json)


async def push(args: argparse.Namespace) -> int:
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
                    counted = CountingReader(whole, hashing)
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
                progress.status(f"{format_size(size)} sent; waiting for the verifier")
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


async def pull(args: argparse.Namespace) -> int:
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


async def exists(args: argparse.Namespace) -> int:
    from services.client import LayerService

    async with LayerService() as service:
        found = await service.exists(args.repo, args.digest)
    if args.json:
        print(json.dumps({"repository": args.repo, "digest": args.digest, "exists": found}))
    else:
        print("true" if found else "false")
    return EXIT_OK if found else EXIT_NO


async def history(args: argparse.Namespace) -> int:
    from services.audit import history

    if (args.upload_id is None) == (args.repo is None):
        raise UsageError("history takes an UPLOAD_ID or --repo NAME (one of them)")
    if args.digest is not None and args.repo is None:
        raise UsageError("--digest goes with --repo")
    if args.tag is not None:
        return await _tag_history(args)
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


async def _tag_history(args: argparse.Namespace) -> int:
    from services.audit import taghistory

    if args.repo is None or args.digest is not None:
        raise UsageError("--tag goes with --repo (and not with --digest)")
    settings = Settings.from_env()
    changes = await taghistory.tag_history(settings, args.repo, args.tag)
    if not changes:
        print(
            f"layerlog: no moves of {args.repo}:{args.tag} in {settings.events_topic}",
            file=sys.stderr,
        )
        return EXIT_NO
    if args.json:
        taghistory.write_json(args.repo, changes, sys.stdout)
    else:
        taghistory.write_table(args.repo, args.tag, changes, sys.stdout)
    return EXIT_OK


async def replay(args: argparse.Namespace) -> int:
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
                    "manifests": result.manifests,
                    "tags": result.tags,
                    "reclaims": result.reclaims,
                    "seconds": round(seconds, 3),
                }
            )
        )
    else:
        cut = " ".join(f"{p}:{o}" for p, o in sorted(result.cut.items()))
        print(
            f"replayed {result.events} events {until.describe()} into {result.out} "
            f"in {seconds:.1f}s: {result.layers} layers, {result.uploads} uploads, "
            f"{result.manifests} manifests, {result.tags} tags\n"
            f"cut (partition:next offset): {cut}\n"
            f"serve it: layerlog query --index {result.out} --read-only"
        )
    return EXIT_OK


async def snapshot(args: argparse.Namespace) -> int:
    from services.core.objectstore import is_transient
    from services.query.snapshots import NothingToSnapshot, Snapshots

    settings = Settings.from_env()
    snapshots = Snapshots(settings)
    try:
        if args.list:
            return await _list_snapshots(snapshots, args.json)
        index = args.index or settings.index_path
        if not await asyncio.to_thread(Path(index).is_file):
            raise UsageError(f"no index file {index} (--index FILE, or LAYERLOG_INDEX_PATH)")
        started = time.monotonic()
        taken = await snapshots.take(index)
    except NothingToSnapshot as empty:
        raise UsageError(str(empty)) from None
    except Exception as error:
        if is_transient(error) and not isinstance(error, FileNotFoundError | PermissionError):
            raise Unavailable(f"S3 at {settings.s3_endpoint}: {error!r}") from error
        raise
    seconds = time.monotonic() - started
    manifest = taken.manifest
    if args.json:
        print(
            json.dumps(
                {
                    "snapshot_id": manifest.snapshot_id,
                    "index": index,
                    "key": f"{snapshots.prefix}{manifest.snapshot_id}/",
                    "events_topic": manifest.events_topic,
                    "offsets": {str(p): o for p, o in sorted(manifest.offsets.items())},
                    "size": manifest.size,
                    "sha256": manifest.sha256,
                    "pruned": taken.pruned,
                    "seconds": round(seconds, 3),
                }
            )
        )
    else:
        offsets = " ".join(f"{p}:{o}" for p, o in sorted(manifest.offsets.items()))
        print(
            f"snapshot {manifest.snapshot_id} of {index}: {format_size(manifest.size)} in "
            f"s3://{settings.bucket}/{snapshots.prefix}{manifest.snapshot_id}/ in {seconds:.1f}s\n"
            f"offsets (partition:next offset): {offsets}\n"
            f"pruned {len(taken.pruned)} older snapshot(s), keeping the newest "
            f"{settings.snapshot_keep}"
        )
    return EXIT_OK


async def _list_snapshots(snapshots: Snapshots, as_json: bool) -> int:
    from services.query.snapshots import SnapshotRejected

    rows = []
    for listing in await snapshots.list():
        row: dict[str, object] = {"snapshot_id": listing.snapshot_id, "complete": listing.complete}
        if listing.has_manifest:
            try:
                manifest = await snapshots.manifest(listing.snapshot_id)
                row.update(
                    size=manifest.size,
                    events=sum(manifest.offsets.values()),
                    created_at=manifest.created_at,
                    source=manifest.source,
                )
            except SnapshotRejected as rejected:
                row.update(complete=False, problem=str(rejected.problem))
        else:
            row["problem"] = "manifest_missing"
        rows.append(row)
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{'SNAPSHOT':40}  {'STATE':8}  {'SIZE':>10}  {'RECORDS':>12}  TAKEN BY")
        for row in rows:
            state = "complete" if row["complete"] else str(row.get("problem", "partial"))
            size = format_size(int(row["size"])) if "size" in row else "-"  # type: ignore[call-overload]
            events = str(row.get("events", "-"))
            print(
                f"{row['snapshot_id']:40}  {state:8}  {size:>10}  {events:>12}  "
                f"{row.get('source', '-')}"
            )
    return EXIT_OK if rows else EXIT_NO


async def audit_verify(args: argparse.Namespace) -> int:
    from services.audit.verify import run_verify

    return await run_verify(
        Settings.from_env(),
        repository=args.repo,
        check_blobs=not args.no_blobs,
        as_json=args.json,
    )


async def gc(args: argparse.Namespace) -> int:
    import tempfile

    from services.cli.progress import format_size
    from services.core.records import at_ms
    from services.gc.service import open_collector

    settings = Settings.from_env()
    with tempfile.TemporaryDirectory(prefix="layerlog-gc-") as scratch:
        path = args.index or str(Path(scratch) / "index.sqlite")
        async with open_collector(settings, path, keep_ledger=args.index is not None) as sweeper:
            report = await sweeper.sweep(dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_json()))
        return EXIT_OK
    verb = "would reclaim" if report.dry_run else "reclaimed"
    print(
        f"{verb} {len(report.reclaimed)} copies, {format_size(report.bytes)} ({report.bytes} "
        f"bytes); kept {len(report.kept)}; log cut {report.marked_at}"
    )
    rows = [(c, "") for c in report.reclaimed] + [
        (k.candidate, k.reason.value) for k in report.kept
    ]
    if rows:
        print(f"{'KIND':9} {'SIZE':>10}  {'REASON':13} {'KEPT':11} {'IDLE SINCE (UTC)':19}  DIGEST")
        for candidate, kept in rows:
            idle = at_ms(candidate.idle_since_ms).strftime("%Y-%m-%d %H:%M:%S")
            print(
                f"{candidate.kind.value:9} {candidate.size:>10}  {candidate.reason.value:13} "
                f"{kept or '-':11} {idle:19}  {candidate.digest} {candidate.object_key}"
            )
    if report.restored:
        print(f"restored the copies of {len(report.restored)} manifests a PUT raced")
    return EXIT_OK
