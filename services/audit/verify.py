"""Tamper evidence: every upload's and every repository's events form a hash chain, and every
commit names its bytes.

Each chained event carries prev_hash, the sha256 of the previous chained event's encoded bytes
(null at UploadStarted, and at a repository's first event). An event edited or injected out of
band breaks the link after it (or its own); a blob changed in storage no longer has the digest
its LayerCommitted (or BlobMounted) recorded, and a manifest's stored copy no longer equals the
bytes its ManifestStored carries. CommandRejected and RepositoryCommandRejected events are
outside the chains (they change nothing), and so are upload events written before schema v2
introduced prev_hash. BlobLinked is outside the repository's chain too (the verifier writes it
with the upload's LayerCommitted, holding no repository state): each must match the LayerCommitted
of its upload, so one forged into a repository's partition is reported.

The garbage collector's BlobReclaimed and ManifestReclaimed explain why bytes a commit, mount or
ManifestStored named are absent; each is itself checked against the links the log had at the cut
it was decided on, and a link naming reclaimed bytes afterwards is reported
(services/audit/reclaims.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field, replace

from services.audit.reclaims import Position, Problem, ReclaimAudit
from services.core import kafka
from services.core.codec import event_hash
from services.core.eventlog import read_partition
from services.core.objectstore import ObjectNotFound, ObjectStore
from services.core.principals import Principal
from services.core.records import (
    BlobLinked,
    BlobMounted,
    CommandRejected,
    Event,
    LayerCommitted,
    ManifestStored,
    RepositoryCommandRejected,
    RepositoryEvent,
    StorageEvent,
    UploadStarted,
    derived_id,
)
from services.core.settings import Settings
from services.digests.digest import DigestError, StreamingVerifier, parse_digest
from services.oci.references import InvalidReference, parse_oci_digest

CHAIN_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Break:
    partition: int
    offset: int
    upload_id: str
    event: str
    problem: str
    repository: str = ""  # set (and upload_id "") for a break in a repository's chain

    def __str__(self) -> str:
        chain = f"repository {self.repository}" if self.repository else f"upload {self.upload_id}"
        return f"{self.partition}:{self.offset} {chain} {self.event}: {self.problem}"


@dataclass
class Report:
    events: int = 0
    uploads: set[str] = field(default_factory=set)
    repositories: set[str] = field(default_factory=set)
    blobs: int = 0
    manifests: int = 0
    reclaims: int = 0  # BlobReclaimed and ManifestReclaimed checked
    reclaimed: int = 0  # commits, mounts and manifests whose absent bytes a reclaim explains
    breaks: list[Break] = field(default_factory=list)


Stored = LayerCommitted | BlobMounted


async def verify_log(
    settings: Settings, *, repository: str | None = None, check_blobs: bool = True
) -> Report:
    report = Report()
    heads: dict[str, str] = {}
    repository_heads: dict[str, str] = {}
    blobs: list[tuple[int, int, Stored]] = []
    # Without their bodies (up to 4 MiB each, on a log kept forever): the digest of each body.
    manifests: list[tuple[int, int, ManifestStored, str]] = []
    # Links and commits live in different partitions: matched once the whole log is read.
    links: list[tuple[int, int, BlobLinked]] = []
    commits: dict[str, LayerCommitted] = {}
    # Whatever repository is audited, reclaims are judged against every repository's links.
    collected = ReclaimAudit()
    for partition in await _partitions(settings):
        async for logged in read_partition(settings, settings.events_topic, partition):
            event = logged.record
            collected.see(partition, logged.offset, event)
            if isinstance(event, StorageEvent):
                continue  # judged once the whole log is read
            if isinstance(event, RepositoryEvent):
                if repository is not None and event.repository != repository:
                    continue
                report.events += 1
                report.repositories.add(event.repository)
                if isinstance(event, RepositoryCommandRejected):
                    continue
                if isinstance(event, BlobLinked):
                    links.append((partition, logged.offset, event))
                    continue
                head = repository_heads.get(event.repository)
                problem = _repository_link_problem(event, head) or _manifest_problem(event)
                if problem:
                    report.breaks.append(_break(partition, logged.offset, event, problem))
                    continue
                repository_heads[event.repository] = event_hash(logged.raw)
                if isinstance(event, ManifestStored):
                    body_sha256 = await asyncio.to_thread(_sha256, event.body)
                    slim = replace(event, body=b"")
                    manifests.append((partition, logged.offset, slim, body_sha256))
                elif isinstance(event, BlobMounted):
                    blobs.append((partition, logged.offset, event))
                continue
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
                report.breaks.append(_break(partition, logged.offset, event, problem))
                continue
            heads[event.upload_id] = event_hash(logged.raw)
            if isinstance(event, LayerCommitted):
                blobs.append((partition, logged.offset, event))
                commits[event.upload_id] = event
    seen_links: set[str] = set()
    for partition, offset, link in links:
        problem = _link_commit_problem(link, commits.get(link.upload_id))
        if problem is None and link.event_id in seen_links:
            # Outside any chain, a copy of a genuine link appended after an unlink would bring
            # the blob back: each commit has exactly one.
            problem = "a copy of an earlier BlobLinked"
        seen_links.add(link.event_id)
        if problem:
            report.breaks.append(_break(partition, offset, link, problem))
    # Limited to a repository: the reclaims of the copies its events name.
    scope = None
    if repository is not None:
        scope = {e.object_key for _, _, e in blobs} | {e.object_key for _, _, e, _ in manifests}
    problems = collected.problems(scope)
    report.reclaims = sum(
        1 for _, e in collected.reclaims if scope is None or e.object_key in scope
    )
    for problem in problems:
        # A link to reclaimed bytes is its repository's break; a reclaim is in scope already.
        elsewhere = (
            repository is not None
            and not isinstance(problem.event, StorageEvent)
            and getattr(problem.event, "repository", None) != repository
        )
        if not elsewhere:
            report.breaks.append(_reclaim_break(problem))
    if check_blobs:
        store = ObjectStore(settings)
        await _check_blobs(store, blobs, report, collected)
        await _check_manifests(store, manifests, report, collected)
    return report


def _reclaim_break(problem: Problem) -> Break:
    event = problem.event
    name = type(event).__name__
    if isinstance(event, StorageEvent):
        return Break(problem.at.partition, problem.at.offset, "", name, problem.problem)
    # A link past a reclaim's cut (services/audit/reclaims.py's LinkEvent): the repository's.
    repository = getattr(event, "repository", "")
    kind = "BlobLinked or BlobMounted"
    return Break(
        problem.at.partition, problem.at.offset, "", kind, problem.problem, repository=repository
    )


def _break(partition: int, offset: int, event: Event | RepositoryEvent, problem: str) -> Break:
    name = type(event).__name__
    if isinstance(event, RepositoryEvent):
        return Break(partition, offset, "", name, problem, repository=event.repository)
    return Break(partition, offset, event.upload_id, name, problem)


def _link_problem(event: Event, head: str | None) -> str | None:
    if isinstance(event, UploadStarted):
        if event.prev_hash is not None:
            return "a chain's first event links to something"
        if head is not None:
            return "a second UploadStarted for the same upload"
        return None
    if head is None:
        return "no UploadStarted before it"
    return _prev_hash_problem(event.prev_hash, head)


def _repository_link_problem(event: RepositoryEvent, head: str | None) -> str | None:
    # A repository's chain has no opening event: its first event is whichever came first.
    if head is None:
        return None if event.prev_hash is None else "links to no earlier event of the repository"
    if event.prev_hash is None:
        return "starts a new chain, but the repository has events before it"
    return _prev_hash_problem(event.prev_hash, head)


def _link_commit_problem(link: BlobLinked, commit: LayerCommitted | None) -> str | None:
    """A BlobLinked must repeat what its upload's (unbroken) LayerCommitted says."""
    if link.prev_hash is not None:
        return "links into the repository's chain, which a BlobLinked is outside of"
    if commit is None:
        return f"upload {link.upload_id} has no LayerCommitted"
    for name in ("repository", "digest", "object_key", "size", "blob_sha256", "actor"):
        if getattr(link, name) != getattr(commit, name):
            return f"its {name} is not the one upload {link.upload_id}'s LayerCommitted names"
    if link.event_id != derived_id(commit.event_id, "BlobLinked"):
        return f"its event id is not the one upload {link.upload_id}'s LayerCommitted derives"
    return None


