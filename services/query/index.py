"""The index: layers, uploads, manifests, tags and blob links projected from the events, in
embedded SQLite.

apply() writes a batch of events and the offsets after them in one transaction, so after a crash
the projection resumes exactly where its last committed batch ended: no event applied twice, none
skipped. All calls block; the service runs them in threads.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from services.core.records import (
    BlobLinked,
    BlobMounted,
    BlobReclaimed,
    BlobUnlinked,
    ChunkAppended,
    CommandRejected,
    Event,
    LayerCommitted,
    LayerValidationFailed,
    ManifestDeleted,
    ManifestStored,
    RepositoryCommandRejected,
    RepositoryEvent,
    StorageEvent,
    TagDeleted,
    TagMoved,
    UploadCancelled,
    UploadExpired,
    UploadFinished,
    UploadStarted,
)
from services.oci.manifest import ManifestInvalid, parse_manifest

SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    repository   TEXT NOT NULL,
    digest       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    object_key   TEXT NOT NULL,
    committed_at INTEGER NOT NULL,
    upload_id    TEXT NOT NULL,
    stored_at    INTEGER,  -- the commit that named object_key (null: committed_at's)
    PRIMARY KEY (repository, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS layers_by_digest ON layers (digest);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id      TEXT PRIMARY KEY,
    repository     TEXT NOT NULL,
    state          TEXT NOT NULL,
    durable_offset INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    digest         TEXT,
    size           INTEGER,
    reason         TEXT,
    detail         TEXT,
    expected       TEXT,
    actual         TEXT,
    actor          TEXT  -- who started it (its UploadStarted's actor; null: not recorded)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejections (
    command_id      TEXT PRIMARY KEY,
    upload_id       TEXT NOT NULL,
    command_type    TEXT NOT NULL,
    reason          TEXT NOT NULL,
    detail          TEXT NOT NULL,
    expected_offset INTEGER
) WITHOUT ROWID;
-- Manifests keep their exact bytes: the index alone serves them, a replayed index included.
-- A rowid table, as WITHOUT ROWID suits small rows and a body may be megabytes.
CREATE TABLE IF NOT EXISTS manifests (
    repository    TEXT NOT NULL,
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    size          INTEGER NOT NULL,
    body          BLOB NOT NULL,
    object_key    TEXT NOT NULL,
    subject       TEXT,
    artifact_type TEXT,
    annotations   TEXT,
    stored_at     INTEGER NOT NULL,
    PRIMARY KEY (repository, digest)
);
-- The referrers API: the manifests of a repository whose subject is a digest.
CREATE INDEX IF NOT EXISTS manifests_by_subject ON manifests (repository, subject)
    WHERE subject IS NOT NULL;
CREATE TABLE IF NOT EXISTS tags (
    repository TEXT NOT NULL,
    tag        TEXT NOT NULL,
    digest     TEXT NOT NULL,
    moved_at   INTEGER NOT NULL,
    PRIMARY KEY (repository, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_by_digest ON tags (repository, digest);
-- Whether a blob is in a repository: the last of its BlobLinked (a push), BlobMounted and
-- BlobUnlinked events. All three are keyed by the repository, so they are in one partition, in
-- causal order; a live index and a replay apply them in that order and agree, whatever order the
-- other partitions come in, and no clock is compared. A LayerCommitted only counts where no link
-- event exists at all (a log from before BlobLinked existed).
CREATE TABLE IF NOT EXISTS blob_links (
    repository  TEXT NOT NULL,
    digest      TEXT NOT NULL,
    linked      INTEGER NOT NULL,
    size        INTEGER,
    object_key  TEXT,
    linked_at   INTEGER,
    PRIMARY KEY (repository, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blob_links_by_digest ON blob_links (digest);
-- What each repository command did, for the registry's write side to wait on; in log order.
CREATE TABLE IF NOT EXISTS outcomes (
    command_id   TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    repository   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    command_type TEXT,
    reason       TEXT,
    detail       TEXT,
    UNIQUE (command_id, event_id)
);
-- The garbage collector's view (services/gc), projected into every index alike. Every object a
-- commit or a mount named as a copy of a blob: blob_links and layers keep one per repository and
-- digest, so a copy that stopped being the one they name would otherwise be forgotten. An index
-- made before this table existed lacks the copies of the events it had applied; the collector
-- builds an index of its own from the whole log, so that is only ever true of others'.
CREATE TABLE IF NOT EXISTS blob_objects (
    object_key  TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    blob_sha256 TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blob_objects_by_digest ON blob_objects (digest);
-- Every manifest ever stored, by digest (one copy serves every repository): when any repository
-- last stored or deleted it.
CREATE TABLE IF NOT EXISTS manifest_objects (
    digest          TEXT PRIMARY KEY,
    object_key      TEXT NOT NULL,
    size            INTEGER NOT NULL,
    last_stored_at  INTEGER NOT NULL,
    last_deleted_at INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS manifests_by_digest ON manifests (digest);
-- What the collector reclaimed (BlobReclaimed, ManifestReclaimed). A reclaimed blob copy is
-- never served again, whatever row still names it; blob copies are named by upload, so a key
-- is reclaimed once. A manifest's key is its digest, stored again by a later PUT.
CREATE TABLE IF NOT EXISTS reclaims (
    event_id     TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,  -- 'blob' or 'manifest'
    digest       TEXT NOT NULL,
    object_key   TEXT NOT NULL,
    size         INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    sweep_id     TEXT NOT NULL,
    reclaimed_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reclaims_by_object ON reclaims (object_key);
CREATE INDEX IF NOT EXISTS reclaims_by_digest ON reclaims (digest);
CREATE TABLE IF NOT EXISTS offsets (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
"""


