"""Holds: a note a service leaves in the bucket before it names stored bytes the log does not
yet say are in use, so that the garbage collector (services/gc) keeps them.

Three readers may start to rely on a copy the collector is about to reclaim:

- the verifier, deduplicating a push onto the digest's first copy (its blobs/ pointer);
- the upload worker, mounting a blob by its pointer (MountBlob);
- the upload worker, writing a manifest's copy (PutManifest) for a ManifestStored to name.

Each writes its hold first and only then reads the pointer (again) or writes the copy; the
collector withdraws the pointer first and only then lists the holds. With storage that reads its
own writes (S3 does, and so does versitygw), one of the two sees the other: either the reader's
second look finds the pointer gone (and keeps a copy of its own), or the collector finds the hold
(and keeps the bytes). services/gc/sweep.py walks through every interleaving.

A hold names its cause, so the collector can tell when it is done with: once the cause's outcome
is in the log (the upload's verdict, the command's outcome), whatever it linked is in the index
and the hold is deleted. Until then it stays, however long the cause takes (a verifier down for a
day replays its stored verdict, which names the held copy, when it comes back).

  gc-holds/blobs/<alg>/<hex>/upload-<upload id>    the verifier, for a push it deduplicates
  gc-holds/blobs/<alg>/<hex>/mount-<command id>    the upload worker, for a MountBlob
  gc-holds/manifests/<alg>/<hex>/put-<command id>  the upload worker, for a PutManifest
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum

from services.core.objectstore import ObjectStore

HOLD_PREFIX = "gc-holds/"
BLOB_HOLDS = f"{HOLD_PREFIX}blobs/"
MANIFEST_HOLDS = f"{HOLD_PREFIX}manifests/"


class HoldCause(StrEnum):
    UPLOAD = "upload"  # resolved by the upload's verdict (LayerCommitted or LayerValidationFailed)
    MOUNT = "mount"  # resolved by the MountBlob's outcome (BlobMounted or a rejection)
    PUT = "put"  # resolved by the PutManifest's outcome (ManifestStored or a rejection)


@dataclass(frozen=True)
class Hold:
    key: str  # the hold's own object key
    manifest: bool  # a manifest's copy (else a blob's)
    digest: str
    cause: HoldCause
    cause_id: str  # the upload id or the command id


def blob_hold_key(digest: str, cause: HoldCause, cause_id: str) -> str:
    algorithm, _, hex_value = digest.partition(":")
    return f"{BLOB_HOLDS}{algorithm}/{hex_value}/{cause}-{cause_id}"


def manifest_hold_key(digest: str, command_id: str) -> str:
    algorithm, _, hex_value = digest.partition(":")
    return f"{MANIFEST_HOLDS}{algorithm}/{hex_value}/{HoldCause.PUT}-{command_id}"


def parse_hold_key(key: str) -> Hold | None:
    """The hold an object key names, or None for a key that is not one."""
    if not key.startswith(HOLD_PREFIX):
        return None
    parts = key[len(HOLD_PREFIX) :].split("/")
    if len(parts) != 4 or parts[0] not in ("blobs", "manifests"):
        return None
    kind, algorithm, hex_value, name = parts
    cause_text, sep, cause_id = name.partition("-")
    if not sep or not cause_id or cause_text not in HoldCause.__members__.values():
        return None
    cause = HoldCause(cause_text)
    manifest = kind == "manifests"
    if manifest != (cause == HoldCause.PUT):
        return None
    return Hold(key, manifest, f"{algorithm}:{hex_value}", cause, cause_id)


async def hold(store: ObjectStore, key: str, object_key: str) -> None:
    """Writes the hold; returns once storage has it (a later list shows it)."""
    note = {"object_key": object_key, "at_ms": time.time_ns() // 1_000_000}
    await store.put(key, json.dumps(note).encode())


async def hold_blob(
    store: ObjectStore, digest: str, cause: HoldCause, cause_id: str, object_key: str
) -> None:
    await hold(store, blob_hold_key(digest, cause, cause_id), object_key)


async def hold_manifest(store: ObjectStore, digest: str, command_id: str, object_key: str) -> None:
    await hold(store, manifest_hold_key(digest, command_id), object_key)


async def list_holds(store: ObjectStore) -> list[Hold]:
    """Every hold in the bucket (keys that are not holds are skipped)."""
    found = []
    for key in await store.list_keys(HOLD_PREFIX):
        parsed = parse_hold_key(key)
        if parsed is not None:
            found.append(parsed)
    return found
