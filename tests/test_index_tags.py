"""Index.tagged_manifest, the one-query lookup behind GET /v2/<name>/manifests/<tag>: it follows
the tag as it moves and answers None once the tag or its manifest is gone."""

from __future__ import annotations

import uuid
from pathlib import Path

from services.core.records import ManifestDeleted, ManifestStored, TagDeleted, TagMoved
from services.query.index import Index

REPOSITORY = "tags/app"


def stored(body: bytes, digest: str) -> ManifestStored:
    return ManifestStored(
        event_id=str(uuid.uuid4()),
        repository=REPOSITORY,
        caused_by=None,
        digest=digest,
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=len(body),
        body=body,
        object_key=f"manifests/{digest}",
        subject=None,
        artifact_type=None,
    )


def moved(tag: str, digest: str, previous: str | None) -> TagMoved:
    return TagMoved(
        event_id=str(uuid.uuid4()),
        repository=REPOSITORY,
        caused_by=None,
        tag=tag,
        digest=digest,
        previous_digest=previous,
    )


def test_tagged_manifest_follows_the_tag(tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.sqlite"))
    first, second = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    offset = iter(range(1, 100))

    def apply(*events: object) -> None:
        index.apply("events", list(events), {0: next(offset)})  # type: ignore[arg-type]

    apply(stored(b'{"n":1}', first), stored(b'{"n":2}', second))
    assert index.tagged_manifest(REPOSITORY, "latest") is None  # no such tag yet

    apply(moved("latest", first, None))
    row = index.tagged_manifest(REPOSITORY, "latest")
    assert row is not None and (row.digest, row.body) == (first, b'{"n":1}')
    assert row == index.manifest(REPOSITORY, first)  # the same row as the lookup by digest
    assert index.tagged_manifest("tags/other", "latest") is None  # tags belong to a repository

    apply(moved("latest", second, first))
    row = index.tagged_manifest(REPOSITORY, "latest")
    assert row is not None and (row.digest, row.body, row.size) == (second, b'{"n":2}', 7)

    apply(
        TagDeleted(
            event_id=str(uuid.uuid4()),
            repository=REPOSITORY,
            caused_by=None,
            tag="latest",
            previous_digest=second,
        )
    )
    assert index.tagged_manifest(REPOSITORY, "latest") is None

    apply(
        moved("v1", first, None),
        ManifestDeleted(
            event_id=str(uuid.uuid4()), repository=REPOSITORY, caused_by=None, digest=first
        ),
    )
    assert index.tagged_manifest(REPOSITORY, "v1") is None  # a tag never names a deleted manifest
