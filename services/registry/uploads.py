"""Blob uploads, mounts and unlinks: the distribution spec's blob routes as Layerlog commands.

An OCI upload session is a Layerlog upload: POST is StartUpload, each PATCH becomes AppendChunk
commands, PUT is FinishUpload, DELETE is CancelUpload. What an upload is (its repository, its
offset, open or not) is read from the index, which the log builds, never from this process's
memory: a PATCH may reach any replica, or come after a restart.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from services.auth.http import Caller, caller_of
from services.auth.scopes import Action
from services.core.names import InvalidName, check_repository, check_upload_id
from services.core.records import (
    AppendChunk,
    CancelUpload,
    FailureReason,
    FinishUpload,
    MountBlob,
    RejectReason,
    RepositoryCommand,
    RepositoryRejectReason,
    StartUpload,
    UnlinkBlob,
)
from services.core.settings import Settings
from services.core.waits import WaitLimit
from services.oci.errors import ErrorCode, OciError
from services.oci.references import InvalidReference, parse_oci_digest
from services.query.barrier import Behind, ReadBarrier
from services.query.index import Index, LayerRow, RejectionRow, UploadRow, UploadStates
from services.registry import errors
from services.registry.commandlog import CommandLog, Sender, Watcher, caught_up
from services.registry.errors import answering, waiting
from services.registry.outcomes import Outcome, await_outcome

# Long enough for the verifier to read a multi-GiB blob once; the SDK waits as long.
VERDICT_SECONDS = 300.0
# A request body is read this much at a time, each step covered by the process's body budget.
READ_STEP = 1024 * 1024
# A body read that waits this long sends on what its request gathered so far.
STALLED_SECONDS = 1.0
# Chunks are durable once the worker has staged them: seconds, unless the worker is away.
DURABLE_SECONDS = 120.0
# What the spec allows: "<start>-<end>", both inclusive. "bytes a-b/total" is accepted too, as
# some clients send the RFC 9110 form.
_CONTENT_RANGE = re.compile(r"^(?:bytes[ =])?(\d{1,18})-(\d{1,18})(?:/(?:\d{1,18}|\*))?$")

_GONE = frozenset(
    {
        RejectReason.UNKNOWN_UPLOAD,
        RejectReason.UPLOAD_FINISHED,
        RejectReason.UPLOAD_CANCELLED,
        RejectReason.REPOSITORY_MISMATCH,
    }
)
_OUT_OF_ORDER = frozenset({RejectReason.OFFSET_MISMATCH, RejectReason.CHUNK_CONFLICT})


def repository_of(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return check_repository(name)
    except InvalidName as bad:
        raise OciError(400, ErrorCode.NAME_INVALID, str(bad), {"name": name[:300]}) from None


def digest_param(text: str | None) -> str:
    """A sha256 or sha512 digest from the query string, or 400 DIGEST_INVALID."""
    if not text:
        raise OciError(400, ErrorCode.DIGEST_INVALID, "the digest parameter is required")
    try:
        return str(parse_oci_digest(text))
    except InvalidReference as bad:
        raise OciError(400, ErrorCode.DIGEST_INVALID, str(bad), {"digest": text[:300]}) from None


def upload_path(name: str, upload_id: str) -> str:
    return f"/v2/{name}/blobs/uploads/{upload_id}"


def range_header(offset: int) -> str:
    # The spec's "0-<last byte>"; an empty upload is answered "0-0", as clients expect.
    return f"0-{max(offset - 1, 0)}"


def upload_headers(name: str, upload_id: str, offset: int) -> dict[str, str]:
    return {
        "Location": upload_path(name, upload_id),
        "Range": range_header(offset),
        "Docker-Upload-UUID": upload_id,
        "Content-Length": "0",
    }


def blob_headers(name: str, digest: str) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/{digest}",
        "Docker-Content-Digest": digest,
        "Content-Length": "0",
    }


def authority(request: web.Request) -> dict[str, str | None]:
    """The subject and token the request's commands carry, for the upload worker to check."""
    caller = caller_of(request)
    if caller is None:
        return {"subject": None, "token": None}  # logins off
    return {"subject": caller.subject, "token": caller.grant.token}


@dataclass
class Appended:
    """The chunks one request sent, in order: (offset, length, command id)."""

    start: int
    end: int
    by: dict[str, str | None]  # authority(request), which each chunk and the finish carry
    chunks: list[tuple[int, int, str]] = field(default_factory=list)

    def first_not_durable(self, durable: int) -> str | None:
        return next((cid for offset, length, cid in self.chunks if offset + length > durable), None)


