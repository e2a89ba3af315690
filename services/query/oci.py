"""The OCI distribution spec's read routes, answered from the index.

GET /v2/, manifests by tag or digest (HEAD and GET), tags/list, _catalog and referrers. They
live apart from the query service's own routes so the registry's app mounts the same ones:
`OciReadApi(index).add_routes(app)`, which returns the resources so that a writer can add its
PUT and DELETE methods to the very same paths.

Every error is the spec's body, {"errors": [{"code", "message", "detail"}]}; no input is a 500.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from services.auth.http import Caller, caller_of
from services.core.names import InvalidName, check_repository
from services.oci.errors import ErrorCode, OciError, error_body
from services.oci.manifest import OCI_INDEX
from services.oci.references import InvalidReference, check_tag, is_digest, parse_oci_digest
from services.query.barrier import Behind, ReadBarrier
from services.query.index import Index, ReferrerRow

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
# The most a page of tags or repositories holds, whatever ?n= asks: a client asking for a
# billion gets this many and a Link to the rest.
MAX_PAGE = 10_000
# Past this many digits ?n= is beyond any page, and int() of a huge string is slow.
_MAX_N_DIGITS = 9

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def oci_error(
    status: int, code: ErrorCode, message: str, detail: object = None, *, sdk_fields: bool = False
) -> web.Response:
    body = error_body(code, message, detail)
    if sdk_fields:  # the query service's own {"error", "message"}, which its SDK reads
        body.update(error=str(code), message=message)
    return web.json_response(body, status=status, headers=API_VERSION)


@web.middleware
async def oci_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On /v2/ paths: the API version header, and the spec's body for aiohttp's own refusals
    (no such route, method not allowed)."""
    if not request.path.startswith("/v2"):
        return await handler(request)
    try:
        response = await handler(request)
    except OciError as bad:
        return web.json_response(
            bad.body(), status=bad.status, headers={**API_VERSION, **bad.headers}
        )
    except web.HTTPException as refusal:
        if refusal.status < 400:
            raise
        # No route or no such method here: what the spec calls an unsupported operation.
        return oci_error(
            refusal.status,
            ErrorCode.UNSUPPORTED,
            f"{request.method} {request.path[:200]}: {refusal.reason}",
            sdk_fields=True,  # the blob routes share this path space with the SDK
        )
    for name, value in API_VERSION.items():
        response.headers.setdefault(name, value)
    return response


