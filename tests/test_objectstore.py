"""The object-store seam's multipart verbs on the real S3: every page of a listing, and the
named errors for an upload that is gone. (tests/test_stack.py drives create, put_part,
complete and abort on the happy path.)"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from services.core.objectstore import (
    S3_MAX_UPLOADS_PAGE,
    MultipartUpload,
    ObjectNotFound,
    ObjectStore,
)


async def open_uploads(store: ObjectStore, keys: list[str]) -> list[MultipartUpload]:
    """Starts one multipart upload per key (a key may repeat), a few dozen at a time."""
    gate = asyncio.Semaphore(24)

    async def one(key: str) -> MultipartUpload:
        async with gate:
            return MultipartUpload(key, await store.start_multipart(key))

    return list(await asyncio.gather(*(one(key) for key in keys)))


async def abort_all(store: ObjectStore, uploads: list[MultipartUpload]) -> None:
    gate = asyncio.Semaphore(24)

    async def one(upload: MultipartUpload) -> None:
        async with gate:
            await store.abort_multipart(upload.key, upload.upload_id)

    await asyncio.gather(*(one(u) for u in uploads))


async def test_listing_reads_every_page_of_multipart_uploads(store: ObjectStore):
    prefix = f"paging-test/{uuid.uuid4()}/"
    # One key with more uploads than a page (a page then ends inside it), then keys with one
    # each (later pages end between keys).
    crowded = f"{prefix}a/data"
    keys = [crowded] * (S3_MAX_UPLOADS_PAGE + 10) + [f"{prefix}k{i:03d}/data" for i in range(60)]
    opened = await open_uploads(store, keys)
    try:
        listed = await store.multipart_uploads(prefix)
        assert len(listed) == len(opened) == 1070
        assert set(listed) == set(opened)
        assert len(await store.multipart_uploads(crowded)) == S3_MAX_UPLOADS_PAGE + 10
    finally:
        await abort_all(store, opened)
    assert await store.multipart_uploads(prefix) == []


async def test_parts_of_an_aborted_upload_are_named_errors(store: ObjectStore):
    key = f"seam-test/{uuid.uuid4()}/data"
    upload_id = await store.start_multipart(key)
    part = await store.put_part(key, upload_id, 1, os.urandom(1000))
    await store.abort_multipart(key, upload_id)
    await store.abort_multipart(key, upload_id)  # aborting again is not an error
    with pytest.raises(ObjectNotFound):
        await store.put_part(key, upload_id, 2, b"late")
    with pytest.raises(ObjectNotFound):
        await store.complete_multipart(key, upload_id, [part])
    assert await store.multipart_uploads(key) == []