# In a layers upsert: the commit being applied is earlier than the one the row has, or names
# its copy later than the one whose copy the row has.
_EARLIER_COMMIT = "(excluded.committed_at, excluded.upload_id) < (committed_at, upload_id)"
_LATER_COPY = (
    "(excluded.committed_at, excluded.object_key) > (coalesce(stored_at, committed_at), object_key)"
)
# A blob_links row that says the blob is in its repository.
_LINKED = "linked = 1"
# The copy (object key ?) was reclaimed: its bytes are gone, whatever row names it.
_RECLAIMED_BLOB = "SELECT 1 FROM reclaims WHERE object_key = ? AND kind = 'blob'"
# A layers row (alias l) whose blob is in its repository: linked, or from a log before links.
_LAYER_IN_REPOSITORY = (
    "(EXISTS (SELECT 1 FROM blob_links b WHERE b.repository = l.repository "
    "AND b.digest = l.digest AND b.linked = 1) OR NOT EXISTS (SELECT 1 FROM blob_links b "
    "WHERE b.repository = l.repository AND b.digest = l.digest))"
)


_TABLES = (
    "layers",
    "uploads",
    "rejections",
    "manifests",
    "tags",
    "blob_links",
    "outcomes",
    "blob_objects",
    "manifest_objects",
    "reclaims",
    "offsets",
)


# Columns added since a table was first created: (table, column, type). An index from before
# one gets it empty (null), which is true of every row it holds: in a layers row, the bytes are
# where its one commit put them; in an uploads row, the events it was made from named nobody.
_ADDED_COLUMNS = (
    ("layers", "stored_at", "INTEGER"),
    ("uploads", "actor", "TEXT"),
)


def _schema_script(db: sqlite3.Connection) -> str:
    links = {c[1] for c in db.execute("PRAGMA table_info(blob_links)")}
    if "pushed_at" in links:
        # Written by a development build whose links compared clocks: nothing in it can be
        # carried over, so it is dropped whole (offsets too) and rebuilt from the log.
        drops = " ".join(f"DROP TABLE IF EXISTS {table};" for table in _TABLES)
        return f"BEGIN; {drops} {SCHEMA} COMMIT;"
    alters = []
    for table, column, kind in _ADDED_COLUMNS:
        columns = {c[1] for c in db.execute(f"PRAGMA table_info({table})")}
        if columns and column not in columns:  # no columns: a new index, SCHEMA creates it
            alters.append(f"ALTER TABLE {table} ADD COLUMN {column} {kind};")
    return " ".join([*alters, SCHEMA])


class UploadStates:
    OPEN = "open"
    FINISHING = "finishing"
    COMMITTED = "committed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    TERMINAL = frozenset({COMMITTED, FAILED, CANCELLED, EXPIRED})


@dataclass(frozen=True)
class LayerRow:
    repository: str
    digest: str
    size: int
    object_key: str
    committed_at_ms: int


@dataclass(frozen=True)
class UploadRow:
    upload_id: str
    repository: str
    state: str
    durable_offset: int
    updated_at_ms: int
    digest: str | None
    size: int | None
    reason: str | None
    detail: str | None
    expected: str | None
    actual: str | None
    actor: str | None  # who started the upload; None when its events named nobody


@dataclass(frozen=True)
class RejectionRow:
    command_id: str
    upload_id: str
    command_type: str
    reason: str
    detail: str
    expected_offset: int | None


@dataclass(frozen=True)
class ManifestRow:
    repository: str
    digest: str
    media_type: str
    size: int
    body: bytes
    object_key: str
    subject: str | None
    artifact_type: str | None
    annotations: dict[str, str]
    stored_at_ms: int


@dataclass(frozen=True)
class ReferrerRow:
    """A referrer as the referrers API describes it: a descriptor of the manifest."""

    media_type: str
    digest: str
    size: int
    artifact_type: str | None
    annotations: dict[str, str]


@dataclass(frozen=True)
class BlobCopy:
    """A stored copy of a blob (an object a commit or a mount named)."""

    object_key: str
    digest: str
    size: int
    blob_sha256: str


