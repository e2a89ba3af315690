"""Avro single-object encoding of the records in services.core.records.

Each message is 0xC3 0x01, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer's schema,
then the Avro binary body. Every schema version ever published stays in schemas/, so a reader
resolves an old record (found by its fingerprint) against the newest schema of its type.

Layerlog once wrote the fingerprint byte-reversed (big-endian), which no other Avro reader finds.
The events topic keeps those records forever, so the codec still reads that legacy header; it
writes only the spec's. A legacy header that could also be read as another schema's real one is
refused when the codec is built, so no record can be ambiguous.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from services.core.records import RECORD_TYPES, DeadLetterReason

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
_SCHEMA_FILE = re.compile(r"^(?P<name>[A-Za-z]+)\.v(?P<version>\d+)\.avsc$")


class DecodeError(ValueError):
    """Bytes that are not a record this codec knows; `reason` is a DeadLetterReason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Schema:
    def __init__(self, name: str, version: int, definition: dict[str, Any]) -> None:
        self.name = name
        self.version = version
        self.parsed = parse_schema(definition)
        canonical = to_parsing_canonical_form(self.parsed)
        # fastavro's hex string is the fingerprint's 8 bytes already little-endian, in order.
        self.fingerprint = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
        # What Layerlog wrote before the fix: the same 8 bytes reversed.
        self.legacy_fingerprint = self.fingerprint[::-1]

    def __repr__(self) -> str:
        return f"{self.name}.v{self.version}"


class Codec:
    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self.by_fingerprint: dict[bytes, _Schema] = {}
        # Headers written before the fix; read, never written.
        self.by_legacy_fingerprint: dict[bytes, _Schema] = {}
        self.newest: dict[str, _Schema] = {}
        for path in sorted(schema_dir.glob("*.avsc")):
            match = _SCHEMA_FILE.match(path.name)
            if not match:
                raise ValueError(f"{path}: schema files are named NAME.vN.avsc")
            schema = _Schema(match["name"], int(match["version"]), json.loads(path.read_text()))
            if schema.name not in RECORD_TYPES:
                raise ValueError(f"{path}: no record type {schema.name} in services.core.records")
            same = self.by_fingerprint.get(schema.fingerprint)
            if same is not None:
                raise ValueError(
                    f"{path}: {schema} has the same parsing canonical form as {same}, so a "
                    "record could not say which of the two wrote it"
                )
            self.by_fingerprint[schema.fingerprint] = schema
            self.by_legacy_fingerprint[schema.legacy_fingerprint] = schema
            current = self.newest.get(schema.name)
            if current is None or current.version < schema.version:
                self.newest[schema.name] = schema
        self.field_names = {
            name: {f.name for f in fields(cls)} for name, cls in RECORD_TYPES.items()
        }
        missing = set(RECORD_TYPES) - set(self.newest)
        if missing:
            raise ValueError(f"no schema in {schema_dir} for {sorted(missing)}")
        for legacy, schema in self.by_legacy_fingerprint.items():
            other = self.by_fingerprint.get(legacy)
            if other is not None and other is not schema:
                # Symmetric: each one's fingerprint is the other's reversed.
                first, second = sorted((schema, other), key=repr)
                raise ValueError(
                    f"{first} and {second} have byte-reversed fingerprints of each other "
                    f"({first.fingerprint.hex()}, {second.fingerprint.hex()}); Layerlog wrote "
                    "fingerprints reversed before it followed the spec, so a record with either "
                    "header could be of both: change the schema not yet published (a field "
                    "name will do) so its fingerprint differs"
                )

    def encode(self, record: object, *, version: int | None = None) -> bytes:
        name = type(record).__name__
        schema = self.newest[name] if version is None else self.schema(name, version)
        body = {f.name: getattr(record, f.name) for f in fields(record)}  # type: ignore[arg-type]
        body["schema_version"] = schema.version
        out = io.BytesIO()
        out.write(MAGIC)
        out.write(schema.fingerprint)
        schemaless_writer(out, schema.parsed, body)
        return out.getvalue()

    def decode(self, data: bytes, expected: tuple[type, ...] | None = None) -> Any:
        name, values = self.read(data, expected)
        cls = RECORD_TYPES[name]
        if values.keys() == self.field_names[name]:
            # The reader schema mirrors the dataclass, so its fields are exactly these: set them
            # directly. A frozen dataclass's __init__ assigns each through object.__setattr__,
            # about a third of the cost of decoding a small event (replays decode millions).
            record = object.__new__(cls)
            record.__dict__.update(values)
            return record
        try:
            return cls(**values)
        except TypeError as error:
            raise DecodeError(DeadLetterReason.MALFORMED_AVRO, str(error)) from None

    def read(
        self, data: bytes, expected: tuple[type, ...] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """The record's type name and its fields, resolved to the newest schema of that type."""
        if len(data) < HEADER_SIZE or not data.startswith(MAGIC):
            raise DecodeError(
                DeadLetterReason.NOT_SINGLE_OBJECT_ENCODED,
                f"expected the Avro single-object header C3 01 and a fingerprint, "
                f"got {data[:HEADER_SIZE].hex() or 'nothing'}",
            )
        writer = self.by_fingerprint.get(data[2:HEADER_SIZE])
        if writer is None:
            writer = self.by_legacy_fingerprint.get(data[2:HEADER_SIZE])
        if writer is None:
            raise DecodeError(
                DeadLetterReason.UNKNOWN_FINGERPRINT,
                f"no known schema has fingerprint {data[2:HEADER_SIZE].hex()}",
            )
        reader = self.newest[writer.name]
        cls = RECORD_TYPES[writer.name]
        if expected is not None and not issubclass(cls, expected):
            raise DecodeError(
                DeadLetterReason.UNEXPECTED_TYPE,
                f"a {writer.name} does not belong here (expected "
                f"{', '.join(t.__name__ for t in expected)})",
            )
        body = io.BytesIO(data)
        body.seek(HEADER_SIZE)
        try:
            values = schemaless_reader(body, writer.parsed, reader.parsed)
        except (EOFError, StopIteration) as error:
            raise DecodeError(
                DeadLetterReason.TRUNCATED, f"{writer.name} ends early: {error!r}"
            ) from None
        except Exception as error:  # fastavro raises many kinds on garbage; all mean the same
            raise DecodeError(
                DeadLetterReason.MALFORMED_AVRO, f"{writer.name} body is not valid Avro: {error!r}"
            ) from None
        if body.tell() != len(data):
            raise DecodeError(
                DeadLetterReason.MALFORMED_AVRO,
                f"{len(data) - body.tell()} trailing bytes after the {writer.name} record",
            )
        return writer.name, values

    def schema(self, name: str, version: int) -> _Schema:
        for schema in self.by_fingerprint.values():
            if schema.name == name and schema.version == version:
                return schema
        raise KeyError(f"{name} v{version}")

    def versions(self) -> list[tuple[str, int]]:
        return sorted((s.name, s.version) for s in self.by_fingerprint.values())


def event_hash(encoded: bytes) -> str:
    """The link of an upload's hash chain: sha256 of an event's single-object encoding."""
    return hashlib.sha256(encoded).hexdigest()


CODEC = Codec()