class KeyedLocks:
    """One lock per upload in this process: two PATCHes of one upload must not interleave their
    chunks (the worker would accept a mix); across replicas the digest check still guards."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Uploads:
    def __init__(
        self,
        settings: Settings,
        index: Index,
        log: CommandLog,
        watch: Watcher,
        barrier: ReadBarrier,
        waits: WaitLimit,
    ) -> None:
        self.settings = settings
        self.index = index
        self.log = log
        self.watch = watch
        self.barrier = barrier
        self.waits = waits
        self.locks = KeyedLocks()
        self.stalled_flushes = 0  # chunks sent early because their client went quiet

    def add_routes(self, router: web.UrlDispatcher) -> None:
        def waits(handler: errors.Handler) -> errors.Handler:
            # Every route that sends a command waits for its outcome: each holds a wait slot.
            return answering(waiting(self.waits, handler))

        start = router.add_resource("/v2/{name:.+}/blobs/uploads/", name="registry-upload-start")
        start.add_route("POST", waits(self.start))
        session = router.add_resource("/v2/{name:.+}/blobs/uploads/{uuid}", name="registry-upload")
        session.add_route("GET", answering(self.status))
        session.add_route("PATCH", waits(self.patch))
        session.add_route("PUT", waits(self.finish))
        session.add_route("DELETE", waits(self.cancel))
        # Its own resource beside the read side's blob HEAD/GET: routing goes on to the next
        # resource of the same path when a method does not match.
        blob = router.add_resource("/v2/{name:.+}/blobs/{digest}", name="registry-blob")
        blob.add_route("DELETE", waits(self.unlink))

    # POST /v2/<name>/blobs/uploads/[?digest=D | ?mount=D[&from=R]]

    async def start(self, request: web.Request) -> web.Response:
        name = repository_of(request)
        if "mount" in request.query:
            mounted = await self._mount(
                name, request.query["mount"], request.query.get("from"), caller_of(request)
            )
            if mounted is not None:
                return mounted
        elif "digest" in request.query:
            return await self._monolithic(request, name, digest_param(request.query["digest"]))
        upload_id = await self._start(name, authority(request))
        return web.Response(status=202, headers=upload_headers(name, upload_id, 0))

    async def _start(self, name: str, by: dict[str, str | None]) -> str:
        command = StartUpload(upload_id=str(uuid.uuid4()), repository=name, **by)
        await self.log.deliver(command)

        def started() -> UploadRow | RejectionRow | None:
            return self.index.upload(command.upload_id) or self.index.rejection(command.command_id)

        # Waiting for our own projection surfaces a refused start as an error here; the session's
        # next request may reach any replica, whose read barrier then finds the upload too.
        seen = await self.watch.until(started, DURABLE_SECONDS, "the upload's start")
        if isinstance(seen, RejectionRow):
            raise _chunk_refusal(name, command.upload_id, seen)
        return command.upload_id

    async def _monolithic(self, request: web.Request, name: str, digest: str) -> web.Response:
        """The whole blob in the POST: start, chunks and finish in one go, one wait."""
        command = StartUpload(upload_id=str(uuid.uuid4()), repository=name, **authority(request))
        sender = self.log.sender()
        await sender.send(command)
        # The upload's commands share its key and so its partition: the worker reads them in
        # this order, and the start need not be seen before the chunks are sent.
        appended = await self._append(sender, name, command.upload_id, 0, request)
        return await self._finish(sender, name, command.upload_id, digest, appended)

    async def _mount(
        self, name: str, digest_text: str, source: str | None, caller: Caller | None
    ) -> web.Response | None:
        """201 once the blob is linked into name; None to fall back to an upload, as the spec
        says a registry that cannot mount does. The gate has checked pull on `from` already."""
        digest = digest_param(digest_text)
        # Every partition: the blob's commit is keyed by its upload, and whichever replica took
        # it, a mount right after must find it.
        await caught_up(self.barrier)
        if await asyncio.to_thread(self.index.blob, name, digest) is not None:
            return web.Response(status=201, headers=blob_headers(name, digest))
        if source is not None:
            try:
                check_repository(source)
            except InvalidName:
                return None
            found = await asyncio.to_thread(self.index.blob, source, digest)
        elif caller is None:
            # Automatic content discovery, logins off: any repository holding the blob will do.
            found = await asyncio.to_thread(self.index.blob_anywhere, digest)
        else:
            # Logins on: only a repository the caller's token may pull from, named in the
            # command so the worker checks that pull too (zot's CVE-2024-39897 was a blob
            # reached through a repository the caller could not read).
            source, found = await asyncio.to_thread(self._readable_copy, caller, digest)
        if found is None:
            return None
        by = {"subject": caller.subject, "token": caller.grant.token} if caller else {}
        command = MountBlob(repository=name, digest=digest, source_repository=source, **by)
        await self.log.deliver(command)
        outcome = await self._outcome(command, "the mount")
        if not outcome.applied:
            return None  # unlinked meanwhile: an upload it is
        return web.Response(status=201, headers=blob_headers(name, digest))

    def _readable_copy(self, caller: Caller, digest: str) -> tuple[str | None, LayerRow | None]:
        for candidate in caller.grant.repositories(Action.PULL):
            found = self.index.blob(candidate, digest)
            if found is not None:
                return candidate, found
        return None, None

    # GET, PATCH, PUT, DELETE /v2/<name>/blobs/uploads/<uuid>

    async def status(self, request: web.Request) -> web.Response:
        name, row = await self._open_upload(request)
        return web.Response(status=204, headers=upload_headers(name, row.upload_id, _offset(row)))

    async def patch(self, request: web.Request) -> web.Response:
        upload_id = self._upload_id(request)
        async with self.locks.hold(upload_id):
            name, row = await self._open_upload(request)
            start = _chunk_start(request, name, row)
            sender = self.log.sender()
            appended = await self._append(sender, name, upload_id, start, request)
            await sender.drain()
            offset = await self._durable(name, upload_id, appended)
        return web.Response(status=202, headers=upload_headers(name, upload_id, offset))

    async def finish(self, request: web.Request) -> web.Response:
        upload_id = self._upload_id(request)
        # Checked before anything is sent: a bad digest leaves the upload as it was.
        digest = digest_param(request.query.get("digest"))
        async with self.locks.hold(upload_id):
            name, row = await self._upload_row(request)
            if row.state != UploadStates.OPEN and row.digest == digest:
                # The same PUT again, after an answer the client did not get (a 503 while a big
                # layer was verified, a dropped connection): it gets the verdict, not a 404. The
                # digest names the content, so a body sent again changes nothing.
                return await self._verdict_of(name, upload_id, digest)
            _check_open(upload_id, row)
            start = _chunk_start(request, name, row)
            sender = self.log.sender()
            appended = await self._append(sender, name, upload_id, start, request)
            return await self._finish(sender, name, upload_id, digest, appended)

    async def cancel(self, request: web.Request) -> web.Response:
        upload_id = self._upload_id(request)
        async with self.locks.hold(upload_id):
            name, _ = await self._open_upload(request)
            command = CancelUpload(upload_id=upload_id, repository=name, **authority(request))
            await self.log.deliver(command)

            def closed() -> UploadRow | RejectionRow | None:
                row = self.index.upload(upload_id)
                if row is not None and row.state != UploadStates.OPEN:
                    return row
                return self.index.rejection(command.command_id)

            seen = await self.watch.until(closed, DURABLE_SECONDS, "the cancellation")
        if isinstance(seen, RejectionRow) or seen.state != UploadStates.CANCELLED:
            # Finished, expired or cancelled by another request first: it is not there to cancel.
            raise _unknown_upload(upload_id, "is no longer open")
        return web.Response(status=204, headers={"Content-Length": "0"})

    # DELETE /v2/<name>/blobs/<digest>

    async def unlink(self, request: web.Request) -> web.Response:
        name = repository_of(request)
        digest = digest_param(request.match_info["digest"])
        await caught_up(self.barrier)  # a push or mount through another replica counts
        if await asyncio.to_thread(self.index.blob, name, digest) is None:
            raise OciError(404, ErrorCode.BLOB_UNKNOWN, f"no blob {digest} in {name}")
        command = UnlinkBlob(repository=name, digest=digest, **authority(request))
        await self.log.deliver(command)
        outcome = await self._outcome(command, "the unlink")
        if outcome.reason == RepositoryRejectReason.UNAUTHORIZED:
            raise _denied(outcome.detail or "the unlink was refused")
        if outcome.reason == RepositoryRejectReason.HANDLER_ERROR:
            raise errors.worker_failed("the unlink")
        if not outcome.applied:
            raise OciError(404, ErrorCode.BLOB_UNKNOWN, outcome.detail or f"no blob {digest}")
        return web.Response(status=202, headers={"Content-Length": "0"})

    # Plumbing

    def _upload_id(self, request: web.Request) -> str:
        try:
            return check_upload_id(request.match_info["uuid"])
        except InvalidName as bad:
            raise OciError(404, ErrorCode.BLOB_UPLOAD_UNKNOWN, str(bad)) from None

    async def _open_upload(self, request: web.Request) -> tuple[str, UploadRow]:
        name, row = await self._upload_row(request)
        _check_open(row.upload_id, row)
        return name, row

    async def _upload_row(self, request: web.Request) -> tuple[str, UploadRow]:
        """The upload as the log has it: in this repository, in whatever state."""
        name = repository_of(request)
        upload_id = self._upload_id(request)
        try:
            # Every command Kafka had taken for this upload when the request came is in the
            # index after this, whichever replica took them: the offset read next is the log's.
            await self.barrier.wait(upload_id)
        except Behind as behind:
            raise errors.unavailable(f"the upload's state is not caught up: {behind}") from None
        row = await asyncio.to_thread(self.index.upload, upload_id)
        if row is None or row.repository != name:
            raise _unknown_upload(upload_id, f"is not an upload to {name}")
        return name, row

    async def _verdict_of(self, name: str, upload_id: str, digest: str) -> web.Response:
        def final() -> UploadRow | None:
            row = self.index.upload(upload_id)
            return row if row is not None and row.state in UploadStates.TERMINAL else None

        row = await self.watch.until(final, VERDICT_SECONDS, "the upload's verdict")
        if row.state == UploadStates.COMMITTED:
            return await self._linked(name, digest)
        if row.state == UploadStates.FAILED:
            raise _failure(row)
        raise _unknown_upload(upload_id, f"is {row.state}")

    async def _append(
        self, sender: Sender, name: str, upload_id: str, start: int, request: web.Request
    ) -> Appended:
        """Sends the request's body as AppendChunk commands of at most max_chunk_bytes, reading
        it as it arrives; the sender keeps the unacknowledged bytes bounded."""
        appended = Appended(start, start, authority(request))
        size = self.settings.max_chunk_bytes
        budget = self.log.budget
        buffer = bytearray()
        held = 0  # of the process's body budget, for the bytes in buffer
        try:
            while True:
                # Taken before the bytes are read, in small steps: a slow client holds only
                # what it sent, and the process never holds more body than its budget.
                want = min(READ_STEP, size - len(buffer))
                if not budget.try_take(want):
                    if buffer:
                        # Send what is gathered rather than wait holding it: requests that each
                        # held part of a chunk while waiting for more would wait forever.
                        sent, held = held, 0
                        await self._send_chunk(sender, name, upload_id, appended, buffer, sent)
                    await budget.take(want)
                held += want
                reading = asyncio.ensure_future(request.content.read(want))
                try:
                    if buffer and not (await asyncio.wait({reading}, timeout=STALLED_SECONDS))[0]:
                        # The client went quiet with bytes gathered here: they go on now, so a
                        # stalled upload does not sit on the budget other uploads wait for.
                        sent, held = len(buffer), held - len(buffer)
                        await self._send_chunk(sender, name, upload_id, appended, buffer, sent)
                        self.stalled_flushes += 1
                    data = await reading
                finally:
                    if not reading.done():
                        reading.cancel()
                budget.give(want - len(data))
                held -= want - len(data)
                if data:
                    buffer += data
                if len(buffer) >= size or (not data and buffer):
                    sent, held = held, 0
                    await self._send_chunk(sender, name, upload_id, appended, buffer, sent)
                if not data:
                    break
        except (aiohttp.ClientPayloadError, ConnectionError, asyncio.IncompleteReadError):
            budget.give(held)
            await sender.abandon()
            raise OciError(
                400,
                ErrorCode.BLOB_UPLOAD_INVALID,
                "the request body ended early; GET the upload for the offset to resume from",
            ) from None
        except BaseException:
            budget.give(held)
            await sender.abandon()
            raise
        expected = _declared_range_length(request)
        if expected is not None and expected != appended.end - appended.start:
            await sender.abandon()
            raise OciError(
                400,
                ErrorCode.BLOB_UPLOAD_INVALID,
                f"Content-Range names {expected} bytes; the body had "
                f"{appended.end - appended.start}",
            )
        return appended

    async def _send_chunk(
        self,
        sender: Sender,
        name: str,
        upload_id: str,
        appended: Appended,
        buffer: bytearray,
        budgeted: int,
    ) -> None:
        """Sends the gathered bytes as one AppendChunk; its budget goes back when Kafka has it."""
        chunk = AppendChunk(
            upload_id=upload_id,
            repository=name,
            offset=appended.end,
            data=bytes(buffer),
            **appended.by,
        )
        buffer.clear()
        await sender.send(chunk, budgeted=budgeted)
        appended.chunks.append((chunk.offset, len(chunk.data), chunk.command_id))
        appended.end += len(chunk.data)
        await self._check_not_refused(name, upload_id, appended)

    async def _check_not_refused(self, name: str, upload_id: str, appended: Appended) -> None:
        """Mid-stream, stops reading a body whose chunks the worker already refused."""
        if len(appended.chunks) < 2:
            return  # the first chunk is judged when the request ends

        def refusal() -> RejectionRow | None:
            row = self.index.upload(upload_id)
            pending = appended.first_not_durable(row.durable_offset if row else 0)
            return self.index.rejection(pending) if pending else None

        refused = await asyncio.to_thread(refusal)
        if refused is not None:
            raise _chunk_refusal(name, upload_id, refused)

    async def _durable(self, name: str, upload_id: str, appended: Appended) -> int:
        """The upload's offset once every chunk sent is staged; a refusal answers instead."""

        def settled() -> UploadRow | RejectionRow | None:
            row = self.index.upload(upload_id)
            if row is None:
                return None
            if row.durable_offset >= appended.end or row.state != UploadStates.OPEN:
                return row
            pending = appended.first_not_durable(row.durable_offset)
            return self.index.rejection(pending) if pending else None

        seen = await self.watch.until(settled, DURABLE_SECONDS, "the upload's chunks")
        if isinstance(seen, RejectionRow):
            raise _chunk_refusal(name, upload_id, seen)
        if seen.state != UploadStates.OPEN:
            raise _unknown_upload(upload_id, f"is {seen.state}")
        return _offset(seen)

    async def _finish(
        self, sender: Sender, name: str, upload_id: str, digest: str, appended: Appended
    ) -> web.Response:
        command = FinishUpload(
            upload_id=upload_id, repository=name, size=appended.end, digest=digest, **appended.by
        )
        # Sent right behind the last chunk, in the same batch when it fits: the worker then
        # stages and finishes in one transaction.
        await sender.send(command)
        await sender.drain()

        def verdict() -> UploadRow | RejectionRow | None:
            row = self.index.upload(upload_id)
            pending = appended.first_not_durable(row.durable_offset if row else appended.start)
            if pending is not None:
                refused = self.index.rejection(pending)
                if refused is not None:
                    return refused
            if row is not None and row.state in UploadStates.TERMINAL:
                return row
            return self.index.rejection(command.command_id)

        seen = await self.watch.until(verdict, VERDICT_SECONDS, "the upload's verdict")
        if isinstance(seen, RejectionRow):
            if seen.command_type == "AppendChunk":
                raise _chunk_refusal(name, upload_id, seen)
            raise _finish_refusal(upload_id, seen)
        if seen.state == UploadStates.COMMITTED:
            return await self._linked(name, digest)
        if seen.state == UploadStates.FAILED:
            raise _failure(seen)
        raise _unknown_upload(upload_id, f"is {seen.state}")

    async def _linked(self, name: str, digest: str) -> web.Response:
        """201 once the commit's BlobLinked is in the index too: it travels in the repository's
        partition, which may be projected after the upload's, and a HEAD right after must see it."""
        await self.watch.until(
            lambda: self.index.blob(name, digest), DURABLE_SECONDS, "the blob's link"
        )
        return web.Response(status=201, headers=blob_headers(name, digest))

    async def _outcome(self, command: RepositoryCommand, what: str) -> Outcome:
        return await await_outcome(self.watch, self.index, command, what, DURABLE_SECONDS)


