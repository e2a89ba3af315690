"""Where shared things live in the bucket, and the formats more than one service reads.

- blobs/<alg>/<hex>: the digest's blob pointer, naming the object that holds its first
  committed copy (the verifier writes it; the upload worker mounts blobs by it).
- manifests/<alg>/<hex>: a manifest's exact bytes, content addressed, so one copy serves every
  repository that stores it.
- repository-state/<name>/_state.json: a repository's tags, manifests and chain head (the
  worker's).
- gc-holds/...: what the verifier and the upload worker are about to rely on, for the garbage
  collector (services/core/holds.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass

from services.core.objectstore import ObjectNotFound, ObjectStore

BLOB_POINTER_PREFIX = "blobs/"
MANIFEST_PREFIX = "manifests/"
REPOSITORY_STATE_PREFIX = "repository-state/"


def _by_digest(prefix: str, digest: str) -> str:
    algorithm, _, hex_value = digest.partition(":")
    return f"{prefix}{algorithm}/{hex_value}"


def blob_pointer_key(digest: str) -> str:
    return _by_digest(BLOB_POINTER_PREFIX, digest)


def manifest_key(digest: str) -> str:
    return _by_digest(MANIFEST_PREFIX, digest)


def repository_state_key(repository: str) -> str:
    # No name component starts with '_', so no repository's key is a prefix "folder" of another's:
    # with "<name>.json", the names "a.json/b" and "a" would need repository-state/a.json to be
    # both an object and a folder, which a filesystem-backed S3 server refuses for good.
    return f"{REPOSITORY_STATE_PREFIX}{repository}/_state.json"


@dataclass(frozen=True)
class BlobPointer:
    """A committed blob: where its bytes are, and what they are.

    Pointers written before size and blob_sha256 were added name only the object; resolve()
    fills those in from the object itself."""

    object_key: str
    size: int | None = None
    blob_sha256: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BlobPointer:
        raw = json.loads(data)
        return cls(
            object_key=str(raw["object_key"]),
            size=raw.get("size"),
            blob_sha256=raw.get("blob_sha256"),
        )


async def read_blob_pointer(store: ObjectStore, digest: str) -> BlobPointer | None:
    try:
        return BlobPointer.from_json(await store.get(blob_pointer_key(digest)))
    except ObjectNotFound:
        return None


async def resolve_blob(store: ObjectStore, digest: str) -> BlobPointer | None:
    """The digest's committed blob with its size and sha256, or None when no stored copy is
    left (no pointer, or an operator removed the object it names)."""
    pointer = await read_blob_pointer(store, digest)
    if pointer is None:
        return None
    try:
        info = await store.stat(pointer.object_key)
    except ObjectNotFound:
        return None
    blob_sha256 = pointer.blob_sha256
    if blob_sha256 is None:
        if digest.startswith("sha256:"):
            blob_sha256 = digest
        else:  # an old pointer of another algorithm: only the bytes can say
            blob_sha256 = await _sha256_of(store, pointer.object_key)
    return BlobPointer(pointer.object_key, info.size, blob_sha256)


async def _sha256_of(store: ObjectStore, key: str) -> str:
    hasher = hashlib.sha256()
    async for chunk in store.stream(key):
        await asyncio.to_thread(hasher.update, chunk)
    return "sha256:" + hasher.hexdigest()