class OciReadApi:
    def __init__(self, index: Index, barrier: ReadBarrier | None = None) -> None:
        self.index = index
        self.barrier = barrier  # None for a read-only (replayed) index: it never changes

    async def _caught_up(self, repository: str | None) -> None:
        """Before an answer: every event the log had is in the index, so a write that another
        replica acknowledged a moment ago is seen here too (read-your-writes across replicas)."""
        if self.barrier is None:
            return
        try:
            await self.barrier.caught_up(repository)
        except Behind as behind:
            message = f"the index is behind the log: {behind}"
            raise OciError(
                503, ErrorCode.UNAVAILABLE, message, headers={"Retry-After": "1"}
            ) from None

    def add_routes(self, app: web.Application) -> dict[str, web.Resource]:
        """Adds the read routes (and the middleware) to app; returns the resources by name."""
        app.middlewares.append(oci_middleware)
        router = app.router
        resources = {
            "v2": router.add_resource("/v2/", name="v2"),
            "catalog": router.add_resource("/v2/_catalog", name="catalog"),
            # Repository names contain '/', so the name is everything up to the last segment.
            "manifest": router.add_resource("/v2/{name:.+}/manifests/{reference}", name="manifest"),
            "tags": router.add_resource("/v2/{name:.+}/tags/list", name="tags"),
            "referrers": router.add_resource("/v2/{name:.+}/referrers/{digest}", name="referrers"),
        }
        resources["v2"].add_route("GET", self.base)
        resources["v2"].add_route("HEAD", self.base)
        resources["catalog"].add_route("GET", self.catalog)
        resources["manifest"].add_route("HEAD", self.manifest)
        resources["manifest"].add_route("GET", self.manifest)
        resources["tags"].add_route("GET", self.tags)
        resources["referrers"].add_route("GET", self.referrers)
        return resources

    async def base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers=API_VERSION)

    async def manifest(self, request: web.Request) -> web.Response:
        name = _repository(request)
        reference = request.match_info["reference"]
        await self._caught_up(name)
        # On the loop, as blob HEAD: a primary-key read of SQLite (WAL, so never behind the
        # projection's writes) takes tens of µs, far less than a trip through the thread pool,
        # whose six threads would queue 64 concurrent pulls behind one another.
        if is_digest(reference):
            _digest(reference)
            row = self.index.manifest(name, reference)
        else:
            try:
                check_tag(reference)
            except InvalidReference as bad:
                detail = {"tag": reference[:150]}
                raise OciError(400, ErrorCode.MANIFEST_INVALID, str(bad), detail) from None
            row = self.index.tagged_manifest(name, reference)
        if row is None:
            return oci_error(
                404,
                ErrorCode.MANIFEST_UNKNOWN,
                f"no manifest {reference} in {name}",
                {"name": name, "reference": reference},
            )
        headers = {
            **API_VERSION,
            "Content-Type": row.media_type,
            "Docker-Content-Digest": row.digest,
            "ETag": f'"{row.digest}"',
        }
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(row.size)})
        return web.Response(body=row.body, headers=headers)

    async def tags(self, request: web.Request) -> web.Response:
        name = _repository(request)
        limit, last = _page(request)
        await self._caught_up(name)
        tags, known = await asyncio.to_thread(self._tags_page, name, last, limit)
        if not known:
            return oci_error(404, ErrorCode.NAME_UNKNOWN, f"no repository {name}", {"name": name})
        headers = dict(API_VERSION)
        if len(tags) > limit:
            tags = tags[:limit]
            headers["Link"] = _next_link(f"/v2/{name}/tags/list", limit, tags[-1])
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    def _tags_page(self, name: str, last: str | None, limit: int) -> tuple[list[str], bool]:
        # One more than the page, to know whether a Link to the next one is due.
        tags = self.index.tags(name, last=last, limit=limit + 1) if limit else []
        return tags, bool(tags) or self.index.repository_exists(name)

    async def catalog(self, request: web.Request) -> web.Response:
        limit, last = _page(request)
        await self._caught_up(None)
        caller = caller_of(request)
        names = (
            await asyncio.to_thread(self._catalog_page, caller, last, limit + 1) if limit else []
        )
        headers = dict(API_VERSION)
        if len(names) > limit:
            names = names[:limit]
            headers["Link"] = _next_link("/v2/_catalog", limit, names[-1])
        return web.json_response({"repositories": names}, headers=headers)

    def _catalog_page(self, caller: Caller | None, last: str | None, wanted: int) -> list[str]:
        """Up to `wanted` names after `last`; with logins on, only those the caller may pull."""
        if caller is None:
            return self.index.repositories(last=last, limit=wanted)
        shown: list[str] = []
        while len(shown) < wanted:
            batch = self.index.repositories(last=last, limit=max(wanted, 100))
            shown += [name for name in batch if caller.may_list(name)]
            if len(batch) < max(wanted, 100):
                break
            last = batch[-1]
        return shown[:wanted]

    async def referrers(self, request: web.Request) -> web.Response:
        name = _repository(request)
        subject = request.match_info["digest"]
        _digest(subject)
        await self._caught_up(name)
        artifact_type = request.query.get("artifactType")
        found = await asyncio.to_thread(
            self.index.referrers, name, subject, artifact_type=artifact_type
        )
        headers = {**API_VERSION, "Content-Type": OCI_INDEX}
        if artifact_type is not None:
            headers["OCI-Filters-Applied"] = "artifactType"
        body = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [_descriptor(row) for row in found],
        }
        return web.Response(body=json.dumps(body, separators=(",", ":")), headers=headers)


def _repository(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return check_repository(name)
    except InvalidName as bad:
        raise OciError(400, ErrorCode.NAME_INVALID, str(bad), {"name": name[:300]}) from None


def _digest(text: str) -> None:
    try:
        parse_oci_digest(text)
    except InvalidReference as bad:  # UnsupportedDigest too: the registry offers no such hash
        raise OciError(400, ErrorCode.DIGEST_INVALID, str(bad), {"digest": text[:150]}) from None


def _page(request: web.Request) -> tuple[int, str | None]:
    """The page size (?n=, capped at MAX_PAGE) and the name to start after (?last=)."""
    text = request.query.get("n")
    limit = MAX_PAGE
    if text is not None:
        if not (text.isascii() and text.isdigit()):
            raise OciError(
                400,
                ErrorCode.PAGINATION_NUMBER_INVALID,
                f"n must be a non-negative integer, got {text[:40]!r}",
                {"n": text[:40]},
            )
        limit = MAX_PAGE if len(text) > _MAX_N_DIGITS else min(int(text), MAX_PAGE)
    return limit, request.query.get("last")


def _next_link(path: str, limit: int, last: str) -> str:
    return f'<{quote(path)}?n={limit}&last={quote(last, safe="")}>; rel="next"'


def _descriptor(row: ReferrerRow) -> dict[str, Any]:
    descriptor: dict[str, Any] = {
        "mediaType": row.media_type,
        "digest": row.digest,
        "size": row.size,
    }
    if row.artifact_type is not None:
        descriptor["artifactType"] = row.artifact_type
    if row.annotations:
        descriptor["annotations"] = row.annotations
    return descriptor
