"""The Avro codec: round trips, single-object framing, schema evolution, hostile bytes."""

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form

from services.core.codec import CODEC, MAGIC, SCHEMA_DIR, Codec, DecodeError, _Schema
from services.core.records import (
    COMMAND_TYPES,
    RECORD_TYPES,
    REPOSITORY_COMMAND_TYPES,
    AppendChunk,
    Command,
    CommandRejected,
    DeadLetterReason,
    FinishUpload,
    LayerCommitted,
    ManifestStored,
    PutManifest,
    RepositoryCommand,
    StartUpload,
    TagMoved,
    UploadStarted,
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


# CRC-64-AVRO as the Avro specification gives it ("Schema Fingerprints"), independent of fastavro.
_EMPTY = 0xC15D213AA4D7A795
_TABLE = []
for _byte in range(256):
    _fp = _byte
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_EMPTY & -(_fp & 1))
    _TABLE.append(_fp)


def crc64_avro(data: bytes) -> int:
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def canonical(definition: object) -> bytes:
    return to_parsing_canonical_form(parse_schema(definition)).encode()


def spec_header(definition: object) -> bytes:
    """The spec's single-object header: C3 01, then the fingerprint as 8 bytes little-endian."""
    return b"\xc3\x01" + crc64_avro(canonical(definition)).to_bytes(8, "little")


def old_header(definition: object) -> bytes:
    """What Layerlog wrote before it followed the spec: the fingerprint byte-reversed."""
    return b"\xc3\x01" + crc64_avro(canonical(definition)).to_bytes(8, "big")


def definition(name: str, version: int) -> dict:
    return json.loads((SCHEMA_DIR / f"{name}.v{version}.avsc").read_text())


def test_the_header_of_the_null_schema_is_the_spec_s():
    # The spec's example value: the CRC-64-AVRO fingerprint of "null" is 0x63dd24e7cc258f8a.
    assert crc64_avro(b'"null"') == 0x63DD24E7CC258F8A
    assert spec_header("null") == bytes.fromhex("c3018a8f25cce724dd63")
    assert MAGIC + _Schema("null", 1, "null").fingerprint == bytes.fromhex("c3018a8f25cce724dd63")


def test_every_record_type_is_written_with_the_spec_header():
    assert {name for name, _ in CODEC.versions()} == set(RECORD_TYPES)
    for name, version in CODEC.versions():
        data = CODEC.encode(sample(name), version=version)
        assert data[:10].hex() == spec_header(definition(name, version)).hex(), (name, version)


def test_records_with_the_old_reversed_header_still_decode_and_are_never_written():
    # The events topic is kept forever, so what Layerlog wrote before the fix must stay readable.
    for name, version in CODEC.versions():
        record = sample(name)
        body = CODEC.encode(record, version=version)[10:]
        spec = spec_header(definition(name, version)) + body
        old = old_header(definition(name, version)) + body
        assert CODEC.read(old) == CODEC.read(spec), (name, version)
        assert CODEC.decode(old) == CODEC.decode(spec), (name, version)
        if version == CODEC.newest[name].version:
            assert CODEC.decode(old) == round_tripped(record)
        assert CODEC.encode(CODEC.decode(old), version=version) == spec, (name, version)


def forge_field_name(definition: dict, target: int) -> str:
    """A field name that, added to `definition`, makes its CRC-64-AVRO fingerprint `target`.

    CRC-64 is affine over GF(2) for messages of one length, so flipping the case of letters in
    a long name moves the fingerprint by a sum of fixed vectors: solve for the flips needed.
    """
    letters = 80
    name = "x" + "A" * letters
    trial = json.loads(json.dumps(definition))
    trial["fields"].append({"name": name, "type": "null"})
    text = canonical(trial)
    start = text.index(name.encode()) + 1
    base = crc64_avro(text)
    basis: list[tuple[int, int]] = []  # (fingerprint difference, letters flipped), reduced
    for i in range(letters):
        flipped = bytearray(text)
        flipped[start + i] ^= 0x20
        vector, mask = crc64_avro(bytes(flipped)) ^ base, 1 << i
        for b_vector, b_mask in basis:
            if vector ^ b_vector < vector:
                vector, mask = vector ^ b_vector, mask ^ b_mask
        if vector:
            basis.append((vector, mask))
            basis.sort(reverse=True)
    want, flips = target ^ base, 0
    for b_vector, b_mask in basis:
        if want ^ b_vector < want:
            want, flips = want ^ b_vector, flips ^ b_mask
    assert want == 0, "the flips do not span every fingerprint; use more letters"
    return "x" + "".join("a" if flips >> i & 1 else "A" for i in range(letters))