@dataclass(frozen=True)
class DigestState:
    digest: str
    linked: bool  # some repository has the blob
    changed_at_ms: int  # the digest's last link, unlink or commit


@dataclass(frozen=True)
class ManifestCopy:
    digest: str
    object_key: str
    size: int
    changed_at_ms: int  # its last store or delete in any repository


@dataclass(frozen=True)
class ReclaimRow:
    event_id: str
    kind: str  # "blob" or "manifest"
    digest: str
    object_key: str
    size: int
    reason: str
    sweep_id: str
    reclaimed_at_ms: int


class Outcomes:
    APPLIED = "applied"
    REJECTED = "rejected"


@dataclass(frozen=True)
class CommandOutcome:
    """What a repository command did: the events it produced (in log order), or its refusal."""

    command_id: str
    repository: str
    state: str  # Outcomes.APPLIED or Outcomes.REJECTED
    kinds: tuple[str, ...]  # event type names, e.g. ("ManifestStored", "TagMoved")
    command_type: str | None = None  # of a rejected command
    reason: str | None = None  # a RepositoryRejectReason
    detail: str | None = None

    @property
    def applied(self) -> bool:
        return self.state == Outcomes.APPLIED


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class Index:
    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._local = threading.local()
        self._upload_query: str | None = None
        if not read_only:
            with self._connection() as db:
                db.executescript(_schema_script(db))

    def _connection(self) -> sqlite3.Connection:
        # One connection per thread: SQLite connections must not be shared across threads, and
        # WAL mode lets the readers go on while the projection writes.
        db = getattr(self._local, "db", None)
        if db is None:
            if self.read_only:
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            else:
                db = sqlite3.connect(self.path, timeout=30)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    # Reads

    def offsets(self, topic: str) -> dict[int, int]:
        rows = self._connection().execute(
            "SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,)
        )
        return dict(rows.fetchall())

    def layer(self, repository: str, digest: str) -> LayerRow | None:
        row = (
            self._connection()
            .execute(
                "SELECT repository, digest, size, object_key, committed_at FROM layers "
                "WHERE repository = ? AND digest = ?",
                (repository, digest),
            )
            .fetchone()
        )
        return LayerRow(*row) if row else None

    def blob_anywhere(self, digest: str) -> LayerRow | None:
        """The blob as some repository has it: the registry's automatic content discovery."""
        db = self._connection()
        linked = db.execute(
            f"SELECT repository FROM blob_links WHERE digest = ? AND {_LINKED}", (digest,)
        ).fetchall()
        if not linked:
            # An index from before blob links existed has layers rows only.
            linked = db.execute(
                "SELECT l.repository FROM layers l WHERE l.digest = ? AND NOT EXISTS (SELECT 1 "
                "FROM blob_links b WHERE b.repository = l.repository AND b.digest = l.digest)",
                (digest,),
            ).fetchall()
        for (repository,) in linked:
            found = self.blob(repository, digest)
            if found is not None:  # not a copy the collector reclaimed
                return found
        return None

    def upload(self, upload_id: str) -> UploadRow | None:
        db = self._connection()
        row = db.execute(self._upload_select(db), (upload_id,)).fetchone()
        return UploadRow(*row) if row else None

    def _upload_select(self, db: sqlite3.Connection) -> str:
        if self._upload_query is None:
            # A read-only index is served as it was written, maybe by a version without actor.
            columns = {c[1] for c in db.execute("PRAGMA table_info(uploads)")}
            actor = "actor" if "actor" in columns or not columns else "NULL"
            self._upload_query = (
                "SELECT upload_id, repository, state, durable_offset, updated_at, digest, size, "
                f"reason, detail, expected, actual, {actor} FROM uploads WHERE upload_id = ?"
            )
        return self._upload_query

    def rejection(self, command_id: str) -> RejectionRow | None:
        row = (
            self._connection()
            .execute(
                "SELECT command_id, upload_id, command_type, reason, detail, expected_offset "
                "FROM rejections WHERE command_id = ?",
                (command_id,),
            )
            .fetchone()
        )
        return RejectionRow(*row) if row else None

    def counts(self) -> dict[str, int]:
        db = self._connection()
        return {
            "layers": db.execute("SELECT count(*) FROM layers").fetchone()[0],
            "uploads": db.execute("SELECT count(*) FROM uploads").fetchone()[0],
        }

    def blob(self, repository: str, digest: str) -> LayerRow | None:
        """The blob as its repository has it: pushed (and not unlinked since), or mounted."""
        db = self._connection()
        link = db.execute(
            f"SELECT size, object_key, linked_at, {_LINKED} FROM blob_links "
            "WHERE repository = ? AND digest = ?",
            (repository, digest),
        ).fetchone()
        layer = self.layer(repository, digest)
        if link is None:  # a log from before BlobLinked existed
            return None if layer is None or self._reclaimed(db, layer.object_key) else layer
        size, object_key, linked_at, linked = link
        if not linked:
            return None
        # Pushed or mounted, the same bytes: a push's row has the time they were created. A copy
        # the collector reclaimed is never served: the link's own copy then, if it is another
        # (a push that kept its own while the first copy went), else nothing at all.
        if layer is not None and not self._reclaimed(db, layer.object_key):
            return layer
        if object_key is None or self._reclaimed(db, object_key):
            return None
        created = linked_at if layer is None else layer.committed_at_ms
        return LayerRow(repository, digest, size, object_key, created)

    @staticmethod
    def _reclaimed(db: sqlite3.Connection, object_key: str) -> bool:
        return db.execute(_RECLAIMED_BLOB, (object_key,)).fetchone() is not None

    def manifest(self, repository: str, digest: str) -> ManifestRow | None:
        row = (
            self._connection()
            .execute(
                f"SELECT {_MANIFEST_COLUMNS} FROM manifests WHERE repository = ? AND digest = ?",
                (repository, digest),
            )
            .fetchone()
        )
        return None if row is None else _manifest_row(row)

    def tagged_manifest(self, repository: str, tag: str) -> ManifestRow | None:
        """The manifest the tag points to, in one primary-key join rather than two queries."""
        row = (
            self._connection()
            .execute(
                f"SELECT {_MANIFEST_COLUMNS} FROM tags JOIN manifests USING (repository, digest) "
                "WHERE repository = ? AND tag = ?",
                (repository, tag),
            )
            .fetchone()
        )
        return None if row is None else _manifest_row(row)

    def tag(self, repository: str, tag: str) -> str | None:
        """The digest the tag points to."""
        row = (
            self._connection()
            .execute("SELECT digest FROM tags WHERE repository = ? AND tag = ?", (repository, tag))
            .fetchone()
        )
        return row[0] if row else None

    def tags(self, repository: str, *, last: str | None = None, limit: int = 1000) -> list[str]:
        """The repository's tags after `last`, in lexical (byte) order."""
        rows = self._connection().execute(
            "SELECT tag FROM tags WHERE repository = ? AND tag > ? ORDER BY tag LIMIT ?",
            (repository, last or "", limit),
        )
        return [tag for (tag,) in rows]

    def repositories(self, *, last: str | None = None, limit: int = 1000) -> list[str]:
        """Repositories with a manifest, a tag or a linked blob, after `last`, in lexical order."""
        rows = self._connection().execute(
            "SELECT repository FROM ("
            "SELECT repository FROM manifests UNION SELECT repository FROM tags "
            f"UNION SELECT repository FROM blob_links WHERE {_LINKED} "
            "UNION SELECT l.repository FROM layers l WHERE NOT EXISTS (SELECT 1 FROM blob_links "
            "b WHERE b.repository = l.repository AND b.digest = l.digest)"
            ") WHERE repository > ? ORDER BY repository LIMIT ?",
            (last or "", limit),
        )
        return [name for (name,) in rows]

    def repository_exists(self, repository: str) -> bool:
        db = self._connection()
        for query in (
            "SELECT 1 FROM manifests WHERE repository = ? LIMIT 1",
            "SELECT 1 FROM tags WHERE repository = ? LIMIT 1",
            f"SELECT 1 FROM blob_links WHERE repository = ? AND {_LINKED} LIMIT 1",
            "SELECT 1 FROM layers l WHERE repository = ? AND NOT EXISTS (SELECT 1 FROM "
            "blob_links b WHERE b.repository = l.repository AND b.digest = l.digest) LIMIT 1",
        ):
            if db.execute(query, (repository,)).fetchone():
                return True
        return False

    def referrers(
        self, repository: str, subject: str, *, artifact_type: str | None = None
    ) -> list[ReferrerRow]:
        """The repository's manifests whose subject is `subject`, by digest."""
        query = (
            "SELECT media_type, digest, size, artifact_type, annotations FROM manifests "
            "WHERE repository = ? AND subject = ?"
        )
        parameters: tuple[str, ...] = (repository, subject)
        if artifact_type is not None:
            query += " AND artifact_type = ?"
            parameters += (artifact_type,)
        rows = self._connection().execute(query + " ORDER BY digest", parameters)
        return [
            ReferrerRow(media_type, digest, size, kind, json.loads(annotations or "{}"))
            for media_type, digest, size, kind, annotations in rows
        ]

    def outcome(self, command_id: str) -> CommandOutcome | None:
        """What the repository command did, once the projection has applied its events."""
        rows = (
            self._connection()
            .execute(
                "SELECT repository, kind, command_type, reason, detail FROM outcomes "
                "WHERE command_id = ? ORDER BY rowid",
                (command_id,),
            )
            .fetchall()
        )
        if not rows:
            return None
        rejected = next((r for r in rows if r[1] == RepositoryCommandRejected.__name__), None)
        if rejected is not None:
            repository, _, command_type, reason, detail = rejected
            return CommandOutcome(
                command_id,
                repository,
                Outcomes.REJECTED,
                (rejected[1],),
                command_type=command_type,
                reason=reason,
                detail=detail,
            )
        return CommandOutcome(command_id, rows[0][0], Outcomes.APPLIED, tuple(r[1] for r in rows))

    # For the garbage collector (services/gc)

    def unnamed_blob_copies(self) -> list[BlobCopy]:
        """Copies of blobs that nothing serves: no link names them and no repository that has
        the digest serves them (its layers row's copy), and the collector has not reclaimed them.
        Their digests may still be linked, through other copies."""
        rows = self._connection().execute(
            "SELECT o.object_key, o.digest, o.size, o.blob_sha256 FROM blob_objects o "
            "WHERE NOT EXISTS (SELECT 1 FROM reclaims r WHERE r.object_key = o.object_key "
            "AND r.kind = 'blob') "
            "AND NOT EXISTS (SELECT 1 FROM blob_links b WHERE b.digest = o.digest "
            f"AND b.{_LINKED} AND b.object_key = o.object_key) "
            "AND NOT EXISTS (SELECT 1 FROM layers l WHERE l.digest = o.digest "
            f"AND l.object_key = o.object_key AND {_LAYER_IN_REPOSITORY}) "
            "ORDER BY o.digest, o.object_key"
        )
        return [BlobCopy(*row) for row in rows]

    def blob_copy_linked(self, object_key: str, digest: str) -> bool:
        """Whether a repository links the copy (reclaims aside): a link names it, or the layers
        row of a repository that has the digest does."""
        db = self._connection()
        return (
            db.execute(
                f"SELECT 1 FROM blob_links WHERE digest = ? AND {_LINKED} AND object_key = ? "
                "LIMIT 1",
                (digest, object_key),
            ).fetchone()
            or db.execute(
                f"SELECT 1 FROM layers l WHERE l.digest = ? AND l.object_key = ? "
                f"AND {_LAYER_IN_REPOSITORY} LIMIT 1",
                (digest, object_key),
            ).fetchone()
        ) is not None

    def blob_digest_state(self, digest: str) -> DigestState:
        """Whether any repository has the digest, and when its links last changed."""
        db = self._connection()
        linked = (
            db.execute(
                f"SELECT 1 FROM blob_links WHERE digest = ? AND {_LINKED} LIMIT 1", (digest,)
            ).fetchone()
            or db.execute(
                "SELECT 1 FROM layers l WHERE l.digest = ? AND NOT EXISTS (SELECT 1 FROM "
                "blob_links b WHERE b.repository = l.repository AND b.digest = l.digest) LIMIT 1",
                (digest,),
            ).fetchone()
        )
        (links_changed,) = db.execute(
            "SELECT max(linked_at) FROM blob_links WHERE digest = ?", (digest,)
        ).fetchone()
        (committed,) = db.execute(
            "SELECT max(max(committed_at, coalesce(stored_at, 0))) FROM layers WHERE digest = ?",
            (digest,),
        ).fetchone()
        changes = [moment for moment in (links_changed, committed) if moment is not None]
        return DigestState(digest, linked is not None, max(changes) if changes else 0)

    def unstored_manifests(self) -> list[ManifestCopy]:
        """Manifests no repository stores whose copy the collector has not reclaimed since they
        were last stored or deleted."""
        rows = self._connection().execute(
            "SELECT m.digest, m.object_key, m.size, "
            "max(m.last_stored_at, coalesce(m.last_deleted_at, 0)) AS changed "
            "FROM manifest_objects m "
            "WHERE NOT EXISTS (SELECT 1 FROM manifests s WHERE s.digest = m.digest) "
            "AND NOT EXISTS (SELECT 1 FROM reclaims r WHERE r.kind = 'manifest' "
            "AND r.digest = m.digest AND r.reclaimed_at >= "
            "max(m.last_stored_at, coalesce(m.last_deleted_at, 0))) "
            "ORDER BY m.digest"
        )
        return [ManifestCopy(*row) for row in rows]

    def manifest_copy(self, digest: str) -> ManifestCopy | None:
        """The manifest's copy as every repository stored it, stored anywhere now or not."""
        row = (
            self._connection()
            .execute(
                "SELECT digest, object_key, size, "
                "max(last_stored_at, coalesce(last_deleted_at, 0)) FROM manifest_objects "
                "WHERE digest = ?",
                (digest,),
            )
            .fetchone()
        )
        return None if row is None else ManifestCopy(*row)

    def manifest_stored_anywhere(self, digest: str) -> ManifestRow | None:
        """One repository's row of a manifest, if any repository stores it."""
        row = (
            self._connection()
            .execute("SELECT repository FROM manifests WHERE digest = ? LIMIT 1", (digest,))
            .fetchone()
        )
        return None if row is None else self.manifest(row[0], digest)

    def revived_manifests(self) -> list[str]:
        """Manifests the collector reclaimed a copy of that a repository stores again: a PUT
        racing the reclaim may have written its copy just before the collector deleted it."""
        rows = self._connection().execute(
            "SELECT DISTINCT r.digest FROM reclaims r WHERE r.kind = 'manifest' "
            "AND EXISTS (SELECT 1 FROM manifests s WHERE s.digest = r.digest) ORDER BY r.digest"
        )
        return [digest for (digest,) in rows]

    def reclaims(self) -> list[ReclaimRow]:
        rows = self._connection().execute(
            "SELECT event_id, kind, digest, object_key, size, reason, sweep_id, reclaimed_at "
            "FROM reclaims ORDER BY reclaimed_at, event_id"
        )
        return [ReclaimRow(*row) for row in rows]

    # Writes

    def apply(
        self,
        topic: str,
        events: Iterable[Event | RepositoryEvent | StorageEvent | None],
        next_offsets: dict[int, int],
    ) -> None:
        """Applies events in order and stores, per partition, the offset to read next.

        The offsets come from the consumer's position rather than the last record's offset, so
        that the commit markers of transactions after it are not read again.
        """
        db = self._connection()
        with db:
            # ChunkAppended is most of the log (one per chunk) and only moves an upload's durable
            # offset forward: a run of them for one upload is one UPDATE (the highest offset, the
            # last time). That upload's pending update is written before any other event of it,
            # and rows of other uploads are independent, so the result is the same as one by one.
            chunks: dict[str, tuple[int, int]] = {}
            for event in events:
                if event is None:
                    continue
                if isinstance(event, RepositoryEvent):
                    self._apply_repository(db, event)
                    continue
                if isinstance(event, StorageEvent):
                    self._apply_storage(db, event)
                    continue
                if isinstance(event, ChunkAppended):
                    seen = chunks.get(event.upload_id)
                    durable = (
                        event.durable_offset if seen is None else max(seen[0], event.durable_offset)
                    )
                    chunks[event.upload_id] = (durable, _ms(event.occurred_at))
                    continue
                if event.upload_id in chunks:
                    self._chunks_appended(db, {event.upload_id: chunks.pop(event.upload_id)})
                self._apply_one(db, event)
            self._chunks_appended(db, chunks)
            db.executemany(
                "INSERT INTO offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
                "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                [(topic, p, o) for p, o in next_offsets.items()],
            )

    @staticmethod
    def _chunks_appended(db: sqlite3.Connection, chunks: dict[str, tuple[int, int]]) -> None:
        if chunks:
            db.executemany(
                "UPDATE uploads SET durable_offset = max(durable_offset, ?), updated_at = ? "
                "WHERE upload_id = ?",
                [(durable, at, upload_id) for upload_id, (durable, at) in chunks.items()],
            )

    def _apply_one(self, db: sqlite3.Connection, event: Event) -> None:
        at = _ms(event.occurred_at)
        if isinstance(event, UploadStarted):
            db.execute(
                "INSERT OR IGNORE INTO uploads (upload_id, repository, state, durable_offset, "
                "updated_at, actor) VALUES (?, ?, ?, 0, ?, ?)",
                (event.upload_id, event.repository, UploadStates.OPEN, at, event.actor),
            )
        elif isinstance(event, ChunkAppended):
            db.execute(
                "UPDATE uploads SET durable_offset = max(durable_offset, ?), updated_at = ? "
                "WHERE upload_id = ?",
                (event.durable_offset, at, event.upload_id),
            )
        elif isinstance(event, UploadFinished):
            self._set_state(db, event, UploadStates.FINISHING, digest=event.digest, size=event.size)
        elif isinstance(event, LayerCommitted):
            # Two uploads of one digest to one repository (two pushes sharing a base layer)
            # commit on two partitions, keyed by their upload ids, which a replay may apply in
            # the other order. So times decide, not the order applied, and live and replayed
            # indexes agree: the row was created by the earliest commit (committed_at, then
            # upload id), and its bytes are where the latest commit put them (a duplicate points
            # at the first copy; a later commit keeps its own only when that copy was removed).
            # Whether the blob is linked is blob_links', decided in the repository's partition.
            at = _ms(event.committed_at)
            db.execute(
                "INSERT INTO layers (repository, digest, size, object_key, committed_at, "
                "upload_id, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (repository, digest) DO UPDATE SET "
                f"size = CASE WHEN {_LATER_COPY} THEN excluded.size ELSE size END, "
                f"object_key = CASE WHEN {_LATER_COPY} THEN excluded.object_key "
                "ELSE object_key END, "
                f"stored_at = CASE WHEN {_LATER_COPY} THEN excluded.stored_at "
                "ELSE stored_at END, "
                f"upload_id = CASE WHEN {_EARLIER_COMMIT} THEN excluded.upload_id "
                "ELSE upload_id END, "
                "committed_at = min(committed_at, excluded.committed_at)",
                (
                    event.repository,
                    event.digest,
                    event.size,
                    event.object_key,
                    at,
                    event.upload_id,
                    at,
                ),
            )
            self._set_state(db, event, UploadStates.COMMITTED, digest=event.digest, size=event.size)
            db.execute(_BLOB_OBJECT, _blob_object(event))
        elif isinstance(event, LayerValidationFailed):
            self._set_state(
                db,
                event,
                UploadStates.FAILED,
                reason=event.reason,
                detail=event.detail,
                expected=event.expected,
                actual=event.actual,
            )
        elif isinstance(event, UploadCancelled):
            self._set_state(db, event, UploadStates.CANCELLED)
        elif isinstance(event, UploadExpired):
            self._set_state(db, event, UploadStates.EXPIRED)
        elif isinstance(event, CommandRejected) and event.caused_by:
            # Kept by command id, so a client waiting on its command learns why it was refused.
            db.execute(
                "INSERT OR IGNORE INTO rejections (command_id, upload_id, command_type, reason, "
                "detail, expected_offset) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    event.caused_by,
                    event.upload_id,
                    event.command_type,
                    event.reason,
                    event.detail,
                    event.expected_offset,
                ),
            )

    def _apply_repository(self, db: sqlite3.Connection, event: RepositoryEvent) -> None:
        at = _ms(event.occurred_at)
        # A BlobLinked's cause is the upload's FinishUpload, not a repository command.
        if event.caused_by and not isinstance(event, BlobLinked):
            rejected = isinstance(event, RepositoryCommandRejected)
            db.execute(
                "INSERT OR IGNORE INTO outcomes (command_id, event_id, repository, kind, "
                "command_type, reason, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    event.caused_by,
                    event.event_id,
                    event.repository,
                    type(event).__name__,
                    event.command_type if rejected else None,
                    event.reason if rejected else None,
                    event.detail if rejected else None,
                ),
            )
        if isinstance(event, ManifestStored):
            subject, artifact_type, annotations = _referrer_fields(event)
            db.execute(
                "INSERT OR REPLACE INTO manifests (repository, digest, media_type, size, body, "
                "object_key, subject, artifact_type, annotations, stored_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.repository,
                    event.digest,
                    event.media_type,
                    event.size,
                    event.body,
                    event.object_key,
                    subject,
                    artifact_type,
                    annotations,
                    at,
                ),
            )
        for statement, parameters in _REPOSITORY_STATEMENTS.get(type(event), ()):
            db.execute(statement, parameters(event, at))

    @staticmethod
    def _apply_storage(db: sqlite3.Connection, event: StorageEvent) -> None:
        # A set of events: the same whatever order partitions are applied in, and a reclaim
        # published twice (a sweep retried after an unknown outcome) is one row.
        kind = "blob" if isinstance(event, BlobReclaimed) else "manifest"
        db.execute(
            "INSERT OR IGNORE INTO reclaims (event_id, kind, digest, object_key, size, reason, "
            "sweep_id, reclaimed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event.event_id,
                kind,
                event.digest,
                event.object_key,
                event.size,
                event.reason,
                event.sweep_id,
                _ms(event.occurred_at),
            ),
        )

    def _set_state(
        self, db: sqlite3.Connection, event: Event, state: str, **columns: object
    ) -> None:
        assignments = "".join(f", {name} = ?" for name in columns)
        db.execute(
            f"UPDATE uploads SET state = ?, updated_at = ?{assignments} WHERE upload_id = ?",
            (state, _ms(event.occurred_at), *columns.values(), event.upload_id),
        )


