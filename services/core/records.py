"""Commands, events and dead letters as plain data, mirroring schemas/*.avsc field for field.

A record's class name is its Avro record name; services.core.codec turns one into the other.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum


def now() -> datetime:
    # Avro timestamp-millis keeps milliseconds; truncating makes a record equal its round trip.
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def new_id() -> str:
    return str(uuid.uuid4())


def at_ms(moment_ms: int) -> datetime:
    return datetime.fromtimestamp(moment_ms / 1000, UTC)


def derived_id(cause: str, kind: str) -> str:
    """A stable id for the event `kind` caused by `cause`: a redelivery makes the same id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"layerlog:{cause}:{kind}"))


# Who did it. A command carries the subject its sender (the registry, the SDK) verified the
# caller's token for, and the token itself, which the upload worker checks; every event names, as
# `actor`, the subject of the command that caused it. (Not `subject` on events: ManifestStored's
# `subject` is the OCI referrers subject, a manifest digest, on the log since its schema v1.)

ANONYMOUS = "anonymous"
"""The subject of a caller without a login, where the policy lets one in."""

UPLOAD_WORKER = "system:upload-worker"
"""The subject of what the upload worker does by itself: expiring an idle upload."""

GARBAGE_COLLECTOR = "system:gc"
"""The subject of what the garbage collector does: reclaiming bytes nothing links any more."""


# Commands: what clients ask for, on the commands topic, keyed by upload_id.


@dataclass(frozen=True, kw_only=True)
class Command:
    upload_id: str
    repository: str
    command_id: str = field(default_factory=new_id)
    issued_at: datetime = field(default_factory=now)
    schema_version: int = 1
    # None with auth off, and in commands written before schema v2.
    subject: str | None = None
    # A bearer credential: kept out of repr, so that it never reaches a log.
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class StartUpload(Command):
    pass


@dataclass(frozen=True, kw_only=True)
class AppendChunk(Command):
    offset: int
    data: bytes

    def __repr__(self) -> str:  # keep megabytes of chunk out of logs and test failures
        return (
            f"AppendChunk(upload_id={self.upload_id!r}, offset={self.offset}, "
            f"len(data)={len(self.data)}, command_id={self.command_id!r}, "
            f"subject={self.subject!r})"
        )


@dataclass(frozen=True, kw_only=True)
class FinishUpload(Command):
    size: int
    digest: str


@dataclass(frozen=True, kw_only=True)
class CancelUpload(Command):
    pass


@dataclass(frozen=True, kw_only=True)
class ExpireUpload(Command):
    """Put on the commands topic by the worker itself, so expiry is ordered with the upload's
    other commands and cannot race a chunk arriving at the same moment."""

    ttl_seconds: int


COMMAND_TYPES: tuple[type[Command], ...] = (
    StartUpload,
    AppendChunk,
    FinishUpload,
    CancelUpload,
    ExpireUpload,
)


# Events: what happened, on the events topic (kept forever), keyed by upload_id.


@dataclass(frozen=True, kw_only=True)
class Event:
    event_id: str
    upload_id: str
    repository: str
    caused_by: str | None
    occurred_at: datetime = field(default_factory=now)
    schema_version: int = 1
    # The upload's hash chain: the sha256 of the previous chained event's encoded bytes.
    prev_hash: str | None = None
    # The causing command's subject (a verdict's: its UploadFinished's); None with auth off and
    # in events written before schema v3.
    actor: str | None = None


@dataclass(frozen=True, kw_only=True)
class UploadStarted(Event):
    staging_key: str


@dataclass(frozen=True, kw_only=True)
class ChunkAppended(Event):
    offset: int
    length: int
    durable_offset: int
    chunk_sha256: str


@dataclass(frozen=True, kw_only=True)
class UploadFinished(Event):
    size: int
    digest: str
    staged_size: int
    staging_key: str
    # The worker's sha256 of the staged bytes, when it staged every chunk itself (schema v4).
    content_sha256: str | None = None


