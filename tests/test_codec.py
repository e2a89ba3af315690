"""The Avro codec: round trips, single-object framing, schema evolution, hostile bytes."""

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.core.codec import CODEC, SCHEMA_DIR, Codec, DecodeError
from services.core.records import (
    COMMAND_TYPES,
    RECORD_TYPES,
    AppendChunk,
    CommandRejected,
    DeadLetterReason,
    FinishUpload,
    LayerCommitted,
)

UPLOAD = "0f8fad5b-d9cb-469f-a165-70867728950e"


def round_tripped(record):
    """The record as read back: written with the newest schema, which it says it was."""
    return replace(record, schema_version=CODEC.newest[type(record).__name__].version)


def test_every_record_type_has_a_schema_and_round_trips():
    assert set(CODEC.newest) == set(RECORD_TYPES)
    chunk = AppendChunk(upload_id=UPLOAD, repository="a/b", offset=7, data=b"\x00\xff" * 10)
    assert CODEC.decode(CODEC.encode(chunk)) == round_tripped(chunk)
    committed = LayerCommitted(
        event_id="e",
        upload_id=UPLOAD,
        repository="a/b",
        caused_by="c",
        digest="sha256:" + "0" * 64,
        size=3,
        object_key="k",
        committed_at=datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
        blob_sha256="sha256:" + "1" * 64,
    )
    assert CODEC.decode(CODEC.encode(committed)) == round_tripped(committed)
    rejected = CommandRejected(
        event_id="e",
        upload_id=UPLOAD,
        repository="a",
        caused_by=None,
        command_type="AppendChunk",
        reason="OFFSET_MISMATCH",
        detail="d",
        expected_offset=5,
    )
    assert CODEC.decode(CODEC.encode(rejected)) == round_tripped(rejected)


def test_single_object_header_carries_the_schema_fingerprint():
    data = CODEC.encode(FinishUpload(upload_id=UPLOAD, repository="a", size=1, digest="d"))
    assert data[:2] == b"\xc3\x01"
    assert CODEC.by_fingerprint[data[2:10]].name == "FinishUpload"


def test_schema_files_mirror_the_dataclasses():
    # The newest schema of each type has exactly the dataclass's fields; older ones a subset.
    for path in SCHEMA_DIR.glob("*.avsc"):
        schema = json.loads(path.read_text())
        fields = {f["name"] for f in schema["fields"]}
        wanted = set(RECORD_TYPES[schema["name"]].__dataclass_fields__)
        version = int(path.name.split(".v")[1].split(".")[0])
        if version == CODEC.newest[schema["name"]].version:
            assert fields == wanted, path.name
        else:
            assert fields < wanted, path.name


def sample(name: str) -> object:
    """A record of each type, to write with every schema version ever published."""
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    values = {
        "command_id": "c",
        "event_id": "e",
        "upload_id": UPLOAD,
        "repository": "a/b",
        "issued_at": when,
        "occurred_at": when,
        "committed_at": when,
        "caused_by": "c",
        "offset": 1,
        "data": b"d",
        "size": 2,
        "digest": "sha256:" + "0" * 64,
        "length": 3,
        "durable_offset": 4,
        "chunk_sha256": "5",
        "staged_size": 6,
        "staging_key": "k",
        "object_key": "k",
        "blob_sha256": "b",
        "reason": "r",
        "expected": "x",
        "actual": "y",
        "detail": "z",
        "command_type": "t",
        "expected_offset": 7,
        "idle_seconds": 8,
        "source_topic": "s",
        "source_partition": 9,
        "source_offset": 10,
        "key": b"k",
        "original": b"o",
        "ttl_seconds": 11,
        "prev_hash": "p",
        "reference": "latest",
        "media_type": "application/vnd.oci.image.manifest.v1+json",
        "body": b"{}",
        "source_repository": "other/repo",
        "subject": "sha256:s",
        "artifact_type": "application/example",
        "tag": "v1",
        "previous_digest": "sha256:p",
    }
    cls = RECORD_TYPES[name]
    return cls(**{f: values[f] for f in cls.__dataclass_fields__ if f != "schema_version"})


def test_newest_reader_reads_every_published_writer():
    for name, version in CODEC.versions():
        record = sample(name)
        decoded = CODEC.decode(CODEC.encode(record, version=version))
        assert type(decoded) is type(record)
        assert decoded.schema_version == version
        newest_fields = {f["name"] for f in CODEC.newest[name].parsed["fields"]}
        old_fields = {f["name"] for f in CODEC.schema(name, version).parsed["fields"]}
        for field in old_fields & newest_fields - {"schema_version"}:
            assert getattr(decoded, field) == getattr(record, field), (name, version, field)


def test_an_added_field_takes_its_default_when_reading_old_bytes(tmp_path: Path):
    for path in SCHEMA_DIR.glob("*.avsc"):
        (tmp_path / path.name).write_text(path.read_text())
    v2 = json.loads((SCHEMA_DIR / "FinishUpload.v1.avsc").read_text())
    v2["fields"].append({"name": "note", "type": "string", "default": "none"})
    (tmp_path / "FinishUpload.v2.avsc").write_text(json.dumps(v2))
    old = CODEC.encode(FinishUpload(upload_id=UPLOAD, repository="a", size=1, digest="d"))
    name, values = Codec(tmp_path).read(old)
    assert name == "FinishUpload"
    assert values["note"] == "none"
    assert values["schema_version"] == 1
    assert values["size"] == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", DeadLetterReason.NOT_SINGLE_OBJECT_ENCODED),
        (b"plain text command", DeadLetterReason.NOT_SINGLE_OBJECT_ENCODED),
        (b"\xc3\x01" + b"\x00" * 8 + b"body", DeadLetterReason.UNKNOWN_FINGERPRINT),
    ],
)
def test_hostile_bytes_raise_decode_errors(data, reason):
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(data)
    assert caught.value.reason == reason


def test_truncated_and_padded_records_are_refused():
    data = CODEC.encode(AppendChunk(upload_id=UPLOAD, repository="a", offset=0, data=b"x" * 100))
    for cut in (11, 20, len(data) - 1):
        with pytest.raises(DecodeError) as caught:
            CODEC.decode(data[:cut])
        assert caught.value.reason in (DeadLetterReason.TRUNCATED, DeadLetterReason.MALFORMED_AVRO)
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(data + b"\x00")
    assert caught.value.reason == DeadLetterReason.MALFORMED_AVRO


def test_an_event_where_a_command_belongs_is_refused():
    event = CommandRejected(
        event_id="e",
        upload_id=UPLOAD,
        repository="a",
        caused_by=None,
        command_type="x",
        reason="y",
        detail="z",
    )
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(CODEC.encode(event), COMMAND_TYPES)
    assert caught.value.reason == DeadLetterReason.UNEXPECTED_TYPE
