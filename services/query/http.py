"""The query service's HTTP API: Exists and Fetch of layers, upload state, health and metrics,
and the OCI read routes (services.query.oci).

Every error is JSON: {"error": CODE, "message": "..."}; no input yields a 500. Every response
carries X-Request-Id; an unexpected failure is logged once under that id, with its traceback, and
the client gets the id, never the failure's text.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from services.auth.http import Gate, caller_of
from services.auth.scopes import Action
from services.core.names import InvalidName, check_repository, check_upload_id
from services.core.objectstore import ObjectNotFound, ObjectStore, is_transient
from services.core.records import RejectReason
from services.core.waits import RETRY_AFTER_SECONDS, WaitLimit, refusal_message
from services.digests.digest import DigestError, TarSumVersionUnsupported, parse_digest
from services.oci.errors import ErrorCode, error_body
from services.query.barrier import Behind, ReadBarrier
from services.query.index import Index, LayerRow, RejectionRow, UploadRow, UploadStates
from services.query.oci import OciReadApi
from services.query.projection import Projection
from services.query.replica import STATUS_PATHS, Readiness, health_body, readyz

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 60.0
REQUEST_ID = web.RequestKey("request_id", str)
# The response whose headers are sent: after that, an error cannot become a response of its own.
BEGUN = web.RequestKey("begun", web.StreamResponse)
# Long enough for a slow client to read a big layer; S3 checks the expiry when a read starts.
REDIRECT_EXPIRY = timedelta(minutes=15)
AUTHORIZED_REDIRECT_EXPIRY = timedelta(seconds=60)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

REQUESTS = Counter(
    "layerlog_http_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
LATENCY = Histogram(
    "layerlog_http_request_duration_seconds", "Time to answer an HTTP request", ["route"]
)


class BadRange(ValueError):
    pass


class Unsatisfiable(ValueError):
    pass


def error(status: int, code: str, message: str, **headers: str) -> web.Response:
    # "errors" is the OCI distribution spec's form, which registry clients read; "error" and
    # "message" are the SDK's (some codes, TARSUM_VERSION_UNSUPPORTED say, are the SDK's own).
    body = {"error": code, "message": message, **error_body(code, message)}
    return web.json_response(body, status=status, headers=headers)


def internal_error(request_id: str) -> web.Response:
    """The 500 body: the id to quote, nothing of the failure itself (that is in the log)."""
    message = f"internal error; the service logged it under request id {request_id}"
    body = {
        "error": "INTERNAL",
        "message": message,
        "request_id": request_id,
        **error_body(ErrorCode.UNKNOWN, message, {"request_id": request_id}),
    }
    return web.json_response(body, status=500)


def digest_error(bad: DigestError) -> web.Response:
    # The same digest gets the same error everywhere: finish() of an unknown TarSum version
    # fails as TARSUM_VERSION_UNSUPPORTED, so HEAD and GET answer that code too.
    if isinstance(bad, TarSumVersionUnsupported):
        return error(400, "TARSUM_VERSION_UNSUPPORTED", str(bad))
    return error(400, "DIGEST_INVALID", str(bad))


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The (first, last) byte a single-range header asks for; None to send the whole body."""
    if "," in header:
        return None  # RFC 9110 lets a server ignore a multi-range request and send it all
    match = _RANGE.match(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        raise BadRange(f"malformed Range header {header[:100]!r}")
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable(header)
        return max(0, size - suffix), size - 1
    start = _position(first)
    end = size - 1 if last == "" else min(_position(last), size - 1)
    if last != "" and _position(last) < start:
        # Unsatisfiable rather than malformed: the OCI conformance suite and Distribution answer
        # 416 to bytes=500-0, which names no byte of any blob.
        raise Unsatisfiable(f"Range {header[:100]!r} ends before it starts")
    if start >= size:
        raise Unsatisfiable(header)
    return start, end


def _position(digits: str) -> int:
    # Past 18 digits a position is beyond any object; int() of thousands of digits would be
    # refused by Python's conversion limit (and is slow), so it never gets that far.
    return int(digits) if len(digits) <= 18 else 1 << 63


class QueryApi:
    def __init__(
        self,
        index: Index,
        store: ObjectStore,
        projection: Projection | None,
        *,
        redirect: bool = False,
        barrier: ReadBarrier | None = None,
        gate: Gate | None = None,
        waits: WaitLimit | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.index = index
        self.store = store
        self.projection = projection
        self.barrier = barrier
        self.redirect = redirect
        self.gate = gate
        self.waits = waits  # caps the verdict waits (?wait=); None: no cap
        # None: always ready (an app built in a test, or around an index that does not change).
        self.readiness = readiness
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[str, Any] = {}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.observe, self.until_ready])
        app.on_response_prepare.append(_stamp_request_id)
        # One named resource for both methods: a second add_route on the same path would make
        # an unnamed resource, and GETs would be counted under route="unmatched".
        blobs = app.router.add_resource("/v2/{name:.+}/blobs/{digest}", name="blob")
        blobs.add_route("HEAD", self.blob)
        blobs.add_route("GET", self.blob)
        OciReadApi(self.index, self.barrier).add_routes(app)
        if self.gate is not None:
            # Innermost: a refusal still gets a request id, is counted, and has the API header.
            app.middlewares.append(self.gate.middleware)
        app.router.add_get("/uploads/{uuid}", self.upload, name="upload")
        app.router.add_get("/uploads/{uuid}/verdict", self.verdict, name="verdict")
        app.router.add_get("/healthz", self.health, name="healthz")
        app.router.add_get("/readyz", self.ready, name="readyz")
        app.router.add_get("/metrics", self.metrics, name="metrics")
        return app

    @web.middleware
    async def observe(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        request[REQUEST_ID] = uuid.uuid4().hex
        route = request.match_info.route.name or "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as http_error:
            response = error(
                http_error.status, http_error.reason.upper().replace(" ", "_"), http_error.reason
            )
        except Exception as unexpected:  # the contract is JSON errors, never a bare 500 page
            response = self._failed(request, unexpected)
        self._count(route, request.method, response.status, time.perf_counter() - started)
        return response

    @web.middleware
    async def until_ready(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Until the replica has caught up with the log as it was at start, only the status
        routes answer; the rest is 503 with Retry-After (a load balancer sends it elsewhere)."""
        readiness = self.readiness
        if readiness is None or readiness.ready or request.path in STATUS_PATHS:
            return await handler(request)
        return readiness.refusal(request.path)

    def _failed(self, request: web.Request, unexpected: Exception) -> web.StreamResponse:
        request_id = request[REQUEST_ID]
        begun = request.get(BEGUN)
        where = f"{request.method} {request.path[:200]}"
        fields = {"request_id": request_id}
        if begun is not None:
            # Headers and part of the body are out: a second response would land in the body.
            # Closing the connection leaves the client a short body, which it reads again from
            # where it got to.
            log.error(
                "%s failed mid-body after headers were sent (request %s); closing the connection",
                where,
                request_id,
                exc_info=unexpected,
                extra=fields,
            )
            if request.transport is not None:
                request.transport.close()
            return begun
        if is_transient(unexpected):
            log.warning(
                "%s: object storage unavailable (request %s): %r",
                where,
                request_id,
                unexpected,
                extra=fields,
            )
            return error(
                503,
                "STORAGE_UNAVAILABLE",
                "object storage is not answering; retry shortly",
                **{"Retry-After": "1"},
            )
        log.error("%s failed (request %s)", where, request_id, exc_info=unexpected, extra=fields)
        return internal_error(request_id)

    def _count(self, route: str, method: str, status: int, seconds: float) -> None:
        # Resolving labels takes a lock and builds a key on every call; a HEAD costs tens of
        # microseconds in all, so the labelled children are kept per (route, method, status).
        key = (route, method, status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = REQUESTS.labels(route, method, str(status))
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = LATENCY.labels(route)
        counter.inc()
        latency.observe(seconds)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        name, digest = request.match_info["name"], request.match_info["digest"]
        try:
            check_repository(name)
        except InvalidName as bad:
            return error(400, "NAME_INVALID", str(bad))
        try:
            parse_digest(digest)
        except DigestError as bad:
            return digest_error(bad)
        try:
            layer = await self._fresh_blob(name, digest)
        except Behind as behind:
            message = f"the index is behind the log: {behind}"
            return error(503, "UNAVAILABLE", message, **{"Retry-After": "1"})
        if layer is None:
            return error(404, "BLOB_UNKNOWN", f"no layer {digest} in {name}")
        headers = _layer_headers(layer)
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(layer.size)})
        if self.redirect:
            # The client reads from S3 itself (its Range header goes along); the bytes never
            # pass through this process.
            # After the gate: only a caller who may pull gets a URL; with logins on it lives
            # only as long as a client needs to start reading (S3 checks it once, at the start).
            expiry = REDIRECT_EXPIRY if self.gate is None else AUTHORIZED_REDIRECT_EXPIRY
            location = self.store.presigned_get_url(layer.object_key, expiry)
            headers["Location"] = location
            return web.Response(status=307, headers=headers)
        return await self._send(request, layer, headers)

    async def _fresh_blob(self, name: str, digest: str) -> LayerRow | None:
        """The blob as the whole log has it: a link or unlink another replica acknowledged a
        moment ago counts (read barrier); a read-only index is read as it is."""
        # A primary-key lookup in SQLite (WAL: readers never wait for the projection's writes)
        # takes ~20 µs, an eighth of handing it to a thread and back, and without a thread pool
        # (6 threads by default) 64 concurrent HEADs do not queue behind one another.
        if self.barrier is None:
            return self.index.blob(name, digest)
        await self.barrier.caught_up(name)  # unlinks and mounts are keyed by the repository
        layer = self.index.blob(name, digest)
        if layer is None:
            await self.barrier.caught_up()  # a commit is keyed by its upload: any partition
            layer = self.index.blob(name, digest)
        return layer

    async def _send(
        self, request: web.Request, layer: LayerRow, headers: dict[str, str]
    ) -> web.StreamResponse:
        status, first, last = 200, 0, layer.size - 1
        if "Range" in request.headers:
            try:
                wanted = parse_range(request.headers["Range"], layer.size)
            except BadRange as bad:
                return error(400, "RANGE_INVALID", str(bad))
            except Unsatisfiable:
                return error(
                    416,
                    "RANGE_NOT_SATISFIABLE",
                    f"the layer has {layer.size} bytes",
                    **{"Content-Range": f"bytes */{layer.size}"},
                )
            if wanted is not None:
                status, (first, last) = 206, wanted
                headers["Content-Range"] = f"bytes {first}-{last}/{layer.size}"
        length = last - first + 1
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        if length == 0:
            await response.prepare(request)
            await response.write_eof()
            return response
        chunks = self.store.stream(layer.object_key, first, length)
        try:
            first_chunk = await anext(chunks)
        except ObjectNotFound:
            return error(
                404, "BLOB_UNKNOWN", f"the bytes of {layer.digest} are missing from storage"
            )
        await response.prepare(request)
        request[BEGUN] = response
        sent = len(first_chunk)
        await response.write(first_chunk)
        async for chunk in chunks:
            sent += len(chunk)
            await response.write(chunk)
        if sent != length:
            raise ConnectionError(f"storage sent {sent} of {length} bytes of {layer.object_key}")
        await response.write_eof()
        return response

    async def upload(self, request: web.Request) -> web.Response:
        if self.barrier is not None:
            try:
                await self.barrier.wait(check_upload_id(request.match_info["uuid"]))
            except InvalidName as bad:
                return error(400, "UPLOAD_ID_INVALID", str(bad))
            except Behind as behind:
                # A 404 now could be wrong: the upload may be in a command not yet applied.
                return error(
                    503,
                    "INDEX_BEHIND",
                    f"the index is catching up: {behind}",
                    **{"Retry-After": "1"},
                )
        row = await self._upload_row(request)
        if isinstance(row, web.Response):
            return row
        if row is None or row.state != UploadStates.OPEN:
            state = row.state if row else "unknown"
            return error(
                404, "BLOB_UPLOAD_UNKNOWN", f"upload {request.match_info['uuid']} is {state}"
            )
        return web.json_response(
            {
                "upload_id": row.upload_id,
                "repository": row.repository,
                "offset": row.durable_offset,
                "state": row.state,
            }
        )

    async def verdict(self, request: web.Request) -> web.Response:
        """The upload's state, waiting up to ?wait= seconds for it to become final.

        With ?command=ID, a rejection of that command ends the wait too (state "rejected").
        """
        command_id = request.query.get("command")
        try:
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            wait = math.nan
        if not math.isfinite(wait) or wait < 0:
            return error(400, "WAIT_INVALID", "wait must be a number of seconds, 0 or more")
        wait = min(wait, MAX_WAIT_SECONDS)
        if wait == 0 or self.waits is None:
            return await self._verdict(request, command_id, wait)
        # A verdict request only reads: refused, it has changed nothing, and asking again later
        # finds the verdict in the index all the same.
        if not self.waits.try_take():
            return error(
                429,
                "TOOMANYREQUESTS",
                refusal_message(self.waits.limit),
                **{"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        try:
            return await self._verdict(request, command_id, wait)
        finally:
            self.waits.give()

    async def _verdict(
        self, request: web.Request, command_id: str | None, wait: float
    ) -> web.Response:
        deadline = time.monotonic() + wait
        while True:
            row = await self._upload_row(request)
            if isinstance(row, web.Response):
                return row
            if row is not None and row.state in UploadStates.TERMINAL:
                break
            if command_id:
                rejection = await asyncio.to_thread(self.index.rejection, command_id)
                if rejection is not None:
                    return web.json_response(
                        {
                            "upload_id": rejection.upload_id,
                            "state": "rejected",
                            "command_type": rejection.command_type,
                            "reason": rejection.reason,
                            "detail": _client_detail(rejection),
                            "expected_offset": rejection.expected_offset,
                        }
                    )
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.projection is None:
                break
            async with self.projection.changed:
                try:
                    await asyncio.wait_for(self.projection.changed.wait(), remaining)
                except TimeoutError:
                    pass
        if row is None:
            return error(404, "BLOB_UPLOAD_UNKNOWN", f"no upload {request.match_info['uuid']}")
        return web.json_response(_upload_json(row))

    async def _upload_row(self, request: web.Request) -> UploadRow | web.Response | None:
        try:
            upload_id = check_upload_id(request.match_info["uuid"])
        except InvalidName as bad:
            return error(400, "UPLOAD_ID_INVALID", str(bad))
        row = await asyncio.to_thread(self.index.upload, upload_id)
        caller = caller_of(request)
        if row is not None and caller is not None:
            if not caller.grant.allows_action("repository", row.repository, Action.PUSH):
                # As if there were no such upload: its id says nothing to who may not push there.
                return None
        return row

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(health_body(self.projection))

    async def ready(self, request: web.Request) -> web.Response:
        if self.readiness is None:
            return web.json_response({"status": "ready", "behind": 0})
        return await readyz(self.readiness)

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


def _layer_headers(layer: LayerRow) -> dict[str, str]:
    created = layer.committed_at_ms / 1000
    return {
        "Docker-Content-Digest": layer.digest,
        "ETag": f'"{layer.digest}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Last-Modified": email.utils.formatdate(created, usegmt=True),
        "X-Layerlog-Created-At-Ms": str(layer.committed_at_ms),
    }


def _client_detail(rejection: RejectionRow) -> str:
    """What a client learns of a rejection. A HANDLER_ERROR's detail is the worker's account of
    its own failure: for its log and the dead letters, never for a client, whoever wrote it."""
    if rejection.reason == RejectReason.HANDLER_ERROR:
        return (
            f"the upload worker failed on this {rejection.command_type}; it logged the failure "
            "and kept the command in its dead letters"
        )
    return rejection.detail


def _upload_json(row: UploadRow) -> dict[str, object]:
    return {
        "upload_id": row.upload_id,
        "repository": row.repository,
        "state": row.state,
        "offset": row.durable_offset,
        "digest": row.digest,
        "size": row.size,
        "reason": row.reason,
        "detail": row.detail,
        "expected": row.expected,
        "actual": row.actual,
        "actor": row.actor,
    }