def _prev_hash_problem(prev_hash: str | None, head: str) -> str | None:
    if prev_hash != head:
        return f"prev_hash {str(prev_hash)[:16]}… is not the previous event's {head[:16]}…"
    return None


def _manifest_problem(event: RepositoryEvent) -> str | None:
    """What the log alone says is wrong with a ManifestStored: its body must be its digest."""
    if not isinstance(event, ManifestStored):
        return None
    try:
        claimed = parse_oci_digest(event.digest)
    except InvalidReference as error:
        return f"digest: {error}"
    if not claimed.matches(event.body):
        return f"its body's {claimed.algorithm} is not {event.digest}"
    if event.size != len(event.body):
        return f"size {event.size}, but its body has {len(event.body)} bytes"
    return None


async def _check_manifests(
    store: ObjectStore,
    manifests: list[tuple[int, int, ManifestStored, str]],
    report: Report,
    reclaims: ReclaimAudit,
) -> None:
    """Each manifest's stored copy must be the very bytes its ManifestStored carries, unless a
    reclaim decided after it explains the copy's absence."""
    stored: dict[str, str | None] = {}  # object key -> sha256 of its bytes (None: missing)
    for partition, offset, event, body_sha256 in manifests:
        if event.object_key not in stored:
            try:
                data = await store.get(event.object_key)
                stored[event.object_key] = await asyncio.to_thread(_sha256, data)
            except ObjectNotFound:
                stored[event.object_key] = None
            report.manifests += 1
        found = stored[event.object_key]
        if found is None and reclaims.manifest_absence_explained(
            Position(partition, offset), event.digest
        ):
            report.reclaimed += 1
            continue
        if found is None:
            problem = f"its stored copy ({event.object_key}) is missing"
        elif found != body_sha256:
            problem = f"its stored copy ({event.object_key}) differs from the bytes it carries"
        else:
            continue
        report.breaks.append(_break(partition, offset, event, problem))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _check_blobs(
    store: ObjectStore,
    blobs: list[tuple[int, int, Stored]],
    report: Report,
    reclaims: ReclaimAudit,
) -> None:
    computed: dict[tuple[str, str], dict[str, str] | None] = {}
    reclaimed = reclaims.reclaimed_blob_keys()
    for partition, offset, event in blobs:
        if event.object_key in reclaimed:
            # Not read (its delete may be under way): a reclaim decided after this event
            # explains its absence; one that came before it, the reclaim checks report.
            if reclaims.blob_absence_explained(Position(partition, offset), event.object_key):
                report.reclaimed += 1
                continue
        try:
            algorithm = parse_digest(event.digest).algorithm
        except DigestError as error:
            report.breaks.append(_break(partition, offset, event, f"digest: {error}"))
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
        report.breaks.append(_break(partition, offset, event, problem))


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
    return await kafka.topic_partitions(settings, Principal.AUDITOR, settings.events_topic)


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
        "repositories": len(report.repositories),
        "blobs_checked": report.blobs,
        "manifests_checked": report.manifests,
        "reclaims_checked": report.reclaims,
        "reclaimed": report.reclaimed,
        "breaks": len(report.breaks),
    }
    if as_json:
        print(json.dumps({"summary": summary}))
    else:
        print(
            f"checked {summary['events']} events of {summary['uploads']} uploads and "
            f"{summary['repositories']} repositories, {summary['blobs_checked']} stored blobs "
            f"and {summary['manifests_checked']} stored manifests, "
            f"{summary['reclaims_checked']} reclaims: "
            + (f"{len(report.breaks)} breaks" if report.breaks else "no breaks")
        )
    return 1 if report.breaks else 0