def _check_open(upload_id: str, row: UploadRow) -> None:
    if row.state != UploadStates.OPEN:
        raise _unknown_upload(upload_id, f"is {row.state}")


def _offset(row: UploadRow) -> int:
    return row.durable_offset


def _chunk_start(request: web.Request, name: str, row: UploadRow) -> int:
    """Where this request's bytes go: the upload's offset, which a Content-Range must name."""
    header = request.headers.get("Content-Range")
    offset = _offset(row)
    if header is None:
        return offset
    match = _CONTENT_RANGE.match(header.strip())
    if match is None or int(match.group(2)) < int(match.group(1)):
        raise _range_refusal(name, row.upload_id, offset, f"malformed Content-Range {header!r}")
    start = int(match.group(1))
    length = request.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) != int(match.group(2)) - start + 1:
        raise OciError(
            400,
            ErrorCode.BLOB_UPLOAD_INVALID,
            f"Content-Range {header!r} does not name the body's {length} bytes",
        )
    if start != offset:
        # After the read barrier the index holds the upload's own offset: a chunk elsewhere is
        # out of order, and nothing of it is sent.
        where = "inside" if start < offset else "past"
        raise _range_refusal(
            name,
            row.upload_id,
            offset,
            f"Content-Range starts at {start}, {where} the {offset} bytes received so far",
        )
    return start


