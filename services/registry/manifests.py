"""Manifest PUT and DELETE: checked here, then PutManifest / DeleteManifest / DeleteTag commands
keyed by the repository name, answered once this process's index has their outcome.

Everything a client can get wrong is refused before a command is sent (the worker checks again,
in the repository's own order, for what may have changed meanwhile).
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from services.core.records import (
    DeleteManifest,
    DeleteTag,
    PutManifest,
    RepositoryCommand,
    RepositoryRejectReason,
)
from services.core.waits import WaitLimit
from services.oci.errors import ErrorCode, OciError
from services.oci.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestInvalid, parse_manifest
from services.oci.references import (
    InvalidReference,
    OciDigest,
    check_tag,
    digest_of,
    is_digest,
    parse_oci_digest,
)
from services.query.barrier import ReadBarrier
from services.query.index import Index
from services.registry import errors
from services.registry.commandlog import CommandLog, Watcher, caught_up
from services.registry.errors import answering, waiting
from services.registry.outcomes import Outcome, await_outcome
from services.registry.uploads import DURABLE_SECONDS, authority, repository_of

# The spec has no TAG_INVALID; a PUT to a tag outside the grammar is a manifest it cannot take.
_REFUSALS = {
    RepositoryRejectReason.INVALID_REPOSITORY: (400, ErrorCode.NAME_INVALID),
    RepositoryRejectReason.INVALID_REFERENCE: (400, ErrorCode.MANIFEST_INVALID),
    RepositoryRejectReason.INVALID_DIGEST: (400, ErrorCode.DIGEST_INVALID),
    RepositoryRejectReason.MANIFEST_INVALID: (400, ErrorCode.MANIFEST_INVALID),
    RepositoryRejectReason.MANIFEST_UNKNOWN: (404, ErrorCode.MANIFEST_UNKNOWN),
    RepositoryRejectReason.BLOB_UNKNOWN: (400, ErrorCode.MANIFEST_BLOB_UNKNOWN),
    RepositoryRejectReason.UNAUTHORIZED: (403, ErrorCode.DENIED),
}


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """At most limit bytes of body, reading no more than limit + 1: else 413."""
    too_big = OciError(
        413, ErrorCode.MANIFEST_INVALID, f"a manifest is at most {limit} bytes", {"limit": limit}
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    body = bytearray()
    try:
        while len(body) <= limit:
            data = await request.content.read(limit + 1 - len(body))
            if not data:
                break
            body += data
    except (aiohttp.ClientPayloadError, ConnectionError, asyncio.IncompleteReadError):
        raise OciError(400, ErrorCode.MANIFEST_INVALID, "the request body ended early") from None
    if len(body) > limit:
        raise too_big
    return bytes(body)


def _digest_reference(reference: str) -> OciDigest:
    try:
        return parse_oci_digest(reference)
    except InvalidReference as bad:
        raise OciError(
            400, ErrorCode.DIGEST_INVALID, str(bad), {"reference": reference[:300]}
        ) from None


class Manifests:
    def __init__(
        self,
        index: Index,
        log: CommandLog,
        watch: Watcher,
        barrier: ReadBarrier,
        waits: WaitLimit,
    ) -> None:
        self.index = index
        self.log = log
        self.watch = watch
        self.barrier = barrier
        self.waits = waits

    def add_routes(self, router: web.UrlDispatcher) -> None:
        # Beside the read side's GET/HEAD resource of the same path (see Uploads.add_routes).
        manifest = router.add_resource(
            "/v2/{name:.+}/manifests/{reference}", name="registry-manifest"
        )
        # Both wait for their command's outcome, so each holds a wait slot (errors.waiting).
        manifest.add_route("PUT", answering(waiting(self.waits, self.put)))
        manifest.add_route("DELETE", answering(waiting(self.waits, self.delete)))

    async def put(self, request: web.Request) -> web.Response:
        name = repository_of(request)
        reference = request.match_info["reference"]
        named: OciDigest | None = None
        if is_digest(reference):
            named = _digest_reference(reference)
        else:
            try:
                check_tag(reference)
            except InvalidReference as bad:
                raise OciError(
                    400, ErrorCode.MANIFEST_INVALID, str(bad), {"tag": reference[:300]}
                ) from None
        body = await read_bounded(request, MAX_MANIFEST_BYTES)
        try:
            manifest = await asyncio.to_thread(
                parse_manifest, body, request.headers.get("Content-Type")
            )
        except ManifestInvalid as bad:
            raise OciError(400, ErrorCode.MANIFEST_INVALID, str(bad)) from None
        digest = await asyncio.to_thread(digest_of, body, named.algorithm if named else "sha256")
        if named is not None and digest != named:
            raise OciError(
                400,
                ErrorCode.DIGEST_INVALID,
                f"the manifest's {digest.algorithm} digest is {digest}, not {reference}",
                {"expected": reference, "actual": str(digest)},
            )
        await caught_up(self.barrier, name)
        missing = await asyncio.to_thread(self._first_missing, name, manifest)
        if missing is not None:
            # A blob committed through another replica a moment ago: its LayerCommitted is keyed
            # by its upload, so every partition must be in before the manifest is refused.
            await caught_up(self.barrier)
            missing = await asyncio.to_thread(self._first_missing, name, manifest)
        if missing is not None:
            raise OciError(
                400,
                ErrorCode.MANIFEST_BLOB_UNKNOWN,
                f"{missing} is not stored in {name}; push it first",
                {"digest": missing},
            )
        command = PutManifest(
            repository=name,
            reference=reference,
            digest=str(digest),
            media_type=manifest.media_type,
            body=body,
            **authority(request),
        )
        await self._apply(command, "the manifest")
        headers = {
            "Location": f"/v2/{name}/manifests/{digest}",
            "Docker-Content-Digest": str(digest),
            "Content-Length": "0",
        }
        if manifest.subject is not None:
            headers["OCI-Subject"] = manifest.subject.digest
        return web.Response(status=201, headers=headers)

    async def delete(self, request: web.Request) -> web.Response:
        name = repository_of(request)
        reference = request.match_info["reference"]
        command: RepositoryCommand
        await caught_up(self.barrier, name)
        if is_digest(reference):
            digest = str(_digest_reference(reference))
            known = await asyncio.to_thread(self.index.manifest, name, digest)
            command = DeleteManifest(repository=name, digest=digest, **authority(request))
        else:
            try:
                check_tag(reference)
            except InvalidReference:
                known = None  # no tag outside the grammar was ever stored
            else:
                known = await asyncio.to_thread(self.index.tag, name, reference)
            command = DeleteTag(repository=name, tag=reference, **authority(request))
        if known is None:
            raise OciError(
                404, ErrorCode.MANIFEST_UNKNOWN, f"no manifest {reference[:300]} in {name}"
            )
        await self._apply(command, "the delete")
        return web.Response(status=202, headers={"Content-Length": "0"})

    def _first_missing(self, name: str, manifest: Manifest) -> str | None:
        """The first blob or child manifest the manifest names that the repository lacks."""
        # Runs in a thread: up to MAX_DESCRIPTORS primary-key lookups of ~20 µs each.
        seen: set[str] = set()
        blobs = ([manifest.config] if manifest.config else []) + list(manifest.blobs)
        for descriptor in filter(lambda d: d.distributable, blobs):
            if descriptor.digest not in seen:
                seen.add(descriptor.digest)
                if self.index.blob(name, descriptor.digest) is None:
                    return descriptor.digest
        for descriptor in manifest.manifests:
            if descriptor.digest not in seen:
                seen.add(descriptor.digest)
                if self.index.manifest(name, descriptor.digest) is None:
                    return descriptor.digest
        return None

    async def _apply(self, command: RepositoryCommand, what: str) -> Outcome:
        await self.log.deliver(command)
        outcome = await await_outcome(self.watch, self.index, command, what, DURABLE_SECONDS)
        if outcome.reason == RepositoryRejectReason.HANDLER_ERROR:
            raise errors.worker_failed(what)
        if not outcome.applied:
            status, code = _REFUSALS.get(outcome.reason or "", (400, ErrorCode.MANIFEST_INVALID))
            raise OciError(status, code, outcome.detail or f"{what} was refused")
        return outcome
