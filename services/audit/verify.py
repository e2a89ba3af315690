"""Tamper evidence: every upload's events form a hash chain, and every commit names its bytes.

Each chained event carries prev_hash, the sha256 of the previous chained event's encoded bytes
(null at UploadStarted). An event edited or injected out of band breaks the link after it (or
its own); a blob changed in storage no longer has the digest its LayerCommitted recorded.
CommandRejected events are outside the chains (they change nothing), and so are events written
before schema v2 introduced prev_hash.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from services.core import kafka
from services.core.codec import event_hash
from services.core.eventlog import read_partition
from services.core.objectstore import ObjectNotFound, ObjectStore
from services.core.records import CommandRejected, Event, LayerCommitted, UploadStarted
from services.core.settings import Settings
from services.digests.digest import DigestError, StreamingVerifier, parse_digest

CHAIN_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Break:
    partition: int
    offset: int
    upload_id: str
    event: str
    problem: str

    def __str__(self) -> str:
        return (
            f"{self.partition}:{self.offset} upload {self.upload_id} {self.event}: {self.problem}"
        )


@dataclass
class Report:
    events: int = 0
    uploads: set[str] = field(default_factory=set)
    blobs: int = 0
    breaks: list[Break] = field(default_factory=list)


async def verify_log(
    settings: Settings, *, repository: str | None = None, check_blobs: bool = True
) -> Report:
    report = Report()
    heads: dict[str, str] = {}
    commits: list[tuple[int, int, LayerCommitted]] = []
    for partition in await _partitions(settings):
        async for logged in read_partition(settings, settings.events_topic, partition):
            event = logged.record
            if not isinstance(event, Event):
                report.breaks.append(
                    Break(partition, logged.offset, "?", "?", "not a readable event")
                )
                continue
            if repository is not None and event.repository != repository:
                continue
            report.events += 1
            report.uploads.add(event.upload_id)
            if isinstance(event, CommandRejected) or event.schema_version < CHAIN_SCHEMA_VERSION:
                continue
            problem = _link_problem(event, heads.get(event.upload_id))
            if problem:
                # The head stays where it was, so the genuine event after a forged one still
                # links and only the forgery is reported.
                report.breaks.append(
                    Break(partition, logged.offset, event.upload_id, type(event).__name__, problem)
                )
                continue
            heads[event.upload_id] = event_hash(logged.raw)
            if isinstance(event, LayerCommitted):
                commits.append((partition, logged.offset, event))
    if check_blobs:
        await _check_blobs(settings, commits, report)
    return report


def _link_problem(event: Event, head: str | None) -> str | None:
    if isinstance(event, UploadStarted):
        if event.prev_hash is not None:
            return "a chain's first event links to something"
        if head is not None:
            return "a second UploadStarted for the same upload"
        return None
    if head is None:
        return "no UploadStarted before it"
    if event.prev_hash != head:
        return f"prev_hash {str(event.prev_hash)[:16]}… is not the previous event's {head[:16]}…"
    return None


async def _check_blobs(
    settings: Settings, commits: list[tuple[int, int, LayerCommitted]], report: Report
) -> None:
    store = ObjectStore(settings)
    computed: dict[tuple[str, str], dict[str, str] | None] = {}
    for partition, offset, event in commits:
        try:
            algorithm = parse_digest(event.digest).algorithm
        except DigestError as error:
            report.breaks.append(
                Break(partition, offset, event.upload_id, "LayerCommitted", f"digest: {error}")
            )
            continue
        key = (event.object_key, algorithm)
        if key not in computed:
            computed[key] = await _digests(store, event.object_key, algorithm)
            report.blobs += 1
        digests = computed[key]
        if digests is None:
            problem = f"its bytes ({event.object_key}) are missing"
        elif digests[algorithm] != event.digest:
            problem = f"stored bytes have {digests[algorithm]}, not {event.digest}"
        elif digests["sha256"] != event.blob_sha256:
            problem = f"stored bytes have {digests['sha256']}, not {event.blob_sha256}"
        else:
            continue
        report.breaks.append(Break(partition, offset, event.upload_id, "LayerCommitted", problem))


async def _digests(store: ObjectStore, key: str, algorithm: str) -> dict[str, str] | None:
    verifier = StreamingVerifier({algorithm, "sha256"})
    try:
        async for chunk in store.stream(key):
            await asyncio.to_thread(verifier.update, chunk)
        return {name: str(d) for name, d in (await asyncio.to_thread(verifier.finish)).items()}
    except ObjectNotFound:
        return None
    except DigestError as error:
        return {algorithm: f"(unreadable: {error})", "sha256": ""}


async def _partitions(settings: Settings) -> list[int]:
    return await kafka.topic_partitions(settings, settings.events_topic)


async def run_verify(
    settings: Settings, *, repository: str | None, check_blobs: bool, as_json: bool
) -> int:
    """`layerlog audit verify`: prints each break and a summary; 1 if anything broke."""
    report = await verify_log(settings, repository=repository, check_blobs=check_blobs)
    for broken in report.breaks:
        if as_json:
            print(json.dumps({"break": broken.__dict__}))
        else:
            print(f"BREAK {broken}")
    summary = {
        "events": report.events,
        "uploads": len(report.uploads),
        "blobs_checked": report.blobs,
        "breaks": len(report.breaks),
    }
    if as_json:
        print(json.dumps({"summary": summary}))
    else:
        print(
            f"checked {summary['events']} events of {summary['uploads']} uploads and "
            f"{summary['blobs_checked']} stored blobs: "
            + (f"{len(report.breaks)} breaks" if report.breaks else "no breaks")
        )
    return 1 if report.breaks else 0