def _repository_digest(event: Any, _at: int) -> tuple[Any, ...]:
    return (event.repository, event.digest)


# A copy of a blob that a commit, a link or a mount named (each names the same bytes: an object
# holds one digest's bytes, from the upload whose commit first named it).
_BLOB_OBJECT = (
    "INSERT OR IGNORE INTO blob_objects (object_key, digest, size, blob_sha256) VALUES (?, ?, ?, ?)"
)


def _blob_object(event: Any, _at: int = 0) -> tuple[Any, ...]:
    return (event.object_key, event.digest, event.size, event.blob_sha256)


# A manifest stored or deleted by a repository: the latest of each, whatever order applied.
_MANIFEST_STORED = (
    "INSERT INTO manifest_objects (digest, object_key, size, last_stored_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (digest) DO UPDATE SET "
    "last_stored_at = max(last_stored_at, excluded.last_stored_at)",
    lambda e, at: (e.digest, e.object_key, e.size, at),
)
_MANIFEST_DELETED = (
    # The repository's ManifestStored came first in its partition: the row is there.
    "UPDATE manifest_objects SET last_deleted_at = max(coalesce(last_deleted_at, 0), ?) "
    "WHERE digest = ?",
    lambda e, at: (at, e.digest),
)


# A push (BlobLinked) or a mount (BlobMounted): linked, whatever came before in the partition.
_LINK = (
    "INSERT INTO blob_links (repository, digest, linked, size, object_key, linked_at) "
    "VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT (repository, digest) DO UPDATE SET linked = 1, "
    "size = excluded.size, object_key = excluded.object_key, linked_at = excluded.linked_at",
    lambda e, at: (e.repository, e.digest, e.size, e.object_key, at),
)

