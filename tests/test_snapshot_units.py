"""The pure logic of snapshots and readiness: manifests, which snapshots to keep, which offsets a
log can continue from, the checks of a downloaded file, and the canonical dump of an index."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.core.records import ChunkAppended, LayerCommitted, TagMoved, UploadStarted
from services.core.settings import Settings, SettingsError
from services.query.index import Index, canonical_digest
from services.query.snapshots import (
    FORMAT,
    Listing,
    LogBounds,
    SnapshotManifest,
    SnapshotProblem,
    SnapshotRejected,
    check_file,
    check_offsets,
    copy_index,
    file_sha256,
    index_is_new,
    listings,
    new_snapshot_id,
    to_prune,
)

TOPIC = "layerlog.events"


def manifest_for(path: Path, offsets: dict[int, int], **changes: object) -> SnapshotManifest:
    digest, size = file_sha256(str(path))
    fields: dict[str, object] = dict(
        snapshot_id="20260101T000000.000000Z-abcd0123",
        events_topic=TOPIC,
        offsets=offsets,
        sha256=digest,
        size=size,
        created_at="2026-01-01T00:00:00Z",
        source="test/1",
    )
    fields.update(changes)
    return SnapshotManifest(**fields)  # type: ignore[arg-type]


def small_index(path: Path, *, reverse: bool = False) -> Index:
    """An index with a few layers and a tag, applied in one order or its reverse; the same
    events (ids included) every time."""
    index = Index(str(path))
    ids = (f"00000000-0000-4000-8000-{n:012d}" for n in range(100))
    at = datetime(2026, 1, 1, tzinfo=UTC)
    batches = []
    for number in range(5):
        upload = f"0000000{number}-0000-4000-8000-000000000000"
        digest = f"sha256:{number:064x}"
        common = {"upload_id": upload, "repository": f"r/{number % 2}", "occurred_at": at}
        batches.append(
            [
                UploadStarted(event_id=next(ids), caused_by=None, staging_key="k", **common),
                ChunkAppended(
                    event_id=next(ids),
                    caused_by=None,
                    offset=0,
                    length=10,
                    durable_offset=10,
                    chunk_sha256="0" * 64,
                    **common,
                ),
                LayerCommitted(
                    event_id=next(ids),
                    caused_by=None,
                    digest=digest,
                    size=10,
                    object_key=f"uploads/{upload}/data",
                    committed_at=at,
                    blob_sha256=digest,
                    **common,
                ),
            ]
        )
    moved = TagMoved(
        event_id=next(ids),
        repository="r/0",
        caused_by=next(ids),
        tag="v1",
        digest="sha256:" + "a" * 64,
        previous_digest=None,
        occurred_at=at,
    )
    # Each upload's events stay in their order (one partition); the uploads and the tag move
    # (other partitions) come in either order, as two replicas may read them.
    for batch in reversed(batches) if reverse else batches:
        index.apply(TOPIC, batch, {})
    index.apply(TOPIC, [moved], {0: 7, 1: 4})
    return index


def test_the_snapshot_settings_are_read_and_checked():
    settings = Settings.from_env(
        {
            "LAYERLOG_SNAPSHOT_INTERVAL_SECONDS": "3600",
            "LAYERLOG_SNAPSHOT_KEEP": "5",
            "LAYERLOG_SNAPSHOT_RESTORE": "false",
            "LAYERLOG_REUSE_PORT": "true",
            "LAYERLOG_QUERY_STATUS_LISTEN": "127.0.0.1:18081",
        }
    )
    assert settings.snapshot_interval_seconds == 3600
    assert settings.snapshot_keep == 5
    assert settings.snapshot_restore is False
    assert settings.reuse_port is True
    assert settings.query_status_listen == "127.0.0.1:18081"
    defaults = Settings.from_env({})
    assert (defaults.snapshot_interval_seconds, defaults.snapshot_keep) == (0, 3)
    assert defaults.snapshot_restore is True and defaults.reuse_port is False
    for variable, value in (
        ("LAYERLOG_SNAPSHOT_KEEP", "0"),
        ("LAYERLOG_SNAPSHOT_INTERVAL_SECONDS", "-1"),
        ("LAYERLOG_REGISTRY_STATUS_LISTEN", "nowhere"),
        ("LAYERLOG_REUSE_PORT", "sometimes"),
    ):
        with pytest.raises(SettingsError, match=variable):
            Settings.from_env({variable: value})


def test_a_manifest_round_trips_and_a_bad_one_is_invalid(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x" * 100)
    manifest = manifest_for(path, {0: 12, 3: 4})
    assert SnapshotManifest.from_json(manifest.to_json()) == manifest
    good = manifest.to_json()
    for bad in (
        b"not json",
        b"[]",
        good.replace(FORMAT.encode(), b"layerlog-index-snapshot/99"),
        good.replace(manifest.sha256.encode(), b"nothex" * 10 + b"abcd"),
        good.replace(b'"size": 100', b'"size": -1'),
        good.replace(b'"0": 12', b'"zero": 12'),
    ):
        with pytest.raises(SnapshotRejected) as rejected:
            SnapshotManifest.from_json(bad)
        assert rejected.value.problem == SnapshotProblem.MANIFEST_INVALID


def test_ids_sort_by_time_and_listings_come_newest_first():
    early = new_snapshot_id(datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=UTC))
    late = new_snapshot_id(datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC))
    assert early < late
    prefix = f"snapshots/{TOPIC}/"
    keys = [
        f"{prefix}{early}/index.sqlite",
        f"{prefix}{early}/manifest.json",
        f"{prefix}{late}/index.sqlite",  # partial: no manifest
        f"{prefix}stray",  # not a snapshot's object
        "elsewhere/x/index.sqlite",
    ]
    assert listings(keys, prefix) == [Listing(late, True, False), Listing(early, True, True)]


def test_pruning_keeps_the_newest_complete_and_any_newer_upload_in_progress():
    found = [
        Listing("6", True, False),  # newer than every complete one: may still be uploading
        Listing("5", True, True),
        Listing("4", True, True),
        Listing("3", True, False),  # older than the kept ones: a dead upload
        Listing("2", True, True),
        Listing("1", False, True),
    ]
    assert to_prune(found, 2) == ["3", "2", "1"]
    assert to_prune(found, 3) == ["3", "1"]
    assert to_prune(found, 10) == ["3", "1"]
    assert to_prune([Listing("1", True, False)], 1) == []


def test_offsets_must_lie_inside_the_log_as_it_is_now():
    bounds = LogBounds(start={0: 0, 1: 5}, end={0: 10, 1: 20})
    check_offsets({0: 10, 1: 5}, bounds)
    check_offsets({1: 7}, LogBounds(start={0: 0, 1: 0}, end={0: 3, 1: 9}))  # 0: from its start
    for offsets, problem in (
        ({0: 11, 1: 6}, SnapshotProblem.OFFSETS_BEYOND_END),
        ({0: 3, 1: 4}, SnapshotProblem.OFFSETS_BELOW_START),  # retention moved past it
        ({0: 3}, SnapshotProblem.OFFSETS_BELOW_START),  # partition 1 from 0, which is gone
        ({0: 3, 1: 6, 2: 1}, SnapshotProblem.UNKNOWN_PARTITION),
    ):
        with pytest.raises(SnapshotRejected) as rejected:
            check_offsets(offsets, bounds)
        assert rejected.value.problem == problem, offsets


def test_a_copy_passes_its_checks_and_each_kind_of_damage_is_named(tmp_path):
    small_index(tmp_path / "live.sqlite")
    copy = tmp_path / "copy.sqlite"
    offsets = copy_index(str(tmp_path / "live.sqlite"), str(copy), TOPIC)
    assert offsets == {0: 7, 1: 4}
    manifest = manifest_for(copy, offsets)
    check_file(str(copy), manifest)

    def damaged(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    whole = copy.read_bytes()
    truncated = damaged("truncated", whole[: len(whole) // 2])
    with pytest.raises(SnapshotRejected, match=SnapshotProblem.SIZE_MISMATCH):
        check_file(str(truncated), manifest)
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    with pytest.raises(SnapshotRejected, match=SnapshotProblem.CHECKSUM_MISMATCH):
        check_file(str(damaged("flipped", bytes(flipped))), manifest)
    # The bytes the manifest describes, but not a database: integrity is checked on its own.
    garbage = damaged("garbage", b"this is not sqlite " * 400)
    with pytest.raises(SnapshotRejected, match=SnapshotProblem.INTEGRITY_FAILED):
        check_file(str(garbage), manifest_for(garbage, offsets))
    # The layers table's root page (page 2) overwritten: the file header is fine, the tree not.
    broken = bytearray(whole)
    page = 4096
    broken[page : 2 * page] = b"\x07" * page
    broken_path = damaged("broken", bytes(broken))
    with pytest.raises(SnapshotRejected, match=SnapshotProblem.INTEGRITY_FAILED):
        check_file(str(broken_path), manifest_for(broken_path, offsets))
    with pytest.raises(SnapshotRejected, match=SnapshotProblem.OFFSETS_MISMATCH):
        check_file(str(copy), manifest_for(copy, {0: 8, 1: 4}))


def test_an_index_that_has_projected_nothing_has_nothing_to_snapshot(tmp_path):
    from services.query.snapshots import NothingToSnapshot

    Index(str(tmp_path / "empty.sqlite"))
    assert index_is_new(tmp_path / "empty.sqlite", TOPIC)
    assert index_is_new(tmp_path / "absent.sqlite", TOPIC)
    with pytest.raises(NothingToSnapshot):
        copy_index(str(tmp_path / "empty.sqlite"), str(tmp_path / "copy.sqlite"), TOPIC)
    assert not (tmp_path / "copy.sqlite").exists()
    small_index(tmp_path / "busy.sqlite")
    assert not index_is_new(tmp_path / "busy.sqlite", TOPIC)


def test_the_canonical_dump_ignores_the_order_partitions_were_applied_in(tmp_path):
    one = small_index(tmp_path / "one.sqlite")
    two = small_index(tmp_path / "two.sqlite", reverse=True)
    digest_one, counts = canonical_digest(one.path)
    assert canonical_digest(two.path) == (digest_one, counts)
    assert counts["layers"] == 5 and counts["uploads"] == 5 and counts["tags"] == 1
    # Any difference in content shows: one upload's durable offset.
    db = sqlite3.connect(two.path)
    with db:
        db.execute(
            "UPDATE uploads SET durable_offset = 11 "
            "WHERE upload_id = (SELECT min(upload_id) FROM uploads)"
        )
    db.close()
    assert canonical_digest(two.path)[0] != digest_one
