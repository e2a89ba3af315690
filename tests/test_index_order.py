"""The index a replay builds equals the live one even where the two applied events of different
partitions in different orders: rows that several partitions' events write are decided by the
events' times, not by the order they were applied in."""

from __future__ import annotations

import itertools
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

from services.core.records import LayerCommitted
from services.query.index import Index

DIGEST = "sha256:" + "ab" * 32


def commit(upload_id: str, object_key: str, second: int) -> LayerCommitted:
    return LayerCommitted(
        event_id=str(uuid.uuid4()),
        upload_id=upload_id,
        repository="order/app",
        caused_by=None,
        digest=DIGEST,
        size=1234,
        object_key=object_key,
        committed_at=datetime(2026, 12, 1, 12, 0, second, tzinfo=UTC),
        blob_sha256=DIGEST.removeprefix("sha256:"),
    )


def test_commits_of_one_digest_give_one_row_in_any_order(tmp_path: Path) -> None:
    # Each upload is keyed by its own id, so each commit may come from another partition: the
    # first upload, a second one that found its copy (the verifier keeps one), and a third that
    # kept a copy of its own once the first was removed.
    commits = [
        commit("u-1", "uploads/u-1/data", 1),
        commit("u-2", "uploads/u-1/data", 2),
        commit("u-3", "uploads/u-3/data", 3),
    ]
    rows = set()
    for number, order in enumerate(itertools.permutations(commits)):
        path = tmp_path / f"index-{number}.sqlite"
        index = Index(str(path))
        for partition, event in enumerate(order):
            index.apply("events", [event], {partition: 1})
        db = sqlite3.connect(path)
        try:
            rows.add(
                (
                    tuple(db.execute("SELECT * FROM layers").fetchall()),
                    tuple(db.execute("SELECT * FROM blob_links").fetchall()),
                )
            )
        finally:
            db.close()
    assert len(rows) == 1, rows
    ((layers, _),) = rows
    # Created by the first commit; its bytes where the latest commit put them.
    ((_, _, _, object_key, committed_at, upload_id, stored_at),) = layers
    assert (object_key, upload_id) == ("uploads/u-3/data", "u-1")
    assert committed_at == int(commits[0].committed_at.timestamp() * 1000)
    assert stored_at == int(commits[2].committed_at.timestamp() * 1000)


def test_an_index_from_before_stored_at_opens_and_takes_commits(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE layers (repository TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT "
        "NULL, object_key TEXT NOT NULL, committed_at INTEGER NOT NULL, upload_id TEXT NOT NULL, "
        "PRIMARY KEY (repository, digest)) WITHOUT ROWID;"
        f"INSERT INTO layers VALUES ('order/app', '{DIGEST}', 1234, 'uploads/u-0/data', 0, 'u-0');"
    )
    old.close()
    index = Index(str(path))
    index.apply("events", [commit("u-1", "uploads/u-1/data", 1)], {0: 1})
    layer = index.blob("order/app", DIGEST)
    assert layer is not None and layer.object_key == "uploads/u-1/data"  # the later copy


def test_an_index_whose_links_compared_clocks_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    """A development build kept blob_links by time; such a file starts over (offsets and all),
    and the projection replays the log into it."""
    path = tmp_path / "dev.sqlite"
    dev = sqlite3.connect(path)
    dev.executescript(
        "CREATE TABLE blob_links (repository TEXT, digest TEXT, mounted INTEGER, size INTEGER, "
        "object_key TEXT, mounted_at INTEGER, pushed_at INTEGER, unlinked_at INTEGER);"
        "INSERT INTO blob_links VALUES ('order/app', 'd', 0, 1, 'k', NULL, 5, NULL);"
        "CREATE TABLE offsets (topic TEXT, partition INTEGER, next_offset INTEGER);"
        "INSERT INTO offsets VALUES ('events', 0, 42);"
    )
    dev.close()
    index = Index(str(path))
    assert index.offsets("events") == {}
    index.apply("events", [commit("u-1", "uploads/u-1/data", 1)], {0: 1})
    assert index.offsets("events") == {0: 1}
    assert index.blob("order/app", DIGEST) is not None  # no link row: pushed before links