def _declared_range_length(request: web.Request) -> int | None:
    header = request.headers.get("Content-Range")
    match = _CONTENT_RANGE.match(header.strip()) if header else None
    if match is None:
        return None
    return int(match.group(2)) - int(match.group(1)) + 1


def _range_refusal(name: str, upload_id: str, offset: int, message: str) -> OciError:
    return OciError(
        416,
        ErrorCode.BLOB_UPLOAD_INVALID,
        message,
        {"offset": offset},
        {
            "Location": upload_path(name, upload_id),
            "Range": range_header(offset),
            "Docker-Upload-UUID": upload_id,
        },
    )


def _unknown_upload(upload_id: str, why: str) -> OciError:
    return OciError(404, ErrorCode.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} {why}")


def _chunk_refusal(name: str, upload_id: str, refused: RejectionRow) -> OciError:
    if refused.reason == RejectReason.UNAUTHORIZED:
        return _denied(refused.detail)
    if refused.reason in _OUT_OF_ORDER:
        offset = refused.expected_offset or 0
        return _range_refusal(name, upload_id, offset, refused.detail)
    if refused.reason in _GONE:
        return _unknown_upload(upload_id, f"was refused: {refused.detail}")
    if refused.reason == RejectReason.INVALID_REPOSITORY:
        return OciError(400, ErrorCode.NAME_INVALID, refused.detail)
    return _invalid(refused)