@dataclass(frozen=True, kw_only=True)
class LayerCommitted(Event):
    digest: str
    size: int
    object_key: str
    committed_at: datetime
    blob_sha256: str


class FailureReason(StrEnum):
    INVALID_DIGEST = "INVALID_DIGEST"
    INVALID_LENGTH = "INVALID_LENGTH"
    TARSUM_VERSION_UNSUPPORTED = "TARSUM_VERSION_UNSUPPORTED"
    MALFORMED_LAYER = "MALFORMED_LAYER"
    MISSING_DATA = "MISSING_DATA"


@dataclass(frozen=True, kw_only=True)
class LayerValidationFailed(Event):
    reason: str
    expected: str
    actual: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class UploadCancelled(Event):
    durable_offset: int


@dataclass(frozen=True, kw_only=True)
class UploadExpired(Event):
    durable_offset: int
    idle_seconds: int


# The reasons are StrEnums: each member is its wire string, so events, metrics labels and JSON
# carry the same text as before, and the Avro fields stay plain strings.


class RejectReason(StrEnum):
    UNKNOWN_UPLOAD = "UNKNOWN_UPLOAD"
    UPLOAD_EXISTS = "UPLOAD_EXISTS"
    OFFSET_MISMATCH = "OFFSET_MISMATCH"
    INVALID_REPOSITORY = "INVALID_REPOSITORY"
    INVALID_DIGEST = "INVALID_DIGEST"
    INVALID_UPLOAD_ID = "INVALID_UPLOAD_ID"
    UPLOAD_FINISHED = "UPLOAD_FINISHED"
    UPLOAD_CANCELLED = "UPLOAD_CANCELLED"
    CHUNK_TOO_LARGE = "CHUNK_TOO_LARGE"
    INVALID_SIZE = "INVALID_SIZE"
    CHUNK_CONFLICT = "CHUNK_CONFLICT"
    REPOSITORY_MISMATCH = "REPOSITORY_MISMATCH"
    # The chunk would need a multipart part past the most S3 allows (10,000) for one object.
    LAYER_TOO_LARGE = "LAYER_TOO_LARGE"
    # The worker failed on the command (a bug, logged); the record went to the dead letters.
    HANDLER_ERROR = "HANDLER_ERROR"
    # The command's token is missing, invalid or does not cover the command.
    UNAUTHORIZED = "UNAUTHORIZED"


@dataclass(frozen=True, kw_only=True)
class CommandRejected(Event):
    command_type: str
    reason: str
    detail: str
    expected_offset: int | None = None


EVENT_TYPES: tuple[type[Event], ...] = (
    UploadStarted,
    ChunkAppended,
    UploadFinished,
    LayerCommitted,
    LayerValidationFailed,
    UploadCancelled,
    UploadExpired,
    CommandRejected,
)
VERDICTS = (LayerCommitted, LayerValidationFailed)


# Repository commands and events: the registry's manifests, tags and blob links, keyed by the
# repository name so that one repository's changes are totally ordered in one partition.


@dataclass(frozen=True, kw_only=True)
class RepositoryCommand:
    repository: str
    command_id: str = field(default_factory=new_id)
    issued_at: datetime = field(default_factory=now)
    schema_version: int = 1
    # As on Command: who asks, and the token that says they may.
    subject: str | None = None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class PutManifest(RepositoryCommand):
    """Store a manifest's exact bytes; with a tag reference, also point the tag at it."""

    reference: str  # the tag or digest of the PUT's URL
    digest: str  # of body, with the reference's algorithm when it is a digest, else sha256
    media_type: str
    body: bytes

    def __repr__(self) -> str:
        return (
            f"PutManifest(repository={self.repository!r}, reference={self.reference!r}, "
            f"digest={self.digest!r}, len(body)={len(self.body)}, command_id={self.command_id!r}, "
            f"subject={self.subject!r})"
        )


