"""`layerlog replay`: the index as it was at a point of the log, in a new index file.

The point is a time (every partition cut at its first record at or after it) or explicit
PARTITION:OFFSET cuts (the offset itself is not included; unnamed partitions are cut at their end).
`layerlog query --index FILE --read-only` then serves Exists/Fetch from the result, and the OCI
read routes: the manifests, tags and referrers as they were at the cut.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.core.settings import Settings
from services.query.replay import cut_offsets, rebuild

_PARTITION_OFFSET = re.compile(r"^(\d+):(\d+)$")


class UntilError(ValueError):
    """--until values that are neither one time nor PARTITION:OFFSET pairs."""


@dataclass(frozen=True)
class Until:
    time: datetime | None = None
    offsets: dict[int, int] | None = None

    def describe(self) -> str:
        if self.time is not None:
            return "as of " + self.time.isoformat()
        if self.offsets:
            return "before " + " ".join(f"{p}:{o}" for p, o in sorted(self.offsets.items()))
        return "up to now"


def parse_until(values: list[str] | None) -> Until:
    if not values:
        return Until()
    pairs = [_PARTITION_OFFSET.match(v.strip()) for v in values]
    if all(pairs):
        offsets: dict[int, int] = {}
        for match in pairs:
            assert match is not None
            partition, offset = int(match[1]), int(match[2])
            if partition in offsets:
                raise UntilError(f"--until names partition {partition} twice")
            offsets[partition] = offset
        return Until(offsets=offsets)
    if len(values) > 1:
        raise UntilError(
            "--until takes one ISO-8601 time, or PARTITION:OFFSET once per partition, not a mix"
        )
    try:
        # Python 3.11 reads the common ISO-8601 forms, "Z" included.
        moment = datetime.fromisoformat(values[0].strip())
    except ValueError:
        raise UntilError(
            f"--until {values[0]!r} is neither an ISO-8601 time (2025-01-31T12:00:00Z) "
            "nor PARTITION:OFFSET"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # the log's timestamps are UTC; so is a bare time
    return Until(time=moment)


@dataclass(frozen=True)
class Replayed:
    out: Path
    cut: dict[int, int]
    events: int
    layers: int
    uploads: int
    manifests: int = 0
    tags: int = 0
    reclaims: int = 0  # BlobReclaimed and ManifestReclaimed applied


async def replay(settings: Settings, out: str | Path, until: Until) -> Replayed:
    path = Path(out)
    if await asyncio.to_thread(path.exists):
        # Checked before reading the log, not after: a replay never overwrites an index.
        raise FileExistsError(f"{path} exists; replay writes a new index file")
    # Built under another name and copied into place at the end, so that FILE exists only once
    # it is complete; a replay that was interrupted leaves the .partial file behind.
    partial = path.with_name(path.name + ".partial")
    await asyncio.to_thread(_remove, partial)
    cut = await cut_offsets(settings, until_time=until.time, until=until.offsets)
    events = await rebuild(settings, partial, cut)
    layers, uploads, manifests, tags, reclaims = await asyncio.to_thread(_seal, partial, path)
    await asyncio.to_thread(_remove, partial)
    return Replayed(path, cut, events, layers, uploads, manifests, tags, reclaims)


def _seal(partial: Path, out: Path) -> tuple[int, int, int, int, int]:
    """Copies the replayed index into one self-contained file and counts what it holds.

    The projection writes in WAL mode, whose -wal and -shm files a read-only reader would need
    next to the index; VACUUM INTO writes an ordinary rollback-journal database instead, and
    reads (so it works while the replay's own connections are still open).
    """
    db = sqlite3.connect(partial)
    try:
        db.execute("VACUUM INTO ?", (str(out),))
    finally:
        db.close()
    db = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
    try:
        counts = [
            int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in ("layers", "uploads", "manifests", "tags", "reclaims")
        ]
        return counts[0], counts[1], counts[2], counts[3], counts[4]
    finally:
        db.close()


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
