"""Apache Avro for Java reads every record type Layerlog writes, and Layerlog reads Java's.

The Java side is tests/interop/java (Maven, org.apache.avro:avro). The session builds it once
with mvn (later runs reuse .cache/interop/java while the sources are unchanged), then runs it
once over one directory of records, one file each; the tests compare field values here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import textwrap
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastavro import json_writer

from services.core.codec import CODEC, SCHEMA_DIR
from services.core.records import RECORD_TYPES
from tests.test_codec import definition, old_header, spec_header

ROOT = Path(__file__).resolve().parents[2]
JAVA = ROOT / "tests" / "interop" / "java"
BUILD = ROOT / ".cache" / "interop" / "java"  # the pom's <directory>
MAIN = "dev.layerlog.interop.Interop"

pytestmark = pytest.mark.timeout(900)  # a first build downloads Avro and Maven's plugins

WHEN = datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
BEFORE_1970 = datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)  # -1 ms
TEXT = 'ü ☃ 𝄞 "quoted" back\\slash\nnewline\x00nul'


def build_inputs() -> str:
    files = [JAVA / "pom.xml", *sorted((JAVA / "src").rglob("*.java"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(JAVA).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build() -> list[str]:
    """The Java program's classpath, building it with mvn unless the last build is still good."""
    stamp, classpath_file, log = BUILD / "stamp", BUILD / "classpath.txt", BUILD / "mvn.log"
    wanted = build_inputs()

    def classpath() -> list[str] | None:
        if not classpath_file.exists():
            return None
        entries = [str(BUILD / "classes"), *classpath_file.read_text().strip().split(os.pathsep)]
        return entries if all(Path(e).exists() for e in entries) else None

    resolved = classpath()
    if resolved and stamp.exists() and stamp.read_text() == wanted:
        return resolved
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH; the Java interop test needs Java 17+ and Maven")
    stamp.unlink(missing_ok=True)
    BUILD.mkdir(parents=True, exist_ok=True)
    command = ["mvn", "-q", "-B", "-Dstyle.color=never", "-f", str(JAVA / "pom.xml")]
    goals = ["compile", "dependency:build-classpath"]
    # Offline only when an earlier build resolved everything; a fresh machine downloads from
    # Maven Central, and an offline attempt that misses something (a changed pom) goes online.
    attempts = [[*command, "-o", *goals], [*command, *goals]] if resolved else [command + goals]
    for attempt in attempts:
        with log.open("w") as out:
            done = subprocess.run(attempt, stdout=out, stderr=subprocess.STDOUT, timeout=840)
        if done.returncode == 0:
            break
    else:
        pytest.fail(f"mvn failed ({' '.join(attempt)}):\n{log.read_text()[-4000:]}")
    built = classpath()
    assert built, f"mvn succeeded but left no classpath in {classpath_file}"
    stamp.write_text(wanted)
    return built


def sample_value(schema: Any, name: str, variant: str, version: int) -> Any:
    """A value of an Avro type with the awkward cases: every byte, non-ASCII, <1970, nulls."""
    if name == "schema_version":
        return version
    if isinstance(schema, list):  # the nullable unions, ["null", T]
        (other,) = [branch for branch in schema if branch != "null"]
        return None if variant == "nulls" else sample_value(other, name, variant, version)
    if isinstance(schema, dict):
        assert schema.get("logicalType") == "timestamp-millis", schema
        return WHEN if variant == "values" else BEFORE_1970
    return {
        "string": f"{name}: {TEXT}",
        "int": 2**31 - 1 if variant == "values" else -(2**31),
        "long": 2**40 + 3 if variant == "values" else -(2**63),
        "bytes": bytes(range(256)) * 8 if variant == "values" else b"",
    }[schema]


VARIANTS = ("values", "nulls")


def sample(name: str, version: int, variant: str) -> dict[str, Any]:
    return {
        f["name"]: sample_value(f["type"], f["name"], variant, version)
        for f in definition(name, version)["fields"]
    }


def record_of(name: str, values: dict[str, Any]) -> Any:
    return RECORD_TYPES[name](**values)


@dataclass
class Exchange:
    work: Path
    written: dict[str, bytes]  # label -> what Layerlog wrote
    expected: dict[str, dict[str, Any]]  # label -> the fields Java should decode


@pytest.fixture(scope="session")
def java_classpath() -> list[str]:
    """Built once a session, and not at all while .cache/interop/java matches the sources."""
    started = time.monotonic()
    classpath = build()
    print(f"Java interop: build {time.monotonic() - started:.1f}s")
    return classpath