@dataclass(frozen=True, kw_only=True)
class DeleteManifest(RepositoryCommand):
    """Remove a manifest, and every tag pointing at it, from the repository."""

    digest: str


@dataclass(frozen=True, kw_only=True)
class DeleteTag(RepositoryCommand):
    tag: str


@dataclass(frozen=True, kw_only=True)
class MountBlob(RepositoryCommand):
    """Link a stored blob into the repository without copying it."""

    digest: str
    source_repository: str | None  # None: the registry found it by automatic content discovery


@dataclass(frozen=True, kw_only=True)
class UnlinkBlob(RepositoryCommand):
    """Remove the blob from the repository; its bytes stay while another repository links it."""

    digest: str


REPOSITORY_COMMAND_TYPES: tuple[type[RepositoryCommand], ...] = (
    PutManifest,
    DeleteManifest,
    DeleteTag,
    MountBlob,
    UnlinkBlob,
)


@dataclass(frozen=True, kw_only=True)
class RepositoryEvent:
    event_id: str
    repository: str
    caused_by: str | None
    occurred_at: datetime = field(default_factory=now)
    schema_version: int = 1
    # The repository's hash chain: the sha256 of its previous chained event's encoded bytes.
    prev_hash: str | None = None
    # The causing command's subject (a BlobLinked's: its LayerCommitted's); None with auth off
    # and in events written before schema v2.
    actor: str | None = None


@dataclass(frozen=True, kw_only=True)
class ManifestStored(RepositoryEvent):
    digest: str
    media_type: str
    size: int
    body: bytes  # the exact bytes the client sent: the log alone can rebuild every manifest
    object_key: str  # the copy in object storage, which GET serves and audit checks
    subject: str | None  # digest of the manifest this one refers to (the referrers API)
    artifact_type: str | None

    def __repr__(self) -> str:
        return (
            f"ManifestStored(repository={self.repository!r}, digest={self.digest!r}, "
            f"media_type={self.media_type!r}, size={self.size}, event_id={self.event_id!r}, "
            f"actor={self.actor!r})"
        )


@dataclass(frozen=True, kw_only=True)
class TagMoved(RepositoryEvent):
    tag: str
    digest: str
    previous_digest: str | None  # None when the tag is new


@dataclass(frozen=True, kw_only=True)
class TagDeleted(RepositoryEvent):
    tag: str
    previous_digest: str


@dataclass(frozen=True, kw_only=True)
class ManifestDeleted(RepositoryEvent):
    digest: str


@dataclass(frozen=True, kw_only=True)
class BlobMounted(RepositoryEvent):
    digest: str
    source_repository: str | None
    size: int
    object_key: str
    blob_sha256: str


@dataclass(frozen=True, kw_only=True)
class BlobLinked(RepositoryEvent):
    """A pushed blob was linked into the repository: the verifier's LayerCommitted, put in the
    repository's partition (same transaction) so that links and unlinks are ordered by the log.
    Outside the repository's hash chain; the audit matches it to its upload's LayerCommitted."""

    digest: str
    size: int
    object_key: str
    blob_sha256: str
    upload_id: str  # the upload whose LayerCommitted it accompanies


@dataclass(frozen=True, kw_only=True)
class BlobUnlinked(RepositoryEvent):
    digest: str


class RepositoryRejectReason(StrEnum):
    INVALID_REPOSITORY = "INVALID_REPOSITORY"
    INVALID_REFERENCE = "INVALID_REFERENCE"
    INVALID_DIGEST = "INVALID_DIGEST"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    # The worker failed on the command (a bug, logged); the record went to the dead letters.
    HANDLER_ERROR = "HANDLER_ERROR"
    # The command's token is missing, invalid or does not cover the command.
    UNAUTHORIZED = "UNAUTHORIZED"


@dataclass(frozen=True, kw_only=True)
class RepositoryCommandRejected(RepositoryEvent):
    """The repository command was not applied; the repository is unchanged (outside the chain)."""

    command_type: str
    reason: str
    detail: str