def test_a_schema_whose_fingerprint_is_another_s_reversed_one_is_refused(tmp_path: Path):
    # A new schema version whose real fingerprint equals an old schema's byte-reversed one would
    # make an old record's header ambiguous; the codec refuses to be built with it.
    for path in SCHEMA_DIR.glob("*.avsc"):
        (tmp_path / path.name).write_text(path.read_text())
    victim = crc64_avro(canonical(definition("StartUpload", 1)))
    reversed_victim = int.from_bytes(victim.to_bytes(8, "little"), "big")
    forged = definition("FinishUpload", 1)
    forged["fields"].append({"name": forge_field_name(forged, reversed_victim), "type": "null"})
    assert crc64_avro(canonical(forged)) == reversed_victim
    unpublished = CODEC.newest["FinishUpload"].version + 1
    (tmp_path / f"FinishUpload.v{unpublished}.avsc").write_text(json.dumps(forged))
    with pytest.raises(
        ValueError, match=rf"FinishUpload\.v{unpublished} and StartUpload\.v1 have byte-reversed"
    ):
        Codec(tmp_path)


def test_two_versions_with_one_canonical_form_are_refused(tmp_path: Path):
    for path in SCHEMA_DIR.glob("*.avsc"):
        (tmp_path / path.name).write_text(path.read_text())
    same = definition("FinishUpload", 1)
    same["doc"] = "Only the doc differs, and the canonical form drops docs."
    unpublished = CODEC.newest["FinishUpload"].version + 1
    (tmp_path / f"FinishUpload.v{unpublished}.avsc").write_text(json.dumps(same))
    with pytest.raises(ValueError, match="same parsing canonical form"):
        Codec(tmp_path)


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
        "actor": "alice",
        "token": "header.payload.signature",
        # The collector's reclaims.
        "idle_since": when,
        "grace_seconds": 12,
        "sweep_id": "s",
        "marked_at": "0:1 1:2",
        "checked_at": "0:3 1:4",
        "pointer": "WITHDRAWN",
        # The worker's sha256 of an upload's staged bytes (UploadFinished v4).
        "content_sha256": "c" * 64,
    }
    cls = RECORD_TYPES[name]
    if issubclass(cls, Command | RepositoryCommand):
        values["subject"] = "alice"  # who issued it; ManifestStored's subject is a digest
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
    newest = CODEC.newest["FinishUpload"].version
    later = definition("FinishUpload", newest)
    later["fields"].append({"name": "note", "type": "string", "default": "none"})
    (tmp_path / f"FinishUpload.v{newest + 1}.avsc").write_text(json.dumps(later))
    record = FinishUpload(upload_id=UPLOAD, repository="a", size=1, digest="d")
    old = CODEC.encode(record, version=1)
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


# Who did it: subject and token on commands, actor on events, added as new schema versions.

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

# Bytes the release before these fields wrote (captured with it, not with this codec): the newest
# schemas then were StartUpload.v1, UploadStarted.v2, ManifestStored.v1 and TagMoved.v1.
WRITTEN_BEFORE_ACTORS = {
    "StartUpload": "c3014f155d2c83ae0696020463314830663866616435622d643963622d343639662d613136352d"
    "37303836373732383935306506612f6290b2cccaef66",
    "UploadStarted": "c3011e2810b701dbf1cc040465314830663866616435622d643963622d343639662d61313635"
    "2d37303836373732383935306506612f6290b2cccaef66020463311275706c6f6164732f6b00",
    "ManifestStored": "c301b3cb743f533efac20204653206612f6290b2cccaef6602046332020270107368613235"
    "363a64546170706c69636174696f6e2f766e642e6f63692e696d6167652e6d616e69666573742e76312b6a736f6e"
    "04047b7d166d616e6966657374732f6b021e7368613235363a726566657272656400",
    "TagMoved": "c301d3eb9b9fc6a8f0db0204653306612f6290b2cccaef66020463320202680c6c6174657374107368"
    "613235363a6400",
}