# The repository events' statements and their parameters (the event and its time in ms); for
# ManifestStored, those after its manifests row.
_REPOSITORY_STATEMENTS: dict[
    type, tuple[tuple[str, Callable[[Any, int], tuple[Any, ...]]], ...]
] = {
    TagMoved: (
        (
            "INSERT OR REPLACE INTO tags (repository, tag, digest, moved_at) VALUES (?, ?, ?, ?)",
            lambda e, at: (e.repository, e.tag, e.digest, at),
        ),
    ),
    TagDeleted: (
        ("DELETE FROM tags WHERE repository = ? AND tag = ?", lambda e, _: (e.repository, e.tag)),
    ),
    # Its TagDeleted events came first; a tag left pointing at it would point at nothing.
    ManifestDeleted: (
        *(
            (f"DELETE FROM {table} WHERE repository = ? AND digest = ?", _repository_digest)
            for table in ("tags", "manifests")
        ),
        _MANIFEST_DELETED,
    ),
    ManifestStored: (_MANIFEST_STORED,),
    BlobLinked: (_LINK, (_BLOB_OBJECT, _blob_object)),
    BlobMounted: (_LINK, (_BLOB_OBJECT, _blob_object)),
    BlobUnlinked: (
        (
            "INSERT INTO blob_links (repository, digest, linked, linked_at) VALUES (?, ?, 0, ?) "
            "ON CONFLICT (repository, digest) DO UPDATE SET linked = 0, "
            "linked_at = excluded.linked_at",
            lambda e, at: (e.repository, e.digest, at),
        ),
    ),
}