def _denied(detail: str) -> OciError:
    """The upload worker refused the command's authority (its token ran out mid-request, say)."""
    return OciError(403, ErrorCode.DENIED, detail)


def _finish_refusal(upload_id: str, refused: RejectionRow) -> OciError:
    if refused.reason == RejectReason.UNAUTHORIZED:
        return _denied(refused.detail)
    if refused.reason in _GONE:
        return _unknown_upload(upload_id, f"was refused: {refused.detail}")
    if refused.reason == RejectReason.INVALID_DIGEST:
        return OciError(400, ErrorCode.DIGEST_INVALID, refused.detail)
    if refused.reason == RejectReason.INVALID_SIZE:
        return OciError(400, ErrorCode.SIZE_INVALID, refused.detail)
    return _invalid(refused)


def _failure(row: UploadRow) -> OciError:
    detail = {"reason": row.reason, "expected": row.expected, "actual": row.actual}
    message = row.detail or f"upload {row.upload_id} failed validation"
    if row.reason == FailureReason.INVALID_DIGEST:
        return OciError(400, ErrorCode.DIGEST_INVALID, message, detail)
    if row.reason == FailureReason.INVALID_LENGTH:
        return OciError(400, ErrorCode.SIZE_INVALID, message, detail)
    return OciError(400, ErrorCode.BLOB_UPLOAD_INVALID, message, detail)


def _invalid(refused: RejectionRow) -> OciError:
    if refused.reason == RejectReason.HANDLER_ERROR:
        # The worker's fault, not the request's: a 500 the client may retry, not a 400.
        return errors.worker_failed(f"the {refused.command_type}")
    return OciError(400, ErrorCode.BLOB_UPLOAD_INVALID, refused.detail, {"reason": refused.reason})