REPOSITORY_EVENT_TYPES: tuple[type[RepositoryEvent], ...] = (
    ManifestStored,
    TagMoved,
    TagDeleted,
    ManifestDeleted,
    BlobMounted,
    BlobLinked,
    BlobUnlinked,
    RepositoryCommandRejected,
)


# Storage events: the garbage collector's (services/gc), keyed by the digest. Not an upload's
# and not a repository's: they say that stored bytes went away, and why that was allowed, so that
# `audit verify` can tell a reclaimed blob from a lost one and every index stops serving it.


class ReclaimReason(StrEnum):
    # No repository links the digest: every copy of it goes.
    UNLINKED = "UNLINKED"
    # The digest is linked, through another copy: no link names this one (two verifiers that
    # committed one digest at once each kept a copy, or a push kept its own while the first
    # copy was being reclaimed).
    UNNAMED_COPY = "UNNAMED_COPY"
    # A manifest no repository stores.
    UNSTORED = "UNSTORED"


class PointerFate(StrEnum):
    """What the sweep did with the digest's blobs/ pointer before it decided."""

    WITHDRAWN = "WITHDRAWN"  # it named this copy: deleted, so no new dedupe or mount picks it
    ELSEWHERE = "ELSEWHERE"  # it named another object, which stays
    ABSENT = "ABSENT"  # there was none


@dataclass(frozen=True, kw_only=True)
class StorageEvent:
    event_id: str
    digest: str
    object_key: str  # the object whose bytes went
    size: int
    reason: str  # a ReclaimReason
    # Since when nothing named the bytes: the digest's last link change (a manifest's last
    # store or delete); the sweep waited grace_seconds past it.
    idle_since: datetime
    grace_seconds: int
    sweep_id: str  # one per sweep: every event a sweep published carries it
    # The log cuts ("PARTITION:NEXT_OFFSET ...") the sweep decided on: the mark, and the check
    # made after the blobs/ pointer was withdrawn. Nothing below checked_at named the bytes.
    marked_at: str
    checked_at: str
    occurred_at: datetime = field(default_factory=now)
    schema_version: int = 1
    actor: str | None = None  # GARBAGE_COLLECTOR


@dataclass(frozen=True, kw_only=True)
class BlobReclaimed(StorageEvent):
    """A committed copy of a blob was deleted: published before the bytes go."""

    blob_sha256: str
    pointer: str  # a PointerFate


@dataclass(frozen=True, kw_only=True)
class ManifestReclaimed(StorageEvent):
    """A manifest's stored copy (manifests/<alg>/<hex>) was deleted: published before it goes.
    The log keeps the bytes (ManifestStored carries them); a later PUT of the same manifest
    stores the copy again."""


STORAGE_EVENT_TYPES: tuple[type[StorageEvent], ...] = (BlobReclaimed, ManifestReclaimed)


# Dead letters: bytes on the commands topic that are not a command at all.


class DeadLetterReason(StrEnum):
    NOT_SINGLE_OBJECT_ENCODED = "NOT_SINGLE_OBJECT_ENCODED"
    UNKNOWN_FINGERPRINT = "UNKNOWN_FINGERPRINT"
    MALFORMED_AVRO = "MALFORMED_AVRO"
    TRUNCATED = "TRUNCATED"
    UNEXPECTED_TYPE = "UNEXPECTED_TYPE"
    HANDLER_ERROR = "HANDLER_ERROR"


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    reason: str
    detail: str
    original: bytes
    occurred_at: datetime = field(default_factory=now)
    schema_version: int = 1


RECORD_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        *COMMAND_TYPES,
        *EVENT_TYPES,
        *REPOSITORY_COMMAND_TYPES,
        *REPOSITORY_EVENT_TYPES,
        *STORAGE_EVENT_TYPES,
        DeadLetter,
    )
}
