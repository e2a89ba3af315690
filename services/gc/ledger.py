"""Which reclaims the collector has finished (their bytes deleted), kept beside its index.

A reclaim is published before its bytes are deleted; a collector that stops in between (or a
sweep whose commit came back unknown, or a `layerlog gc` run) leaves a reclaim in the log whose
object may still be there. Every sweep first finishes the reclaims its index has that this
ledger does not, which makes the delete happen once the event is durable, whoever published it.
The ledger is not projected from the log (it records what this collector did to storage): an
index without it finishes every reclaim once more, which deletes nothing twice.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable

from services.query.index import ReclaimRow

SCHEMA = """
CREATE TABLE IF NOT EXISTS gc_finished (
    event_id    TEXT PRIMARY KEY,
    finished_at INTEGER NOT NULL
) WITHOUT ROWID;
"""


class Ledger:
    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._connection().executescript(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30)
            self._local.db = db
        return db

    def unfinished(self) -> list[ReclaimRow]:
        rows = self._connection().execute(
            "SELECT event_id, kind, digest, object_key, size, reason, sweep_id, reclaimed_at "
            "FROM reclaims r WHERE NOT EXISTS (SELECT 1 FROM gc_finished f "
            "WHERE f.event_id = r.event_id) ORDER BY reclaimed_at, event_id"
        )
        return [ReclaimRow(*row) for row in rows]

    def finish(self, event_ids: Iterable[str]) -> None:
        at = time.time_ns() // 1_000_000
        db = self._connection()
        with db:
            db.executemany(
                "INSERT OR IGNORE INTO gc_finished (event_id, finished_at) VALUES (?, ?)",
                [(event_id, at) for event_id in event_ids],
            )
