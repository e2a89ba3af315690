"""What a manifest says: its media type, the blobs and child manifests it names, its subject.

parse_manifest() checks only what a registry must (the JSON, the media type, descriptors that
are well formed) and keeps the client's bytes untouched: the registry stores and serves those
exact bytes, never a re-encoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from services.oci.references import InvalidReference, parse_oci_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# The short-lived OCI 1.1 release candidates' artifact manifest: "blobs" instead of "layers".
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = frozenset(
    {OCI_MANIFEST, OCI_INDEX, OCI_ARTIFACT, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST}
)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
# Layers a registry must not be asked to hold (licensing): the client fetches them from their
# urls, so a manifest may name them without their bytes being pushed. Deprecated in image-spec
# 1.1, still found in Windows base images.
NON_DISTRIBUTABLE_PREFIXES = (
    "application/vnd.oci.image.layer.nondistributable.",
    "application/vnd.docker.image.rootfs.foreign.",
)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Each descriptor costs the write side a lookup; past this a manifest is an attack, not an
# image (the largest real images have a few hundred layers).
MAX_DESCRIPTORS = 10_000


class ManifestInvalid(ValueError):
    """The body is not a manifest this registry stores; the message says why."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def distributable(self) -> bool:
        return not self.media_type.startswith(NON_DISTRIBUTABLE_PREFIXES)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor | None
    blobs: tuple[Descriptor, ...]  # layers (or an artifact manifest's blobs)
    manifests: tuple[Descriptor, ...]  # an index's children
    subject: Descriptor | None
    artifact_type: str | None  # as the referrers API reports it
    annotations: dict[str, str]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def media_type_of(body: bytes, content_type: str | None) -> str:
    """The media type a PUT stores: the Content-Type, else the body's own mediaType field."""
    declared = _declared_media_type(body)
    content_type = (content_type or "").split(";")[0].strip()
    return content_type or declared or ""


def parse_manifest(body: bytes, content_type: str | None) -> Manifest:
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"manifest is {len(body)} bytes; at most {MAX_MANIFEST_BYTES}")
    document = _json_object(body)
    declared = document.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string")
    media_type = (content_type or "").split(";")[0].strip() or declared or ""
    if declared and media_type != declared:
        raise ManifestInvalid(
            f"Content-Type {media_type!r} does not match the manifest's mediaType {declared!r}"
        )
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type[:200]!r}")
    if media_type != OCI_ARTIFACT and document.get("schemaVersion") != 2:
        raise ManifestInvalid("schemaVersion must be 2")
    config = None
    blobs: tuple[Descriptor, ...] = ()
    manifests: tuple[Descriptor, ...] = ()
    if media_type in INDEX_TYPES:
        manifests = _descriptors(document, "manifests", required=True)
    elif media_type == OCI_ARTIFACT:
        blobs = _descriptors(document, "blobs", required=False)
    else:
        config = _descriptor(document.get("config"), "config")
        blobs = _descriptors(document, "layers", required=True)
    subject = None
    if document.get("subject") is not None:
        subject = _descriptor(document["subject"], "subject")
    artifact_type = document.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid("artifactType must be a string")
    if artifact_type is None and config is not None and media_type == OCI_MANIFEST:
        # The image spec: without artifactType, an image manifest's artifact type is its
        # config's media type (the referrers API reports and filters by that).
        artifact_type = config.media_type
    return Manifest(
        media_type=media_type,
        config=config,
        blobs=blobs,
        manifests=manifests,
        subject=subject,
        artifact_type=artifact_type,
        annotations=_annotations(document.get("annotations"), "annotations"),
    )


def _declared_media_type(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(document, dict) and isinstance(document.get("mediaType"), str):
        return document["mediaType"]
    return None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ManifestInvalid(f"manifest is not JSON: {error}") from None
    except RecursionError:
        raise ManifestInvalid("manifest nests too deeply") from None
    if not isinstance(document, dict):
        raise ManifestInvalid("manifest must be a JSON object")
    return document


def _descriptors(document: dict[str, Any], name: str, *, required: bool) -> tuple[Descriptor, ...]:
    value = document.get(name)
    if value is None and not required:
        return ()
    if not isinstance(value, list):
        raise ManifestInvalid(f"{name} must be a list of descriptors")
    if len(value) > MAX_DESCRIPTORS:
        raise ManifestInvalid(f"{name} has {len(value)} descriptors; at most {MAX_DESCRIPTORS}")
    return tuple(_descriptor(item, f"{name}[{i}]") for i, item in enumerate(value))


def _descriptor(value: object, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestInvalid(f"{where} must be a descriptor object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{where}.mediaType must be a non-empty string")
    if not isinstance(digest, str):
        raise ManifestInvalid(f"{where}.digest must be a string")
    try:
        parse_oci_digest(digest)
    except InvalidReference as error:
        raise ManifestInvalid(f"{where}.digest: {error}") from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ManifestInvalid(f"{where}.size must be a non-negative integer")
    artifact_type = value.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid(f"{where}.artifactType must be a string")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        artifact_type=artifact_type,
        annotations=_annotations(value.get("annotations"), f"{where}.annotations"),
    )


def _annotations(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestInvalid(f"{where} must map strings to strings")
    return dict(value)
