"""Snapshots of an index in S3, so that a new replica does not replay years of log.

A snapshot is two objects under `snapshots/<events topic>/<id>/`:

- `index.sqlite`: a copy of the index made with VACUUM INTO, which reads in one read transaction
  while the projection goes on writing (WAL). The index stores its per-partition offsets in the
  same transaction as the events they follow, so the copy is consistent by construction: it
  holds exactly the events below the offsets it holds.
- `manifest.json`, written LAST: the format, the events topic, those offsets, and the sha256 and
  size of `index.sqlite`. A snapshot without a manifest is partial (its writer died, or is still
  uploading) and is never used.

The id starts with the UTC time it was taken, so ids sort oldest first. Query and registry
indexes are the same projection of the same topic, so either kind of replica can start from a
snapshot either kind took.

A new replica (`restore`) tries the snapshots newest first and takes the first that passes every
check, in this order: a manifest that parses and names this topic; offsets inside the log as it is
now (not past its end, not below its start, which retention may have moved past the snapshot:
the events in between are gone, so the tail could not be replayed); the file's size and sha256 as
the manifest says; SQLite's `PRAGMA integrity_check`; the file's own offsets equal to the
manifest's. Each snapshot skipped is logged with its id and reason and counted in
`layerlog_snapshots_skipped_total{reason}`. With none usable, the replica starts from the log's
beginning, as it did before snapshots existed. `layerlog replay` never uses snapshots: it stays
the from-zero proof that an index is what the log says.

Every blocking step (SQLite, hashing, minio) runs in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import socket
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from aiokafka import TopicPartition

from services.core import kafka, metrics
from services.core.objectstore import ObjectNotFound, ObjectStore
from services.core.principals import Principal
from services.core.settings import Settings

log = logging.getLogger(__name__)

FORMAT = "layerlog-index-snapshot/1"
INDEX_NAME = "index.sqlite"
MANIFEST_NAME = "manifest.json"
_HASH_BLOCK = 4 << 20


class SnapshotProblem(StrEnum):
    """Why a snapshot was skipped; the `reason` label of layerlog_snapshots_skipped_total."""

    MANIFEST_MISSING = "manifest_missing"  # partial: the manifest is written last
    MANIFEST_INVALID = "manifest_invalid"
    WRONG_TOPIC = "wrong_topic"
    UNKNOWN_PARTITION = "unknown_partition"
    OFFSETS_BEYOND_END = "offsets_beyond_end"
    OFFSETS_BELOW_START = "offsets_below_start"
    FILE_MISSING = "file_missing"
    SIZE_MISMATCH = "size_mismatch"  # truncated (or padded)
    CHECKSUM_MISMATCH = "checksum_mismatch"
    INTEGRITY_FAILED = "integrity_failed"  # not SQLite, or integrity_check is not "ok"
    OFFSETS_MISMATCH = "offsets_mismatch"  # the file's offsets are not the manifest's
    UNREADABLE = "unreadable"  # S3 failed while it was being read


class SnapshotRejected(Exception):
    def __init__(self, problem: SnapshotProblem, detail: str) -> None:
        super().__init__(f"{problem}: {detail}")
        self.problem = problem
        self.detail = detail


class NothingToSnapshot(ValueError):
    """The index holds no offsets of the events topic: it has projected nothing yet."""


@dataclass(frozen=True)
class LogBounds:
    """Per partition of the events topic: the first offset still in the log, and its end."""

    start: dict[int, int]
    end: dict[int, int]


@dataclass(frozen=True)
class SnapshotManifest:
    snapshot_id: str
    events_topic: str
    offsets: dict[int, int]  # per partition, the next offset the index would read
    sha256: str
    size: int
    created_at: str
    source: str  # host and pid of the process that took it

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "snapshot_id": self.snapshot_id,
                "events_topic": self.events_topic,
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                "sha256": self.sha256,
                "size": self.size,
                "created_at": self.created_at,
                "source": self.source,
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SnapshotManifest:
        try:
            document = json.loads(data)
            if document["format"] != FORMAT:
                raise ValueError(f"format {document['format']!r}, not {FORMAT}")
            offsets = {int(p): int(o) for p, o in document["offsets"].items()}
            digest, size = str(document["sha256"]), int(document["size"])
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"sha256 {digest[:80]!r} is not 64 hex digits")
            if size < 0 or any(o < 0 for o in offsets.values()):
                raise ValueError("a negative size or offset")
            return cls(
                snapshot_id=str(document["snapshot_id"]),
                events_topic=str(document["events_topic"]),
                offsets=offsets,
                sha256=digest,
                size=size,
                created_at=str(document["created_at"]),
                source=str(document.get("source", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as bad:
            raise SnapshotRejected(SnapshotProblem.MANIFEST_INVALID, str(bad)[:200]) from None


@dataclass(frozen=True)
class Listing:
    """One snapshot id found in the bucket, and which of its two objects are there."""

    snapshot_id: str
    has_index: bool
    has_manifest: bool

    @property
    def complete(self) -> bool:
        return self.has_index and self.has_manifest


class SnapshotStorage(Protocol):
    """The object-store verbs snapshots need (ObjectStore has them)."""

    async def put(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None: ...
    async def get(self, key: str, offset: int = 0, length: int = 0) -> bytes: ...
    async def put_file(self, key: str, path: str, part_size: int = ...) -> None: ...
    async def get_file(self, key: str, path: str) -> None: ...
    async def list_keys(self, prefix: str) -> list[str]: ...
    async def delete(self, key: str) -> None: ...


# Pure logic


def topic_prefix(events_topic: str) -> str:
    return f"snapshots/{events_topic}/"


def new_snapshot_id(now: datetime) -> str:
    """Sortable by time (UTC, microseconds), unique across replicas taking one at once."""
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(4)


def listings(keys: list[str], prefix: str) -> list[Listing]:
    """The snapshots the keys under prefix make up, newest first."""
    found: dict[str, set[str]] = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        snapshot_id, _, name = key[len(prefix) :].partition("/")
        if snapshot_id and name:
            found.setdefault(snapshot_id, set()).add(name)
    return [
        Listing(snapshot_id, INDEX_NAME in names, MANIFEST_NAME in names)
        for snapshot_id, names in sorted(found.items(), reverse=True)
    ]


def to_prune(found: list[Listing], keep: int) -> list[str]:
    """Ids to delete: complete snapshots past the newest `keep`, and incomplete ones older than
    the newest complete one (their upload died, or lost the race to a newer one). An incomplete
    one newer than every complete one may be an upload still going on: it stays."""
    complete = [listing.snapshot_id for listing in found if listing.complete]
    if not complete:
        return []
    kept, newest = set(complete[:keep]), complete[0]
    return [
        listing.snapshot_id
        for listing in found
        if listing.snapshot_id not in kept and (listing.complete or listing.snapshot_id < newest)
    ]


def check_offsets(offsets: dict[int, int], bounds: LogBounds) -> None:
    """Raises SnapshotRejected unless the log as it is now can continue from these offsets."""
    unknown = sorted(set(offsets) - set(bounds.end))
    if unknown:
        raise SnapshotRejected(
            SnapshotProblem.UNKNOWN_PARTITION,
            f"partitions {unknown} are not in the topic (it has {sorted(bounds.end)})",
        )
    for partition, end in sorted(bounds.end.items()):
        # A partition the snapshot does not name (added since) is read from its beginning.
        at = offsets.get(partition, 0)
        if at > end:
            raise SnapshotRejected(
                SnapshotProblem.OFFSETS_BEYOND_END,
                f"partition {partition}: the snapshot is at offset {at}, the log ends at {end}",
            )
        start = bounds.start.get(partition, 0)
        if at < start:
            raise SnapshotRejected(
                SnapshotProblem.OFFSETS_BELOW_START,
                f"partition {partition}: the snapshot is at offset {at}, the log now starts at "
                f"{start} (the events in between are gone)",
            )


# Blocking steps, for threads


def copy_index(index_path: str, out: str, events_topic: str) -> dict[int, int]:
    """A consistent copy of the index (VACUUM INTO: one read transaction, beside the writer);
    returns the offsets the copy holds."""
    if not Path(index_path).is_file():
        raise FileNotFoundError(f"no index file {index_path}")
    # Its own connection: VACUUM INTO reads while the projection's writer goes on (WAL).
    db = sqlite3.connect(index_path, timeout=30)
    try:
        db.execute("VACUUM INTO ?", (out,))
    finally:
        db.close()
    offsets = index_offsets(out, events_topic)
    if not offsets:
        Path(out).unlink(missing_ok=True)
        raise NothingToSnapshot(
            f"{index_path} holds no offsets of {events_topic}: it has projected nothing yet"
        )
    return offsets


def index_offsets(path: str, events_topic: str) -> dict[int, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT partition, next_offset FROM offsets WHERE topic = ?", (events_topic,)
        )
        return {int(p): int(o) for p, o in rows}
    finally:
        db.close()


def file_sha256(path: str) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            hasher.update(block)
            size += len(block)
    return hasher.hexdigest(), size


def check_file(path: str, manifest: SnapshotManifest) -> None:
    """Raises SnapshotRejected unless the downloaded file is the index the manifest describes."""
    size = os.path.getsize(path)
    if size != manifest.size:
        raise SnapshotRejected(
            SnapshotProblem.SIZE_MISMATCH, f"{size} bytes, the manifest says {manifest.size}"
        )
    digest, _ = file_sha256(path)
    if digest != manifest.sha256:
        raise SnapshotRejected(
            SnapshotProblem.CHECKSUM_MISMATCH,
            f"sha256 {digest}, the manifest says {manifest.sha256}",
        )
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verdict = [row[0] for row in db.execute("PRAGMA integrity_check(20)")]
            if verdict != ["ok"]:
                raise SnapshotRejected(
                    SnapshotProblem.INTEGRITY_FAILED, "; ".join(map(str, verdict))[:300]
                )
            db.execute("SELECT count(*) FROM layers").fetchone()  # a Layerlog index at all
        finally:
            db.close()
        offsets = index_offsets(path, manifest.events_topic)
    except sqlite3.Error as error:
        raise SnapshotRejected(SnapshotProblem.INTEGRITY_FAILED, str(error)[:300]) from None
    if offsets != manifest.offsets:
        raise SnapshotRejected(
            SnapshotProblem.OFFSETS_MISMATCH,
            f"the file holds offsets {offsets}, the manifest says {manifest.offsets}",
        )


def remove_index_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def index_is_new(path: Path, events_topic: str) -> bool:
    """No index yet, or one that has stored no offsets of the topic: nothing to resume from."""
    if not path.is_file():
        return True
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            row = db.execute(
                "SELECT count(*) FROM offsets WHERE topic = ?", (events_topic,)
            ).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return False  # not ours to replace: Index() reports what is wrong with it
    return int(row[0]) == 0


# The S3 side


async def log_bounds(settings: Settings, principal: Principal) -> LogBounds:
    """Where the events topic starts and ends now (read_committed: its last stable offsets)."""
    consumer = kafka.consumer(settings, principal, [], None)
    await consumer.start()
    try:
        partitions = await kafka.topic_partitions(settings, principal, settings.events_topic)
        tps = [TopicPartition(settings.events_topic, p) for p in partitions]
        start = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        return LogBounds(
            {tp.partition: o for tp, o in start.items()}, {tp.partition: o for tp, o in end.items()}
        )
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Skipped:
    snapshot_id: str
    problem: SnapshotProblem
    detail: str


@dataclass(frozen=True)
class Taken:
    manifest: SnapshotManifest
    pruned: list[str]  # ids of the older snapshots deleted after it


@dataclass(frozen=True)
class Restored:
    manifest: SnapshotManifest | None  # None: no usable snapshot, the index starts empty
    skipped: list[Skipped]


class Snapshots:
    """Takes, lists, prunes and restores the snapshots of one events topic's index."""

    def __init__(self, settings: Settings, store: SnapshotStorage | None = None) -> None:
        self.settings = settings
        self.topic = settings.events_topic
        self.store: SnapshotStorage = store if store is not None else ObjectStore(settings)
        self.prefix = topic_prefix(self.topic)

    def _key(self, snapshot_id: str, name: str) -> str:
        return f"{self.prefix}{snapshot_id}/{name}"

    async def take(self, index_path: str) -> Taken:
        """Copies the index, uploads the copy, then its manifest; prunes to snapshot_keep."""
        now = datetime.now(UTC)
        snapshot_id = new_snapshot_id(now)
        # Beside the index: the same file system, which has room for the index already.
        copy = f"{index_path}.snapshot-{snapshot_id}"
        try:
            offsets = await asyncio.to_thread(copy_index, index_path, copy, self.topic)
            digest, size = await asyncio.to_thread(file_sha256, copy)
            manifest = SnapshotManifest(
                snapshot_id=snapshot_id,
                events_topic=self.topic,
                offsets=offsets,
                sha256=digest,
                size=size,
                created_at=now.isoformat().replace("+00:00", "Z"),
                source=f"{socket.gethostname()}/{os.getpid()}",
            )
            await self.store.put_file(self._key(snapshot_id, INDEX_NAME), copy)
            # Last: until it is there the snapshot is partial, and nobody uses it.
            await self.store.put(self._key(snapshot_id, MANIFEST_NAME), manifest.to_json())
        finally:
            await asyncio.to_thread(Path(copy).unlink, missing_ok=True)
        metrics.SNAPSHOTS_TAKEN.inc()
        metrics.SNAPSHOT_LAST_TAKEN_SECONDS.set(now.timestamp())
        log.info(
            "snapshot %s of %s uploaded: %d bytes, offsets %s",
            snapshot_id,
            index_path,
            size,
            _describe(offsets),
        )
        return Taken(manifest, await self.prune(self.settings.snapshot_keep))

    async def list(self) -> list[Listing]:
        return listings(await self.store.list_keys(self.prefix), self.prefix)

    async def prune(self, keep: int) -> list[str]:
        doomed = to_prune(await self.list(), keep)
        for snapshot_id in doomed:
            # The manifest first: a snapshot half deleted is partial, never a wrong one.
            for name in (MANIFEST_NAME, INDEX_NAME):
                await self.store.delete(self._key(snapshot_id, name))
            log.info("snapshot %s pruned (keeping the newest %d)", snapshot_id, keep)
        return doomed

    async def manifest(self, snapshot_id: str) -> SnapshotManifest:
        try:
            data = await self.store.get(self._key(snapshot_id, MANIFEST_NAME))
        except ObjectNotFound:
            raise SnapshotRejected(SnapshotProblem.MANIFEST_MISSING, "no manifest") from None
        manifest = SnapshotManifest.from_json(data)
        if manifest.events_topic != self.topic:
            raise SnapshotRejected(
                SnapshotProblem.WRONG_TOPIC,
                f"taken of {manifest.events_topic!r}, not {self.topic!r}",
            )
        if manifest.snapshot_id != snapshot_id:
            raise SnapshotRejected(
                SnapshotProblem.MANIFEST_INVALID,
                f"the manifest names snapshot {manifest.snapshot_id!r}",
            )
        return manifest

    async def restore(self, into: Path, bounds: LogBounds) -> Restored:
        """Puts the newest usable snapshot at `into` (replacing what is there); skips and logs
        the unusable ones."""
        skipped: list[Skipped] = []
        found = await self.list()
        download = into.with_name(into.name + ".restoring")
        for listing in found:
            try:
                manifest = await self._try(listing, download, bounds)
            except SnapshotRejected as rejected:
                skipped.append(Skipped(listing.snapshot_id, rejected.problem, rejected.detail))
                metrics.SNAPSHOTS_SKIPPED.labels(str(rejected.problem)).inc()
                log.error(
                    "snapshot %s%s skipped: %s: %s",
                    self.prefix,
                    listing.snapshot_id,
                    rejected.problem,
                    rejected.detail,
                )
                await asyncio.to_thread(remove_index_files, download)
                continue
            await asyncio.to_thread(_move_into_place, download, into)
            metrics.SNAPSHOT_RESTORES.inc()
            log.info(
                "index %s starts from snapshot %s (taken %s by %s), offsets %s; %d newer "
                "snapshot(s) skipped",
                into,
                manifest.snapshot_id,
                manifest.created_at,
                manifest.source,
                _describe(manifest.offsets),
                len(skipped),
            )
            return Restored(manifest, skipped)
        if any(bounds.start.values()):
            log.warning(
                "the log %s no longer starts at 0 (%s): an index rebuilt from it lacks the "
                "events retention removed",
                self.topic,
                _describe(bounds.start),
            )
        log.info(
            "no usable snapshot of %s (%d found, %d skipped): %s starts from the log's beginning",
            self.topic,
            len(found),
            len(skipped),
            into,
        )
        return Restored(None, skipped)

    async def _try(self, listing: Listing, download: Path, bounds: LogBounds) -> SnapshotManifest:
        if not listing.has_manifest:
            raise SnapshotRejected(
                SnapshotProblem.MANIFEST_MISSING,
                "no manifest (it is written last: the upload died or is still going on)",
            )
        try:
            manifest = await self.manifest(listing.snapshot_id)
            # The cheap checks before gigabytes are downloaded.
            check_offsets(manifest.offsets, bounds)
            await asyncio.to_thread(remove_index_files, download)
            try:
                await self.store.get_file(self._key(listing.snapshot_id, INDEX_NAME), str(download))
            except ObjectNotFound:
                raise SnapshotRejected(SnapshotProblem.FILE_MISSING, "no index.sqlite") from None
        except SnapshotRejected:
            raise
        except Exception as error:  # S3 failing on this one: an older one may still do
            raise SnapshotRejected(SnapshotProblem.UNREADABLE, repr(error)[:300]) from error
        await asyncio.to_thread(check_file, str(download), manifest)
        return manifest


def _move_into_place(download: Path, into: Path) -> None:
    remove_index_files(into)
    os.replace(download, into)


def _describe(offsets: dict[int, int]) -> str:
    return " ".join(f"{p}:{o}" for p, o in sorted(offsets.items())) or "(none)"
