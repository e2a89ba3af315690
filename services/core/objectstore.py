"""Object-store access: the one seam between the services and S3.

`LayerStorage` names the verbs the services need (whole objects, listings, and the multipart
uploads that stage an upload in progress), and `ObjectNotFound` the one failure they act on;
`ObjectStore` implements them with minio against one bucket. The minio client is blocking, so
every call goes through asyncio.to_thread; the services never talk to a particular S3 server's
internals, so AWS, Ceph, MinIO, SeaweedFS or versitygw all work.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple, Protocol

import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.datatypes import ListMultipartUploadsResult, Part
from minio.error import S3Error, ServerError
from minio.helpers import DictType
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, LifecycleConfig, Rule

from services.core.settings import Settings

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchUpload", "NoSuchBucket", "NotFound"})
# S3 numbers an object's parts 1..10,000: a multipart upload can have no more parts than this.
S3_MAX_PARTS = 10_000
# ListMultipartUploads answers at most this many uploads a page.
S3_MAX_UPLOADS_PAGE = 1000


class ObjectNotFound(LookupError):
    """The key (or multipart upload) does not exist."""


@dataclass(frozen=True)
class StagedPart:
    number: int
    etag: str
    size: int


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    metadata: dict[str, str]


class MultipartUpload(NamedTuple):
    """An incomplete multipart upload: its object key and S3 upload id."""

    key: str
    upload_id: str


class LayerStorage(Protocol):
    """What the services need from object storage; raises ObjectNotFound for a missing key or
    multipart upload, and other errors (see is_transient) when the server fails."""

    async def put(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None: ...
    async def get(self, key: str, offset: int = 0, length: int = 0) -> bytes: ...
    def stream(
        self, key: str, offset: int = 0, length: int = 0, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]: ...
    async def stat(self, key: str) -> ObjectInfo: ...
    async def delete(self, key: str) -> None: ...
    async def delete_prefix(self, prefix: str) -> int: ...
    async def list_keys(self, prefix: str) -> list[str]: ...
    async def list_modified(self, prefix: str) -> list[tuple[str, float]]: ...
    async def start_multipart(self, key: str) -> str: ...
    async def put_part(self, key: str, upload_id: str, number: int, data: bytes) -> StagedPart: ...
    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[StagedPart]
    ) -> None: ...
    async def abort_multipart(self, key: str, upload_id: str) -> None: ...
    async def multipart_uploads(self, prefix: str) -> list[MultipartUpload]: ...


class _MinioMultipart:
    """The only caller of minio's private multipart methods.

    minio's public API has no multipart verbs that take parts one at a time (put_object drives a
    whole stream itself), so these five private methods are used, here and nowhere else. Their
    signatures are those of minio 7.2.20, the version pyproject.toml pins exactly;
    tests/test_stack.py and tests/test_objectstore.py exercise each of them against the real S3.
    """

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def create(self, key: str) -> str:
        return self.client._create_multipart_upload(self.bucket, key, {})

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        return self.client._upload_part(self.bucket, key, data, None, upload_id, number)

    def complete(self, key: str, upload_id: str, parts: list[StagedPart]) -> None:
        self.client._complete_multipart_upload(
            self.bucket, key, upload_id, [Part(p.number, p.etag) for p in parts]
        )

    def abort(self, key: str, upload_id: str) -> None:
        self.client._abort_multipart_upload(self.bucket, key, upload_id)

    def list_all(self, prefix: str) -> list[MultipartUpload]:
        """Every incomplete multipart upload under prefix, page after page."""
        found: dict[MultipartUpload, None] = {}  # ordered, and a page read twice adds nothing
        marker: MultipartUpload | None = None
        while True:
            page = self._page(prefix, marker, found)
            uploads = [MultipartUpload(u.object_name, u.upload_id) for u in page.uploads]
            new = [u for u in uploads if u not in found]
            found.update(dict.fromkeys(new))
            if not page.is_truncated or not new:
                return list(found)
            # minio 7.2.20 drops NextUploadIdMarker (it sets a misspelt attribute), but without
            # a delimiter the next markers are those of the page's last upload.
            marker = uploads[-1]

    def _page(
        self, prefix: str, marker: MultipartUpload | None, found: dict[MultipartUpload, None]
    ) -> ListMultipartUploadsResult:
        if marker is None:
            return self._list(prefix, "", "")
        try:
            return self._list(prefix, marker.key, marker.upload_id)
        except S3Error as error:
            if error.code != "InvalidArgument":
                raise
        # versitygw (v1.7.0) reads upload-id-marker as an upload of the first key *after*
        # key-marker and refuses the markers AWS defines; asked its way, with the last key
        # listed before the marker's, it goes on after the same upload. No key lies between
        # that one and the marker's (the listing is in key order), so nothing is skipped.
        earlier = [u.key for u in found if u.key < marker.key]
        return self._list(prefix, max(earlier) if earlier else marker.key[:-1], marker.upload_id)

    def _list(
        self, prefix: str, key_marker: str, upload_id_marker: str
    ) -> ListMultipartUploadsResult:
        return self.client._list_multipart_uploads(
            self.bucket,
            prefix=prefix,
            max_uploads=S3_MAX_UPLOADS_PAGE,
            key_marker=key_marker or None,
            upload_id_marker=upload_id_marker or None,
        )


class ObjectStore:
    """The verbs the services need from S3, against one bucket."""

    def __init__(self, settings: Settings, *, max_connections: int = 32) -> None:
        self.bucket = settings.bucket
        http = urllib3.PoolManager(
            maxsize=max_connections,
            # A read timeout bounds each socket read, not the transfer: a request the server
            # dropped fails in 20 s and is retried, rather than stalling a partition for minutes.
            timeout=urllib3.Timeout(connect=5, read=20),
            retries=urllib3.Retry(
                total=3, read=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
            ),
        )
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )
        self._multipart = _MinioMultipart(self.client, self.bucket)
        self.reader = settings.s3_reader
        # Signs redirects: the read-only key when there is one, so a leaked URL only reads.
        self._signer = self.client
        if self.reader is not None:
            self._signer = Minio(
                settings.s3_endpoint,
                access_key=self.reader,
                secret_key=settings.s3_read_secret_key,
                secure=settings.s3_secure,
                region=settings.s3_region,
            )

    # Bucket

    async def ensure_bucket(self) -> bool:
        """Creates the bucket if missing; returns True if it was created."""

        def create() -> bool:
            if self.client.bucket_exists(self.bucket):
                return False
            self.client.make_bucket(self.bucket)
            return True

        return await asyncio.to_thread(create)

    async def grant_reader(self) -> bool:
        """Lets the read-only key GET the bucket's objects, and nothing else; False when there
        is no such key or the server takes no bucket policies."""
        if self.reader is None:
            return False
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": self.reader,
                    "Action": ["s3:GetObject"],
                    "Resource": [f"arn:aws:s3:::{self.bucket}/*"],
                }
            ],
        }

        def put() -> bool:
            try:
                self.client.set_bucket_policy(self.bucket, json.dumps(policy))
            except S3Error as error:
                if error.code in ("NotImplemented", "MalformedPolicy", "InvalidArgument"):
                    return False
                raise
            return True

        return await asyncio.to_thread(put)

    async def abort_stale_multipart_uploads_after(self, days: int) -> bool:
        """Asks the server to abort forgotten multipart uploads; False if it cannot."""
        rule = Rule(
            ENABLED,
            rule_filter=Filter(prefix=""),
            rule_id="abort-incomplete-multipart-uploads",
            abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(days),
        )
        try:
            await asyncio.to_thread(
                self.client.set_bucket_lifecycle, self.bucket, LifecycleConfig([rule])
            )
            return True
        except S3Error as error:
            if error.code in ("NotImplemented", "NotSupported"):
                return False
            raise

    # Whole objects

    async def put(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        # minio's metadata values may also be lists; a copy typed as its DictType says so.
        headers: DictType | None = {**metadata} if metadata is not None else None
        await asyncio.to_thread(
            self.client.put_object,
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            metadata=headers,
        )

    async def put_file(self, key: str, path: str, part_size: int = 64 << 20) -> None:
        """Uploads a local file, in parts read from disk (an index snapshot: gigabytes)."""
        await asyncio.to_thread(
            self.client.fput_object, self.bucket, key, path, part_size=part_size
        )

    async def get_file(self, key: str, path: str) -> None:
        """Downloads the object into a local file; ObjectNotFound if there is none."""

        def download() -> None:
            try:
                self.client.fget_object(self.bucket, key, path)
            except S3Error as error:
                raise _translate(error, key) from error

        await asyncio.to_thread(download)

    async def get(self, key: str, offset: int = 0, length: int = 0) -> bytes:
        def read() -> bytes:
            response = self._open(key, offset, length)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return await asyncio.to_thread(read)

    async def stream(
        self, key: str, offset: int = 0, length: int = 0, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Yields the object's bytes [offset, offset+length) in chunks, reading in a thread."""
        response = await asyncio.to_thread(self._open, key, offset, length)
        try:
            while True:
                chunk = await asyncio.to_thread(response.read, chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            response.close()
            response.release_conn()

    def presigned_get_url(self, key: str, expires: timedelta) -> str:
        """A URL anyone holding it can GET (Range too) the object with until it expires.

        Signing is local (no request: the region is configured), so it runs on the caller's loop.
        """
        return self._signer.presigned_get_object(self.bucket, key, expires=expires)

    async def stat(self, key: str) -> ObjectInfo:
        def stat() -> ObjectInfo:
            try:
                info = self.client.stat_object(self.bucket, key)
            except S3Error as error:
                raise _translate(error, key) from error
            metadata = {
                name[len("x-amz-meta-") :].lower(): value
                for name, value in (info.metadata or {}).items()
                if name.lower().startswith("x-amz-meta-")
            }
            return ObjectInfo(key, info.size or 0, metadata)

        return await asyncio.to_thread(stat)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.client.remove_object, self.bucket, key)

    async def delete_prefix(self, prefix: str) -> int:
        def delete_all() -> int:
            keys = [
                item.object_name
                for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            ]
            for key in keys:
                self.client.remove_object(self.bucket, key)
            return len(keys)

        return await asyncio.to_thread(delete_all)

    async def list_modified(self, prefix: str) -> list[tuple[str, float]]:
        """(key, last-modified as a Unix time) of every object under prefix."""

        def keys() -> list[tuple[str, float]]:
            return [
                (item.object_name, item.last_modified.timestamp() if item.last_modified else 0.0)
                for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            ]

        return await asyncio.to_thread(keys)

    async def list_keys(self, prefix: str) -> list[str]:
        def keys() -> list[str]:
            return [
                item.object_name
                for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            ]

        return await asyncio.to_thread(keys)

    # Multipart uploads: the staging area of an upload in progress

    async def start_multipart(self, key: str) -> str:
        return await asyncio.to_thread(self._multipart.create, key)

    async def put_part(self, key: str, upload_id: str, number: int, data: bytes) -> StagedPart:
        def upload() -> StagedPart:
            try:
                etag = self._multipart.upload_part(key, upload_id, number, data)
            except S3Error as error:
                raise _translate(error, key) from error
            return StagedPart(number, etag, len(data))

        return await asyncio.to_thread(upload)

    async def complete_multipart(self, key: str, upload_id: str, parts: list[StagedPart]) -> None:
        def complete() -> None:
            try:
                self._multipart.complete(key, upload_id, parts)
            except S3Error as error:
                raise _translate(error, key) from error

        await asyncio.to_thread(complete)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        def abort() -> None:
            try:
                self._multipart.abort(key, upload_id)
            except S3Error as error:
                if error.code not in NOT_FOUND_CODES:
                    raise

        await asyncio.to_thread(abort)

    async def multipart_uploads(self, prefix: str) -> list[MultipartUpload]:
        """Every incomplete multipart upload under prefix (all pages, not the first 1,000)."""
        return await asyncio.to_thread(self._multipart.list_all, prefix)

    def _open(self, key: str, offset: int, length: int) -> urllib3.BaseHTTPResponse:
        try:
            return self.client.get_object(self.bucket, key, offset=offset, length=length)
        except S3Error as error:
            raise _translate(error, key) from error


def _translate(error: S3Error, key: str) -> Exception:
    if error.code in NOT_FOUND_CODES:
        return ObjectNotFound(f"{key}: {error.code}")
    return error


_TRANSIENT_S3_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"}
)


def is_transient(error: BaseException) -> bool:
    """True when an S3 call failed because the server is away or busy: worth retrying."""
    if isinstance(error, S3Error):
        return error.code in _TRANSIENT_S3_CODES
    return isinstance(error, (ServerError, urllib3.exceptions.HTTPError, OSError))
