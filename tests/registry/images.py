"""OCI image layouts written by the tests themselves, for the clients to push.

A layout (image-spec `image-layout.md`: `oci-layout`, `index.json`, `blobs/sha256/<hex>`) is what
`crane push DIR` and `skopeo copy oci:DIR` read, so every byte a client sends comes from here and
the test knows each digest before the registry sees it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(document: dict[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


class Layout:
    """One OCI layout directory; images added to it are listed in its index.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.manifests: list[dict[str, object]] = []

    def add_blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256(data)
        (self.blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def add_image(
        self, layers: list[tuple[Descriptor, str]], architecture: str = "amd64"
    ) -> Descriptor:
        """An image of LAYERS, each (its blob, its diff id), for linux/ARCHITECTURE."""
        config = {
            "architecture": architecture,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
            "config": {},
        }
        config_blob = self.add_blob(canonical(config), OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_blob.json(),
            "layers": [blob.json() for blob, _ in layers],
        }
        descriptor = self.add_blob(canonical(manifest), OCI_MANIFEST)
        entry = descriptor.json() | {"platform": {"architecture": architecture, "os": "linux"}}
        self.manifests.append(entry)
        (self.path / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.manifests})
        )
        return descriptor

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")


def write_random_tar_layer(layout: Layout, size: int, piece: int = 8 << 20) -> Descriptor:
    """An uncompressed tar layer holding one file of SIZE random bytes, written and hashed in
    pieces: a 1 GiB layer never sits in this process's memory either."""
    partial = layout.path / "big-layer.partial"
    hasher = hashlib.sha256()
    with partial.open("wb") as out:

        def emit(data: bytes) -> None:
            hasher.update(data)
            out.write(data)

        header = tarfile.TarInfo("layer/random.bin")
        header.size = size
        header.mode = 0o644
        header.mtime = 1_700_000_000
        emit(header.tobuf(format=tarfile.PAX_FORMAT))
        left = size
        while left:
            data = os.urandom(min(piece, left))
            emit(data)
            left -= len(data)
        # File padding to a 512-byte block, then the two zero blocks that end an archive.
        emit(bytes(-size % tarfile.BLOCKSIZE) + bytes(2 * tarfile.BLOCKSIZE))
        total = out.tell()
    digest = "sha256:" + hasher.hexdigest()
    partial.rename(layout.blob_path(digest))
    return Descriptor(LAYER_TAR, digest, total)