@pytest.fixture(scope="module")
def exchange(java_classpath: list[str], tmp_path_factory: pytest.TempPathFactory) -> Exchange:
    work = tmp_path_factory.mktemp("interop")
    for folder in ("layerlog", "legacy", "values"):
        (work / folder).mkdir()
    written, expected = {}, {}
    for name, version in CODEC.versions():
        newest = definition(name, CODEC.newest[name].version)
        for variant in VARIANTS:
            label = f"{name}.v{version}.{variant}"
            values = sample(name, version, variant)
            full = sample(name, CODEC.newest[name].version, variant)
            data = CODEC.encode(record_of(name, {**full, **values}), version=version)
            (work / "layerlog" / f"{label}.bin").write_bytes(data)
            written[label] = data
            # Read with the newest schema: a field the writer lacked takes its default.
            expected[label] = {
                f["name"]: values[f["name"]] if f["name"] in values else f["default"]
                for f in newest["fields"]
            }
            old = old_header(definition(name, version)) + data[10:]
            (work / "legacy" / f"{label}.bin").write_bytes(old)
            if version == CODEC.newest[name].version:
                out = io.StringIO()
                json_writer(out, CODEC.newest[name].parsed, [values])
                (work / "values" / f"{name}.{variant}.json").write_text(out.getvalue())
    started = time.monotonic()
    done = subprocess.run(
        ["java", "-cp", os.pathsep.join(java_classpath), MAIN, str(SCHEMA_DIR), str(work)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the Java program failed:\n{done.stdout}\n{done.stderr}"
    print(f"Java interop: Java run {time.monotonic() - started:.1f}s, {done.stdout.strip()}")
    return Exchange(work, written, expected)


def from_java(value: Any) -> Any:
    """A value as Interop.java wrote it, as Python: tagged bytes and instants untagged."""
    if isinstance(value, dict):
        ((tag, inner),) = value.items()
        if tag == "bytes":
            return bytes.fromhex(inner)
        if tag == "instant":
            return datetime.fromisoformat(inner)
        raise AssertionError(f"unexpected tag {tag}")
    return value


def test_every_record_type_and_version_is_in_the_exchange(exchange: Exchange):
    labels = {label.split(".")[0] for label in exchange.written}
    assert labels == set(RECORD_TYPES)
    assert len(exchange.written) == len(CODEC.versions()) * len(VARIANTS)


@pytest.mark.parametrize(
    "folder",
    [
        "layerlog-avro",  # Avro's BinaryMessageDecoder alone, the type known from the file name
        "layerlog-topics",  # LayerlogTopics.decode (README.md), the type found by fingerprint
        "legacy-topics",  # LayerlogTopics.decode also reads the records from before the fix
    ],
)
def test_java_decodes_every_record_layerlog_writes(exchange: Exchange, folder: str):
    failures = []
    for label, data in sorted(exchange.written.items()):
        name = label.split(".")[0]
        got = json.loads((exchange.work / folder / f"{label}.json").read_text())
        if "error" in got:
            failures.append(f"{label}: Java: {got['error']}: {got['message']}")
            continue
        full_name = f"{definition(name, 1)['namespace']}.{name}"
        assert got["writer"] == got["reader"] == full_name, label
        # Java's own fingerprint of the writer schema is the header's 8 bytes.
        assert got["writer_fingerprint"] == data[2:10].hex(), label
        decoded = {field: from_java(value) for field, value in got["fields"].items()}
        assert decoded == exchange.expected[label], label
    assert not failures, "\n".join(failures)


def test_avro_alone_finds_no_schema_for_the_old_reversed_header(exchange: Exchange):
    # What Layerlog wrote before it followed the spec: Avro's decoder cannot place it.
    for label in exchange.written:
        got = json.loads((exchange.work / "legacy-avro" / f"{label}.json").read_text())
        assert got.get("error") == "MissingSchemaException", (label, got)


def test_layerlog_decodes_every_record_type_java_writes(exchange: Exchange):
    names = set()
    for path in sorted((exchange.work / "values").glob("*.json")):
        name, variant = path.stem.split(".")
        names.add(name)
        data = (exchange.work / "java-written" / f"{path.stem}.bin").read_bytes()
        version = CODEC.newest[name].version
        assert data[:10] == spec_header(definition(name, version)), path.stem
        values = sample(name, version, variant)
        assert CODEC.decode(data) == record_of(name, values), path.stem
        # Avro's binary encoding has one form for a value, so the bytes are Layerlog's own.
        assert data == CODEC.encode(record_of(name, values)), path.stem
    assert names == set(RECORD_TYPES)


def test_the_readme_shows_the_java_that_runs():
    source = (JAVA / "src/main/java/dev/layerlog/interop/LayerlogTopics.java").read_text()
    core = source.split("// README begin\n")[1].split("    // README end")[0]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Reading the topics from another language")[1]
    snippet = section.split("```java\n")[1].split("```")[0]
    assert snippet == textwrap.dedent(core), "README.md and LayerlogTopics.java differ"
