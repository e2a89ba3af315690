"""The index: layers and uploads projected from the events, in embedded SQLite.

apply() writes a batch of events and the offsets after them in one transaction, so after a crash
the projection resumes exactly where its last committed batch ended: no event applied twice, none
skipped. All calls block; the service runs them in threads.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from services.core.records import (
    ChunkAppended,
    CommandRejected,
    Event,
    LayerCommitted,
    LayerValidationFailed,
    UploadCancelled,
    UploadExpired,
    UploadFinished,
    UploadStarted,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    repository   TEXT NOT NULL,
    digest       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    object_key   TEXT NOT NULL,
    committed_at INTEGER NOT NULL,
    upload_id    TEXT NOT NULL,
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
    actual         TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejections (
    command_id      TEXT PRIMARY KEY,
    upload_id       TEXT NOT NULL,
    command_type    TEXT NOT NULL,
    reason          TEXT NOT NULL,
    detail          TEXT NOT NULL,
    expected_offset INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS offsets (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
"""


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


@dataclass(frozen=True)
class RejectionRow:
    command_id: str
    upload_id: str
    command_type: str
    reason: str
    detail: str
    expected_offset: int | None


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class Index:
    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._local = threading.local()
        if not read_only:
            with self._connection() as db:
                db.executescript(SCHEMA)

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

    def layer_anywhere(self, digest: str) -> LayerRow | None:
        """The blob in any repository: the registry's automatic content discovery for mounts."""
        row = (
            self._connection()
            .execute(
                "SELECT repository, digest, size, object_key, committed_at FROM layers "
                "WHERE digest = ? LIMIT 1",
                (digest,),
            )
            .fetchone()
        )
        return LayerRow(*row) if row else None

    def upload(self, upload_id: str) -> UploadRow | None:
        row = (
            self._connection()
            .execute(
                "SELECT upload_id, repository, state, durable_offset, updated_at, digest, size, "
                "reason, detail, expected, actual FROM uploads WHERE upload_id = ?",
                (upload_id,),
            )
            .fetchone()
        )
        return UploadRow(*row) if row else None

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

    # Writes

    def apply(
        self, topic: str, events: Iterable[Event | None], next_offsets: dict[int, int]
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
                "updated_at) VALUES (?, ?, ?, 0, ?)",
                (event.upload_id, event.repository, UploadStates.OPEN, at),
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
            db.execute(
                "INSERT INTO layers (repository, digest, size, object_key, committed_at, "
                "upload_id) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (repository, digest) "
                "DO UPDATE SET size = excluded.size, object_key = excluded.object_key",
                (
                    event.repository,
                    event.digest,
                    event.size,
                    event.object_key,
                    _ms(event.committed_at),
                    event.upload_id,
                ),
            )
            self._set_state(db, event, UploadStates.COMMITTED, digest=event.digest, size=event.size)
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

    def _set_state(
        self, db: sqlite3.Connection, event: Event, state: str, **columns: object
    ) -> None:
        assignments = "".join(f", {name} = ?" for name in columns)
        db.execute(
            f"UPDATE uploads SET state = ?, updated_at = ?{assignments} WHERE upload_id = ?",
            (state, _ms(event.occurred_at), *columns.values(), event.upload_id),
        )


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