def _referrer_fields(event: ManifestStored) -> tuple[str | None, str | None, str | None]:
    """Subject, artifact type and annotations (JSON) as the referrers API reports them.

    The worker validated the body before storing it; a body that does not parse here still
    gets served, just without annotations (the event's own subject and artifact type stand).
    """
    subject, artifact_type, annotations = event.subject, event.artifact_type, None
    try:
        parsed = parse_manifest(event.body, event.media_type)
    except ManifestInvalid:
        return subject, artifact_type, annotations
    if subject is None and parsed.subject is not None:
        subject = parsed.subject.digest
    if artifact_type is None:
        artifact_type = parsed.artifact_type
    if parsed.annotations:
        annotations = json.dumps(parsed.annotations, sort_keys=True, separators=(",", ":"))
    return subject, artifact_type, annotations


def check_index(path: str) -> str | None:
    """Why path cannot be served read-only, or None when it can."""
    if not Path(path).is_file():
        return f"no index file {path}"
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            db.execute("SELECT count(*) FROM layers").fetchone()
        finally:
            db.close()
    except sqlite3.Error as error:
        return f"{path} is not a Layerlog index: {error}"
    return None


# Every table in an order fixed by its content: two indexes that hold the same state give the
# same dump, whatever order their partitions were applied in. The outcomes of one command keep
# their log order (rowid; VACUUM INTO may renumber rowids, never reorder them), which is what
# outcome() reads; the rowid itself is left out.
CANONICAL_QUERIES = {
    "layers": "SELECT * FROM layers ORDER BY repository, digest",
    "uploads": "SELECT * FROM uploads ORDER BY upload_id",
    "rejections": "SELECT * FROM rejections ORDER BY command_id",
    "manifests": "SELECT * FROM manifests ORDER BY repository, digest",
    "tags": "SELECT * FROM tags ORDER BY repository, tag",
    "blob_links": "SELECT * FROM blob_links ORDER BY repository, digest",
    "outcomes": "SELECT * FROM outcomes ORDER BY command_id, rowid",
    "offsets": "SELECT * FROM offsets ORDER BY topic, partition",
}


def canonical_rows(path: str) -> Iterable[tuple[str, tuple[Any, ...]]]:
    """(table, row) for every row of the index, in the canonical order (blocking)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for table, query in CANONICAL_QUERIES.items():
            for row in db.execute(query):
                yield table, row
    finally:
        db.close()


def canonical_digest(path: str) -> tuple[str, dict[str, int]]:
    """A sha256 over the canonical dump, and the rows per table: equal digests, equal indexes."""
    hasher = hashlib.sha256()
    counts = dict.fromkeys(CANONICAL_QUERIES, 0)
    for table, row in canonical_rows(path):
        counts[table] += 1
        hasher.update(repr((table, row)).encode())
        hasher.update(b"\n")
    return hasher.hexdigest(), counts


_MANIFEST_COLUMNS = (
    "repository, digest, media_type, size, body, object_key, subject, artifact_type, "
    "annotations, stored_at"
)


def _manifest_row(row: tuple[Any, ...]) -> ManifestRow:
    *head, annotations, stored_at = row
    return ManifestRow(*head, json.loads(annotations or "{}"), stored_at)
