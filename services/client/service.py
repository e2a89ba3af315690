"""LayerService, LayerUpload and Layer: the SDK's three handles."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import urllib3
from aiokafka.errors import KafkaConnectionError, KafkaError

from services.auth.scopes import Action
from services.client.bodies import REDIRECTS, Body, ServiceBody, Unavailable, open_storage
from services.client.credentials import registry_host
from services.client.errors import (
    HTTP_ERRORS,
    VERDICT_ERRORS,
    LayerAccessDenied,
    LayerError,
    LayerInvalidDigest,
    LayerLoginFailed,
    LayerNameInvalid,
    LayerUnauthorized,
    LayerUnknown,
    LayerUploadUnknown,
)
from services.client.tokens import RepositoryToken, Tokens
from services.core import kafka
from services.core.codec import CODEC
from services.core.login import login_problem
from services.core.names import InvalidName, check_repository
from services.core.principals import Principal
from services.core.records import AppendChunk, CancelUpload, Command, FinishUpload, StartUpload
from services.core.settings import MIB, Settings

DEFAULT_FINISH_TIMEOUT = 300.0
# write() returns once a chunk is handed to the Kafka client, until this many bytes wait for
# Kafka's acknowledgement; waiting for each chunk in turn left the link idle half the time.
IN_FLIGHT_BYTES = 32 * MIB
# aiohttp pauses the socket whenever this much is buffered unread (default 64 KiB); layer
# reads come in megabytes, and pausing every 64 KiB made reading CPU-bound.
READ_BUFFER = 4 * MIB
POLL_SECONDS = 20.0
# Producers still stopping after close() gave up waiting for them (see _stop_producer).
_LINGERING: set[asyncio.Future[None]] = set()


class LayerService:
    """Entry point: `async with LayerService() as ls:`; settings from LAYERLOG_* unless given."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        chunk_size: int | None = None,
        finish_timeout: float = DEFAULT_FINISH_TIMEOUT,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.chunk_size = min(
            chunk_size or self.settings.max_chunk_bytes, self.settings.max_chunk_bytes
        )
        self.finish_timeout = finish_timeout
        # Batches of up to 1 MiB: a small layer's last chunk and its FinishUpload then travel in
        # one batch, which the worker sees in one fetch and commits in one transaction.
        self._producer = kafka.producer(self.settings, Principal.CLIENT, max_batch_size=MIB)
        self._http: aiohttp.ClientSession | None = None
        # With logins on (LAYERLOG_AUTH), tokens from the registry's token endpoint: every
        # command carries one, every query request sends one (see tokens.py).
        self._token_http: aiohttp.ClientSession | None = None
        self._tokens: Tokens | None = None
        # For layer bytes a redirect sends straight to S3 (see bodies.py).
        self.storage = urllib3.PoolManager(
            maxsize=8, timeout=urllib3.Timeout(connect=10, read=60), retries=False
        )

    async def __aenter__(self) -> LayerService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        try:
            # A producer's start asks for a producer id, which a cluster that lost its majority
            # cannot give, and aiokafka asks again without end: keep to finish_timeout.
            await asyncio.wait_for(self._producer.start(), self.finish_timeout)
        except TimeoutError:
            await self._producer.stop()
            raise LayerError(
                f"Kafka at {self.settings.kafka_bootstrap} did not let the client start within "
                f"{self.finish_timeout:.0f}s: its brokers are down or have lost their majority; "
                "try again once Kafka is back"
            ) from None
        except KafkaConnectionError:
            # aiokafka says only that it could not connect; a refused login deserves its reason.
            problem = await login_problem(self.settings, Principal.CLIENT)
            if problem is not None:
                raise problem from None
            raise
        self._http = aiohttp.ClientSession(
            base_url=self.settings.query_url,
            timeout=aiohttp.ClientTimeout(total=None, connect=10),
            read_bufsize=READ_BUFFER,
        )
        if self.settings.auth:
            self._token_http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=60, connect=10)
            )
            self._tokens = Tokens(self.settings, self._token_http)

    async def close(self) -> None:
        # Each resource is let go even when letting go of another one fails.
        try:
            await self._stop_producer()
        finally:
            try:
                if self._http is not None:
                    await self._http.close()
            finally:
                try:
                    if self._token_http is not None:
                        await self._token_http.close()
                finally:
                    self.storage.clear()

    async def _stop_producer(self) -> None:
        """Stops the Kafka client, giving the records it still holds finish_timeout to be
        acknowledged.

        aiokafka's stop() waits for every record it holds, without end while Kafka lacks the
        in-sync replicas to acknowledge them: the LayerError that said so would reach the
        caller only once Kafka is back. Past finish_timeout the stop goes on in the background
        instead (it ends when Kafka takes the records, or when the event loop does); the caller
        was told Kafka did not take them, and the worker knows a command that lands after all
        by its id."""
        stopping = asyncio.ensure_future(self._producer.stop())
        done, _ = await asyncio.wait([stopping], timeout=self.finish_timeout)
        if done:
            stopping.result()
            return
        stopping.add_done_callback(_collect)
        _LINGERING.add(stopping)  # a task nobody refers to may be garbage-collected mid-way
        stopping.add_done_callback(_LINGERING.discard)

    # LayerService verbs

    async def upload(self, name: str) -> LayerUpload:
        _check_name(name)
        upload = LayerUpload(self, str(uuid.uuid4()), name, 0)
        await self._deliver([StartUpload(upload_id=upload.uuid, repository=name)])
        return upload

    async def resume(self, upload_id: str, name: str | None = None) -> LayerUpload:
        """The upload as of every command Kafka had acknowledged when it was asked: a started
        upload is found, at the offset of its acknowledged writes.

        With logins on, name (the upload's repository) is needed: the query service shows an
        upload only to a caller who may push to its repository."""
        if name is not None:
            _check_name(name)
        elif self._tokens is not None:
            raise LayerError(
                f"resume({upload_id!r}) needs the upload's repository when logins are on "
                "(LAYERLOG_AUTH): resume(upload_id, name)"
            )
        deadline = time.monotonic() + self.finish_timeout
        attempt = 0
        while True:
            async with await self._request("GET", f"/uploads/{upload_id}", name) as response:
                body = await response.json(content_type=None)
                if response.status in (400, 404):
                    raise LayerUploadUnknown(body.get("message", f"upload {upload_id} unknown"))
                # 503: the service cannot tell yet (its index is behind the commands, or
                # storage is away); it says so rather than answer a wrong 404.
                if response.status != 503 or time.monotonic() > deadline:
                    _raise_for_status(response, body)
                    if name is not None and body["repository"] != name:
                        raise LayerUploadUnknown(
                            f"upload {upload_id} is in {body['repository']}, not {name}"
                        )
                    return LayerUpload(self, upload_id, body["repository"], body["offset"])
                retry_after = _retry_after(response)
            attempt += 1
            await asyncio.sleep(min(retry_after, 0.05 * 2**attempt))

    async def exists(self, name: str, digest: str) -> bool:
        return await self._head(name, digest) is not None

    async def fetch(self, name: str, digest: str) -> Layer:
        headers = await self._head(name, digest)
        if headers is None:
            raise LayerUnknown(f"no layer {digest} in {name}")
        created_ms = int(headers.get("X-Layerlog-Created-At-Ms", "0"))
        return Layer(
            self,
            name,
            digest,
            int(headers["Content-Length"]),
            datetime.fromtimestamp(created_ms / 1000, UTC),
        )

    # Plumbing

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise LayerError("LayerService is not started: use `async with LayerService()`")
        return self._http

    async def _send(self, command: Command) -> asyncio.Future[Any]:
        """Hands one command to the Kafka client; the future says when Kafka has it."""
        command = await self._authorized(command)
        return await self._producer.send(
            self.settings.commands_topic, CODEC.encode(command), key=command.upload_id.encode()
        )

    async def _authorized(self, command: Command) -> Command:
        """The command with the subject and token it travels under (unchanged with logins off).

        Each command takes the cache's token as it is sent, so one sent after an older token ran
        out carries a newer one; a resend after a Kafka failure is stamped afresh too."""
        if self._tokens is None:
            return command
        token = await self._tokens.for_repository(command.repository)
        # Every command the SDK sends (start, chunk, finish, cancel) needs push on its repository
        # (services/auth/authority.py); refusing here keeps the bytes off the log.
        if not token.allows(Action.PUSH):
            # The policy may have opened the repository since the token was issued: ask again.
            self._tokens.forget(command.repository, token)
            token = await self._tokens.for_repository(command.repository)
            if not token.allows(Action.PUSH):
                raise self._denied(token, command.repository, Action.PUSH)
        return replace(command, subject=token.subject, token=token.value)

    def _denied(self, token: RepositoryToken, name: str, action: str) -> LayerAccessDenied:
        if token.anonymous:
            return LayerAccessDenied(
                f"an anonymous caller may not {action} {name}; log in: set LAYERLOG_USERNAME "
                f"and LAYERLOG_PASSWORD, or `docker login {registry_host(self.settings)}`"
            )
        granted = ", ".join(sorted(token.actions)) or "nothing"
        return LayerAccessDenied(
            f"{token.subject} may not {action} {name} (the policy gives {token.subject} "
            f"{granted} there)"
        )

    async def _request(
        self,
        method: str,
        path: str,
        name: str | None,
        *,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> aiohttp.ClientResponse:
        """A query service request with name's token (name None: none); the caller releases
        the response. A 401 fetches a new token and asks once more; a refusal after that, or a
        403, raises LayerAccessDenied."""
        for attempt in (1, 2):
            sent = dict(headers or {})
            token = None
            if self._tokens is not None and name is not None:
                token = await self._tokens.for_repository(name)
                sent["Authorization"] = f"Bearer {token.value}"
            response = await self.http.request(method, path, headers=sent, **options)
            if response.status not in (401, 403):
                return response
            said = ""
            if method != "HEAD":
                said = _message_of(await response.text(errors="replace"))
            response.release()
            if response.status == 401 and token is not None and attempt == 1:
                assert self._tokens is not None and name is not None
                self._tokens.forget(name, token)  # expired, or the policy changed: a new one
                continue
            raise self._refused(response.status, path, name, token, said)
        raise AssertionError("unreachable")

    def _refused(
        self, status: int, path: str, name: str | None, token: RepositoryToken | None, said: str
    ) -> LayerUnauthorized:
        if self._tokens is None:
            return LayerLoginFailed(
                f"the query service at {self.settings.query_url} wants a login ({status}) but "
                "logins are off here (LAYERLOG_AUTH=off): turn them on and log in"
            )
        if token is None:
            return LayerAccessDenied(f"the query service refused {path} ({status}): {said}")
        action = Action.PUSH if path.startswith("/uploads/") else Action.PULL
        if not token.allows(action) and name is not None:
            return self._denied(token, name, action)
        return LayerAccessDenied(
            f"the query service refused {path} to {token.subject} ({status})"
            + (f": {said}" if said else "")
        )

    async def _deliver(self, commands: list[Command]) -> None:
        """Puts the commands on Kafka in order, retrying through a broker outage.

        After a failure, everything from the first undelivered command on is sent again, so the
        worker never sees a chunk after a gap; a command that did arrive twice is recognised by
        its command id and changes nothing.
        """
        deadline = time.monotonic() + self.finish_timeout
        pending, attempt = commands, 0
        while pending:
            deliveries: list[asyncio.Future[Any]] = []
            errors: list[BaseException] = []
            try:
                for command in pending:
                    deliveries.append(await self._send(command))
            except KafkaError as error:
                errors.append(error)  # the futures gathered so far say how far it got
            results = await self._acknowledged(deliveries, deadline, pending[0].upload_id)
            refusal = next((e for e in [*errors, *results] if kafka.refused(e)), None)
            if refusal is not None:
                # No ACL lets this principal write there (or its login stopped working):
                # retrying until the deadline would only hide that.
                raise kafka.KafkaRefused(
                    f"Kafka refused the upload's commands on {self.settings.commands_topic}: "
                    f"{refusal!r}; check the client principal's ACLs (`layerlog provision`)"
                )
            failed = next(
                (i for i, r in enumerate(results) if isinstance(r, BaseException)), len(results)
            )
            pending = pending[failed:]
            if not pending:
                return
            attempt += 1
            if time.monotonic() > deadline:
                raise LayerError(f"Kafka did not take the upload's commands: {results[failed:]!r}")
            await asyncio.sleep(min(5.0, 0.1 * 2**attempt))

    async def _acknowledged(
        self, deliveries: list[asyncio.Future[Any]], deadline: float, upload_id: str
    ) -> list[Any]:
        """Each delivery's result or exception, once all are settled, by the deadline.

        aiokafka's idempotent producer never gives up on a record it has sent: while its
        partition has fewer in-sync replicas than min.insync.replicas (a cluster that lost its
        majority), it retries without end. The SDK's calls keep to finish_timeout instead and
        raise LayerError past it. A command still in flight may land later; the worker knows it
        by its command id, and resume() goes on from what Kafka did acknowledge."""
        if not deliveries:
            return []
        _, waiting = await asyncio.wait(deliveries, timeout=max(0.0, deadline - time.monotonic()))
        if waiting:
            for delivery in waiting:
                delivery.add_done_callback(_collect)
            raise LayerError(
                f"Kafka did not acknowledge upload {upload_id}'s commands within "
                f"{self.finish_timeout:.0f}s: its brokers are down or fewer of them are in sync "
                "than the topic's min.insync.replicas; try again once Kafka is back"
            )
        return await asyncio.gather(*deliveries, return_exceptions=True)

    async def _head(self, name: str, digest: str) -> dict[str, str] | None:
        _check_name(name)
        deadline = time.monotonic() + self.finish_timeout
        attempt = 0
        while True:
            path = f"/v2/{name}/blobs/{digest}"
            async with await self._request("HEAD", path, name) as response:
                if response.status == 200:
                    return dict(response.headers)
                if response.status == 404:
                    return None
                if response.status == 400:
                    # HEAD has no body: the GET's says which error it is.
                    async with await self._request("GET", path, name) as again:
                        body = await again.json(content_type=None)
                    error_type = HTTP_ERRORS.get(body.get("error", ""), LayerInvalidDigest)
                    raise error_type(body.get("message", "bad request"))
                # 503: the index is behind the log (a restart catching up, Kafka away) and
                # says so rather than answer a stale 404; as resume() does, ask again.
                if response.status != 503 or time.monotonic() > deadline:
                    raise LayerError(
                        f"query service answered {response.status} for {name}@{digest}"
                    )
                retry_after = _retry_after(response)
            attempt += 1
            await asyncio.sleep(min(retry_after, 0.05 * 2**attempt))

    async def _wait_for_verdict(
        self, upload_id: str, name: str, command_id: str, final: set[str]
    ) -> dict:
        deadline = time.monotonic() + self.finish_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LayerError(f"no verdict for upload {upload_id} within {self.finish_timeout}s")
            wait = min(POLL_SECONDS, remaining)
            pause = 0.0
            try:
                async with await self._request(
                    "GET",
                    f"/uploads/{upload_id}/verdict",
                    name,
                    params={"wait": f"{wait:.3f}", "command": command_id},
                ) as response:
                    body = await response.json(content_type=None)
                    if response.status == 200 and body["state"] in final | {"rejected"}:
                        return body
                    if response.status == 503:
                        # A replica still catching up with the log (or storage away): the
                        # verdict is in the log all the same; ask again as it says.
                        pause = min(_retry_after(response), remaining)
                    elif response.status not in (200, 404):
                        _raise_for_status(response, body)
                if pause:
                    await asyncio.sleep(pause)
            except aiohttp.ClientConnectionError:
                # The query service restarts; the verdict will still be in the log when it is back.
                await asyncio.sleep(0.5)


class LayerUpload:
    """An upload in progress. offset counts the bytes accepted so far."""

    def __init__(self, service: LayerService, upload_id: str, name: str, offset: int) -> None:
        self.service = service
        self.uuid = upload_id
        self.name = name
        self.offset = offset
        self._sent = offset  # bytes handed to Kafka; offset - _sent are buffered here
        self._buffer = bytearray()
        self._closed = False
        # Commands sent and not yet acknowledged, oldest first, with their sizes.
        self._in_flight: list[tuple[Command, asyncio.Future[Any], int]] = []
        self._in_flight_bytes = 0

    async def write(self, data: bytes) -> int:
        """Buffers data and sends whole chunks; a failure to send surfaces on a later call."""
        self._check_usable()
        self._buffer += data
        self.offset += len(data)
        if len(self._buffer) >= self.service.chunk_size:
            await self._send_commands(self._take_chunks(all_of_it=False))
        return len(data)

    async def flush(self) -> None:
        """Sends everything buffered and waits until Kafka has it."""
        self._check_usable()
        await self._send_commands(self._take_chunks(all_of_it=True))
        await self._settle(everything=True)

    async def finish(self, size: int, digest: str) -> Layer:
        self._check_usable()
        command = FinishUpload(upload_id=self.uuid, repository=self.name, size=size, digest=digest)
        # The last chunks and FinishUpload go out together: the worker then usually reads them in
        # one fetch and commits them in one transaction instead of one per command.
        await self._send_commands([*self._take_chunks(all_of_it=True), command])
        await self._settle(everything=True)
        self._closed = True
        body = await self.service._wait_for_verdict(
            self.uuid,
            self.name,
            command.command_id,
            {"committed", "failed", "cancelled", "expired"},
        )
        if body["state"] == "committed":
            return await self.service.fetch(self.name, digest)
        if body["state"] == "rejected" and body.get("reason") == "INVALID_DIGEST":
            self._closed = False  # the worker kept the upload open: finish may be called again
        raise _verdict_error(self.uuid, body)

    async def cancel(self) -> None:
        self._check_usable()
        self._buffer.clear()
        command = CancelUpload(upload_id=self.uuid, repository=self.name)
        await self._send_commands([command])
        await self._settle(everything=True)
        self._closed = True
        body = await self.service._wait_for_verdict(
            self.uuid,
            self.name,
            command.command_id,
            {"cancelled", "committed", "failed", "expired"},
        )
        if body["state"] != "cancelled":
            raise _verdict_error(self.uuid, body)

    async def _send_commands(self, commands: list[Command]) -> None:
        """Hands the commands to Kafka's client in order, then waits for acknowledgements until
        at most IN_FLIGHT_BYTES are unacknowledged."""
        for position, command in enumerate(commands):
            try:
                future = await self.service._send(command)
            except KafkaError:
                # Kafka is away: what is in flight, then the rest, go the patient way.
                await self._settle(everything=True)
                await self.service._deliver(commands[position:])
                return
            size = len(command.data) if isinstance(command, AppendChunk) else 0
            self._in_flight.append((command, future, size))
            self._in_flight_bytes += size
        await self._settle(everything=False)

    async def _settle(self, *, everything: bool) -> None:
        """Waits for the oldest acknowledgements: all of them, or until at most IN_FLIGHT_BYTES
        are unacknowledged.

        After a failure everything from the failed command on is delivered again, in order: a
        command that did arrive twice is recognised by its command id and changes nothing."""
        while self._in_flight and (everything or self._in_flight_bytes > IN_FLIGHT_BYTES):
            _, future, size = self._in_flight[0]
            deadline = time.monotonic() + self.service.finish_timeout
            (outcome,) = await self.service._acknowledged([future], deadline, self.uuid)
            if isinstance(outcome, KafkaError):
                unacknowledged = [c for c, _, _ in self._in_flight]
                await self.service._acknowledged(
                    [f for _, f, _ in self._in_flight], deadline, self.uuid
                )
                self._in_flight.clear()
                self._in_flight_bytes = 0
                await self.service._deliver(unacknowledged)
                return
            if isinstance(outcome, BaseException):
                raise outcome
            self._in_flight.pop(0)
            self._in_flight_bytes -= size

    def _take_chunks(self, *, all_of_it: bool) -> list[Command]:
        """AppendChunk commands for the buffered bytes (whole chunks only, unless all_of_it)."""
        size = self.service.chunk_size
        commands: list[Command] = []
        start = 0
        while len(self._buffer) - start >= size or (all_of_it and start < len(self._buffer)):
            chunk = bytes(self._buffer[start : start + size])
            commands.append(
                AppendChunk(
                    upload_id=self.uuid, repository=self.name, offset=self._sent, data=chunk
                )
            )
            self._sent += len(chunk)
            start += len(chunk)
        del self._buffer[:start]
        return commands

    def _check_usable(self) -> None:
        if self._closed:
            raise LayerUploadUnknown(f"upload {self.uuid} is finished or cancelled")


class Layer:
    """A committed layer: readable and seekable; reads are ranged requests to the query service."""

    def __init__(
        self, service: LayerService, name: str, digest: str, size: int, created_at: datetime
    ) -> None:
        self.service = service
        self.name = name
        self.digest = digest
        self.size = size
        self.created_at = created_at
        self._position = 0
        self._body: Body | None = None
        self._body_position = -1

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self.size}.get(whence)
        if base is None:
            raise ValueError(f"whence must be 0, 1 or 2, not {whence}")
        if base + offset < 0:
            raise ValueError(f"cannot seek to {base + offset}: before the start")
        self._position = base + offset
        return self._position

    async def read(self, n: int = -1) -> bytes:
        if self._position >= self.size or n == 0:
            return b""
        want = self.size - self._position if n < 0 else min(n, self.size - self._position)
        pieces: list[bytes] = []
        got = 0
        deadline = time.monotonic() + self.service.finish_timeout
        attempt = 0
        while got < want:
            failure: Exception | None = None
            try:
                if self._body is None or self._body_position != self._position:
                    await self._open_at(self._position)
                assert self._body is not None
                data = await self._body.read(want - got)
                if len(data) < want - got:
                    failure = ConnectionError("the response ended early")
            except (aiohttp.ClientError, urllib3.exceptions.HTTPError, Unavailable) as error:
                data, failure = b"", error
            if data:
                pieces.append(data)
                got += len(data)
            self._position += len(data)
            self._body_position = self._position
            if failure is not None:
                # The query service or storage went away mid-read: go on from here once back.
                await self.close()
                attempt += 1
                if time.monotonic() > deadline:
                    raise LayerError(f"reading {self.digest} failed: {failure!r}") from failure
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
        # Almost always one piece: returned as it came, not copied twice more (a bytearray,
        # then bytes), which cost the reader more CPU than receiving it.
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    async def _open_at(self, position: int) -> None:
        # One streaming response serves sequential reads; a seek elsewhere opens a ranged one.
        await self.close()
        response = await self.service._request(
            "GET",
            f"/v2/{self.name}/blobs/{self.digest}",
            self.name,
            headers={"Range": f"bytes={position}-"},
            allow_redirects=False,
        )
        if response.status in REDIRECTS and "Location" in response.headers:
            location = response.headers["Location"]
            response.release()
            self._body = await open_storage(
                self.service.storage, location, position, f"{self.name}@{self.digest}"
            )
            self._body_position = position
            return
        if response.status == 404:
            response.release()
            raise LayerUnknown(f"no layer {self.digest} in {self.name}")
        if response.status not in (200, 206):
            body = await response.text()
            response.release()
            if response.status == 503:
                raise Unavailable(body[:200])
            raise LayerError(f"query service answered {response.status}: {body[:200]}")
        self._body = ServiceBody(response)
        self._body_position = position

    async def __aenter__(self) -> Layer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _check_name(name: str) -> None:
    try:
        check_repository(name)
    except InvalidName as error:
        raise LayerNameInvalid(str(error)) from None


def _verdict_error(upload_id: str, body: dict) -> LayerError:
    if body["state"] in ("cancelled", "expired"):
        return LayerUploadUnknown(f"upload {upload_id} was {body['state']}")
    error_type = VERDICT_ERRORS.get(body.get("reason") or "", LayerError)
    return error_type(f"upload {upload_id}: {body.get('reason')}: {body.get('detail')}")


def _retry_after(response: aiohttp.ClientResponse) -> float:
    try:
        return max(0.0, min(5.0, float(response.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


def _message_of(text: str) -> str:
    """The message of the query service's JSON error body, else the start of the text."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    message = body.get("message") if isinstance(body, dict) else None
    return message[:300] if isinstance(message, str) else ""


def _raise_for_status(response: aiohttp.ClientResponse, body: dict) -> None:
    if response.status >= 400:
        raise LayerError(f"query service answered {response.status}: {body.get('message', body)}")


def _collect(delivery: asyncio.Future[Any]) -> None:
    """Reads the outcome of a delivery nobody waits for any more, so asyncio does not log it
    as an exception never retrieved."""
    if not delivery.cancelled():
        delivery.exception()