def test_records_written_before_subjects_existed_decode_with_none():
    started = CODEC.decode(bytes.fromhex(WRITTEN_BEFORE_ACTORS["StartUpload"]))
    assert started == StartUpload(
        upload_id=UPLOAD, repository="a/b", command_id="c1", issued_at=WHEN, schema_version=1
    )
    assert started.subject is None and started.token is None
    event = CODEC.decode(bytes.fromhex(WRITTEN_BEFORE_ACTORS["UploadStarted"]))
    assert isinstance(event, UploadStarted)
    assert (event.schema_version, event.staging_key, event.actor) == (2, "uploads/k", None)
    stored = CODEC.decode(bytes.fromhex(WRITTEN_BEFORE_ACTORS["ManifestStored"]))
    assert isinstance(stored, ManifestStored)
    # The referrers subject of a v1 record stays the digest it was; nobody is made its actor.
    assert (stored.subject, stored.actor, stored.prev_hash) == ("sha256:referred", None, "p")
    moved = CODEC.decode(bytes.fromhex(WRITTEN_BEFORE_ACTORS["TagMoved"]))
    assert isinstance(moved, TagMoved)
    assert (moved.tag, moved.digest, moved.prev_hash) == ("latest", "sha256:d", "h")
    assert moved.actor is None


def test_every_command_and_event_has_a_newest_version_naming_who():
    for name, cls in RECORD_TYPES.items():
        if name == "DeadLetter":
            continue
        wanted = {"subject", "token"} if issubclass(cls, Command | RepositoryCommand) else {"actor"}
        newest = {f["name"]: f for f in CODEC.newest[name].parsed["fields"]}
        for field in wanted:
            assert newest[field]["type"] == ["null", "string"], (name, field)
            assert newest[field]["default"] is None, (name, field)
        for version in range(1, CODEC.newest[name].version):
            old = {f["name"] for f in CODEC.schema(name, version).parsed["fields"]}
            if wanted <= old:
                continue  # a later version than the one that named who (UploadFinished v4)
            assert not old & wanted, (name, version)
            # An old record reads with nobody named: none of the new fields is guessed.
            decoded = CODEC.decode(CODEC.encode(sample(name), version=version))
            assert all(getattr(decoded, field) is None for field in wanted), (name, version)
        decoded = CODEC.decode(CODEC.encode(sample(name)))
        assert all(getattr(decoded, field) == getattr(sample(name), field) for field in wanted)


def test_actor_and_subject_round_trip_beside_the_referrers_subject():
    stored = sample("ManifestStored")
    assert isinstance(stored, ManifestStored)
    decoded = CODEC.decode(CODEC.encode(stored))
    assert (decoded.subject, decoded.actor) == ("sha256:s", "alice")
    put = PutManifest(
        repository="a/b",
        reference="latest",
        digest="sha256:d",
        media_type="m",
        body=b"{}",
        subject="anonymous",
        token="eyJhbGciOiJFUzI1NiJ9.e30.sig",
    )
    assert CODEC.decode(CODEC.encode(put)) == round_tripped(put)


def test_no_command_shows_its_token_in_its_repr():
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2VjcmV0"
    for cls in COMMAND_TYPES + REPOSITORY_COMMAND_TYPES:
        command = replace(sample(cls.__name__), token=token)  # type: ignore[type-var]
        assert token not in repr(command), cls.__name__
        assert token not in str(command), cls.__name__
        assert "alice" in repr(command), cls.__name__  # who asked may be logged
