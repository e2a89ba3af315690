"""Judging a finished upload: size and digest checked in one streaming read of the staged bytes."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace

from services.core.layout import BlobPointer, blob_pointer_key, read_blob_pointer
from services.core.objectstore import ObjectNotFound, ObjectStore
from services.core.records import FailureReason
from services.digests.digest import (
    InvalidDigest,
    MalformedLayer,
    StreamingVerifier,
    TarSumVersionUnsupported,
    parse_digest,
)

READ_SIZE = 1 << 20


@dataclass(frozen=True)
class Verdict:
    """What the verifier decided; stored before it is published so a replay decides the same."""

    committed: bool
    object_key: str = ""
    blob_sha256: str = ""
    reason: str = ""
    expected: str = ""
    actual: str = ""
    detail: str = ""
    source: str = ""  # partition@offset of the UploadFinished record it answers
    at_ms: int = 0  # when it was decided: a replay publishes the very same bytes

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Verdict:
        return cls(**json.loads(data))


def verdict_key(upload_id: str) -> str:
    return f"verdicts/{upload_id}.json"


def failed(reason: str, expected: str, actual: str, detail: str) -> Verdict:
    return Verdict(False, reason=reason, expected=expected, actual=actual, detail=detail)


class Judge:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def judge(
        self,
        staging_key: str,
        size: int,
        staged_size: int,
        digest: str,
        content_sha256: str | None = None,
    ) -> Verdict:
        """`content_sha256`: the upload worker's sha256 of the bytes it staged (UploadFinished
        v4), which spares a sha256-addressed layer the read back from S3."""
        try:
            claimed = parse_digest(digest)
        except TarSumVersionUnsupported as error:
            return failed(FailureReason.TARSUM_VERSION_UNSUPPORTED, digest, "", str(error))
        except InvalidDigest as error:
            return failed(FailureReason.INVALID_DIGEST, digest, "", str(error))
        if size != staged_size:
            return failed(
                FailureReason.INVALID_LENGTH,
                str(size),
                str(staged_size),
                f"the client said {size} bytes; {staged_size} were uploaded",
            )
        if (
            content_sha256 is not None
            and claimed.algorithm == "sha256"
            and claimed.hex == content_sha256
        ):
            # The worker hashed these very bytes as it staged them, in order; what is left is
            # that they are all in S3. A worker's digest that disagrees proves nothing either
            # way (the client's may be wrong), so that case reads the bytes back below.
            try:
                info = await self.store.stat(staging_key)
            except ObjectNotFound:
                return failed(FailureReason.MISSING_DATA, digest, "", f"{staging_key} is gone")
            if info.size == staged_size:
                return Verdict(True, object_key=staging_key, blob_sha256=str(claimed))
        verifier = StreamingVerifier({claimed.algorithm, "sha256"})
        try:
            async for chunk in self.store.stream(staging_key, chunk_size=READ_SIZE):
                await asyncio.to_thread(verifier.update, chunk)
            computed = await asyncio.to_thread(verifier.finish)
        except ObjectNotFound:
            return failed(FailureReason.MISSING_DATA, digest, "", f"{staging_key} is gone")
        except MalformedLayer as error:
            return failed(FailureReason.MALFORMED_LAYER, digest, "", str(error))
        actual = str(computed[claimed.algorithm])
        if actual != str(claimed):
            return failed(
                FailureReason.INVALID_DIGEST,
                str(claimed),
                actual,
                "the uploaded bytes have a different digest",
            )
        return Verdict(True, object_key=staging_key, blob_sha256=str(computed["sha256"]))

    async def first_copy(self, digest: str) -> str | None:
        """The object holding the digest's first stored copy (its blobs/ pointer), or None."""
        try:
            parse_digest(digest)
        except (InvalidDigest, TarSumVersionUnsupported):
            return None  # judged a failure anyway; no pointer to look for
        pointer = await read_blob_pointer(self.store, digest)
        return None if pointer is None else pointer.object_key

    async def keep_one_copy(self, verdict: Verdict, first_copy: str | None) -> Verdict:
        """One stored copy per digest: a second upload of known bytes points at the first copy
        (the caller deletes its own once the verdict is stored)."""
        if first_copy is None or first_copy == verdict.object_key:
            return verdict
        try:
            await self.store.stat(first_copy)
        except ObjectNotFound:
            return verdict  # the first copy is gone (an operator removed it): this one replaces it
        return replace(verdict, object_key=first_copy)

    async def claim(self, digest: str, pointer: BlobPointer) -> None:
        """Makes pointer's object the digest's first copy."""
        await self.store.put(blob_pointer_key(digest), pointer.to_json())
