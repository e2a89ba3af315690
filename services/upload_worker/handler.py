"""Upload commands in, staging effects, upload events out.

handle() never raises for bad input: a command that cannot be applied becomes a CommandRejected
event, and bytes that are not a command at all become a dead letter. Only a failing object store
raises (TransientError-like errors), and the processor retries the command.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict

from aiokafka.structs import ConsumerRecord, TopicPartition

from services.auth.authority import CommandAuthority
from services.core.checkpoints import Checkpoint, passing
from services.core.codec import CODEC, DecodeError, event_hash
from services.core.names import InvalidName, check_repository, check_upload_id
from services.core.processor import Output, dead_letter
from services.core.records import (
    COMMAND_TYPES,
    REPOSITORY_COMMAND_TYPES,
    UPLOAD_WORKER,
    AppendChunk,
    CancelUpload,
    ChunkAppended,
    Command,
    CommandRejected,
    DeadLetterReason,
    Event,
    ExpireUpload,
    FinishUpload,
    RejectReason,
    RepositoryCommand,
    RepositoryRejectReason,
    StartUpload,
    UploadCancelled,
    UploadExpired,
    UploadFinished,
    UploadStarted,
    at_ms,
    derived_id,
)
from services.core.settings import Settings
from services.digests.digest import InvalidDigest, TarSumVersionUnsupported, parse_digest
from services.upload_worker.digests import RunningDigests
from services.upload_worker.repositories import RepositoryCommands
from services.upload_worker.staging import (
    ChunkRecord,
    Closing,
    Finish,
    StagingArea,
    Status,
    UploadState,
    staging_key,
)

log = logging.getLogger(__name__)

CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Source:
    """Where a command was read: tells a replay of the same record (whose events did not
    commit) from a second record carrying the same command (a client's resend)."""

    partition: int
    offset: int

    @property
    def tag(self) -> str:
        return f"{self.partition}@{self.offset}"


class Rejected(Exception):
    def __init__(
        self,
        reason: RejectReason | RepositoryRejectReason,
        detail: str,
        expected_offset: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.expected_offset = expected_offset


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class CommandHandler:
    def __init__(
        self, settings: Settings, staging: StagingArea, checkpoint: Checkpoint = passing
    ) -> None:
        self.settings = settings
        self.staging = staging
        # Upload states this worker wrote last, by upload id, with the partition they live in.
        self.cache: OrderedDict[str, tuple[int, UploadState]] = OrderedDict()
        # Uploads changed since their partition's last settle(), by partition.
        self.touched: dict[int, set[str]] = {}
        # Kafka records carry no producer identity: each command's token is checked instead.
        self.authority = CommandAuthority.from_settings(settings)
        # Repository commands (keyed by repository name) share the topic and its partitions.
        self.repositories = RepositoryCommands(settings, staging.store, self.authority, checkpoint)
        # Each open upload's sha256 so far, which its UploadFinished hands the verifier.
        self.digests = RunningDigests()

    def forget(self, revoked: set[TopicPartition]) -> None:
        """Another worker may own these partitions now: its writes would make our cache stale."""
        partitions = {tp.partition for tp in revoked if tp.topic == self.settings.commands_topic}
        for upload_id in [u for u, (p, _) in self.cache.items() if p in partitions]:
            del self.cache[upload_id]
        self.digests.drop_partitions(partitions)
        self.repositories.forget(revoked)

    async def settle(self, partition: int) -> None:
        """Makes the changes of the partition's applied commands durable; called before their
        events are published. Raises if storage fails; calling it again goes on from there."""
        await self.staging.save(self.touched.get(partition, ()))
        self.touched.pop(partition, None)
        await self.repositories.settle(partition)

    def abandon(self, partition: int) -> None:
        """The partition's unsettled commands will be applied again (by us or another owner)."""
        upload_ids = self.touched.pop(partition, set())
        self.staging.drop(upload_ids)
        self.digests.drop(upload_ids)  # their chunks will be staged (and hashed) again
        for upload_id in upload_ids:
            self.cache.pop(upload_id, None)
        self.repositories.abandon(partition)

    async def handle(self, record: ConsumerRecord) -> list[Output]:
        try:
            command = CODEC.decode(record.value or b"", COMMAND_TYPES + REPOSITORY_COMMAND_TYPES)
        except DecodeError as error:
            return [self.dead_letter(record, error.reason, error.detail)]
        if isinstance(command, RepositoryCommand):
            return await self.repositories.handle(command, record)
        try:
            refusal = self.authority.refusal(command, record.timestamp)
            if refusal is not None:
                raise Rejected(RejectReason.UNAUTHORIZED, refusal)
            events = await self.apply(command, Source(record.partition, record.offset))
        except Rejected as rejection:
            events = [self.rejection(command, rejection, record.timestamp)]
        return [
            Output(self.settings.events_topic, event.upload_id.encode(), CODEC.encode(event))
            for event in events
        ]

    def dead_letter(self, record: ConsumerRecord, reason: str, detail: str) -> Output:
        return dead_letter(self.settings.dead_letter_topic, record, reason, detail)

    def on_error(self, record: ConsumerRecord, error: Exception) -> list[Output]:
        """The record goes to the dead letters; its sender, who may be waiting on the command's
        outcome (the registry, the SDK), learns of the failure from a rejection."""
        outputs = [self.dead_letter(record, DeadLetterReason.HANDLER_ERROR, repr(error))]
        try:
            command = CODEC.decode(record.value or b"", COMMAND_TYPES + REPOSITORY_COMMAND_TYPES)
        except DecodeError:
            return outputs
        detail = f"the upload worker failed on this command ({type(error).__name__}); see its log"
        if isinstance(command, RepositoryCommand):
            outputs.append(self.repositories.failed(command, record, detail))
        else:
            rejected = self.rejection(
                command, Rejected(RejectReason.HANDLER_ERROR, detail), record.timestamp
            )
            key = command.upload_id.encode()
            outputs.append(Output(self.settings.events_topic, key, CODEC.encode(rejected)))
        return outputs

    async def apply(self, command: Command, src: Source) -> list[Event]:
        try:
            check_upload_id(command.upload_id)
        except InvalidName as error:
            raise Rejected(RejectReason.INVALID_UPLOAD_ID, str(error)) from None
        state = await self._state(command.upload_id)
        if isinstance(command, StartUpload):
            events = await self._start(command, state, src)
        elif isinstance(command, ExpireUpload):
            events = await self._expire(command, state, src)
        else:
            if state is None:
                raise Rejected(RejectReason.UNKNOWN_UPLOAD, f"no upload {command.upload_id}")
            if command.repository != state.repository:
                raise Rejected(
                    RejectReason.REPOSITORY_MISMATCH,
                    f"upload {command.upload_id} belongs to {state.repository!r}, "
                    f"not {command.repository!r}",
                )
            if isinstance(command, AppendChunk):
                events = await self._append(command, state, src)
            elif isinstance(command, FinishUpload):
                events = await self._finish(command, state, src)
            else:
                assert isinstance(command, CancelUpload)
                events = await self._cancel(command, state, src)
        return events

    async def _state(self, upload_id: str) -> UploadState | None:
        cached = self.cache.get(upload_id)
        if cached is not None:
            self.cache.move_to_end(upload_id)
            return cached[1]
        return await self.staging.load(upload_id)

    def _remember(self, state: UploadState, partition: int) -> None:
        self.cache[state.upload_id] = (partition, state)
        self.cache.move_to_end(state.upload_id)
        self.touched.setdefault(partition, set()).add(state.upload_id)
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)

    async def _start(
        self, command: StartUpload, state: UploadState | None, src: Source
    ) -> list[Event]:
        if state is not None:
            if state.started_by != command.command_id:
                raise Rejected(
                    RejectReason.UPLOAD_EXISTS, f"upload {command.upload_id} exists already"
                )
            if state.started_from != src.tag:
                return []  # the client sent this command again: it is applied already
        else:
            try:
                check_repository(command.repository)
            except InvalidName as error:
                raise Rejected(RejectReason.INVALID_REPOSITORY, str(error)) from None
            at = now_ms()
            event = self._started(command, at)
            state = self.staging.start(
                command.upload_id,
                command.repository,
                command.command_id,
                src.tag,
                at,
                chain_head=_hash(event),
            )
            self._remember(state, src.partition)
            return [event]
        # A replay of this very record: the transaction with its event did not commit.
        return [self._started(command, state.created_ms)]

    def _started(self, command: StartUpload, at: int) -> UploadStarted:
        return UploadStarted(
            event_id=derived_id(command.command_id, "UploadStarted"),
            upload_id=command.upload_id,
            repository=command.repository,
            caused_by=command.command_id,
            occurred_at=at_ms(at),
            staging_key=staging_key(command.upload_id),
            actor=command.subject,
        )

    async def _append(self, command: AppendChunk, state: UploadState, src: Source) -> list[Event]:
        applied = next((c for c in state.ledger if c.command_id == command.command_id), None)
        if applied is not None:
            # Looked up first: the upload may have been finished or cancelled since, by a later
            # command of a batch whose events did not commit and which is applied again now.
            return await self._applied_again(command, applied, state.durable_offset, src)
        self._check_open(state)
        length = len(command.data)
        if length > self.settings.max_chunk_bytes:
            raise Rejected(
                RejectReason.CHUNK_TOO_LARGE,
                f"chunk of {length} bytes; at most {self.settings.max_chunk_bytes} allowed",
            )
        if length == 0:
            raise Rejected(RejectReason.INVALID_SIZE, "empty chunk")
        durable = state.durable_offset
        if command.offset != durable:
            return await self._append_elsewhere(command, state, durable, src)
        if not self.staging.has_room(state):
            raise Rejected(
                RejectReason.LAYER_TOO_LARGE,
                f"the layer has {durable} bytes in {len(state.parts)} parts, the most S3 allows "
                f"in one object ({self.staging.max_parts}); layers of up to "
                f"{self.staging.largest_layer} bytes fit (LAYERLOG_PART_SIZE "
                f"{self.staging.part_size})",
            )
        digest, running = await self.digests.hash_chunk(
            command.upload_id, src.partition, command.offset, command.data
        )
        record = ChunkRecord(
            command.offset,
            length,
            digest,
            command.command_id,
            durable + length,
            src.tag,
            at_ms=now_ms(),
            prev_hash=state.chain_head,
        )
        event = self._chunk_appended(command, record)
        state = await self.staging.append(state, command.data, record, _hash(event))
        self.digests.advance(command.upload_id, running)
        self._remember(state, src.partition)
        return [event]

    async def _append_elsewhere(
        self, command: AppendChunk, state: UploadState, durable: int, src: Source
    ) -> list[Event]:
        if command.offset > durable or command.offset < 0:
            raise Rejected(
                RejectReason.OFFSET_MISMATCH,
                f"chunk at offset {command.offset}; the upload's durable offset is {durable}",
                expected_offset=durable,
            )
        applied = next(
            (
                c
                for c in state.ledger
                if c.offset == command.offset and c.length == len(command.data)
            ),
            None,
        )
        if applied is None:
            raise Rejected(
                RejectReason.OFFSET_MISMATCH,
                f"chunk at offset {command.offset} overlaps bytes already applied; "
                f"the upload's durable offset is {durable}",
                expected_offset=durable,
            )
        return await self._applied_again(command, applied, durable, src)

    async def _applied_again(
        self, command: AppendChunk, applied: ChunkRecord, durable: int, src: Source
    ) -> list[Event]:
        if (
            applied.offset != command.offset
            or applied.length != len(command.data)
            or await _sha256(command.data) != applied.sha256
        ):
            raise Rejected(
                RejectReason.CHUNK_CONFLICT,
                f"offset {command.offset} or command {command.command_id} was applied before "
                "with different bytes",
                expected_offset=durable,
            )
        if applied.source == src.tag:
            # The transaction that published this chunk's event did not commit: publish it now.
            return [self._chunk_appended(command, applied)]
        return []  # the same bytes sent again: nothing to do

    def _chunk_appended(self, command: AppendChunk, record: ChunkRecord) -> ChunkAppended:
        return ChunkAppended(
            event_id=derived_id(command.command_id, "ChunkAppended"),
            upload_id=command.upload_id,
            repository=command.repository,
            caused_by=command.command_id,
            offset=record.offset,
            length=record.length,
            durable_offset=record.durable_after,
            chunk_sha256=record.sha256,
            occurred_at=at_ms(record.at_ms),
            prev_hash=record.prev_hash,
            actor=command.subject,
        )

    async def _finish(self, command: FinishUpload, state: UploadState, src: Source) -> list[Event]:
        if state.status == Status.FINISHED and state.closed_by == command.command_id:
            if state.closed_from != src.tag:
                return []  # the client sent this command again: it is applied already
        else:
            self._check_open(state)
            if command.size < 0:
                raise Rejected(RejectReason.INVALID_SIZE, f"negative size {command.size}")
            try:
                parse_digest(command.digest)
            except InvalidDigest as error:
                # The client can finish again with a well-formed digest; the upload stays open.
                # (A well-formed TarSum label of an unknown version goes on to the verifier,
                # whose verdict fails the upload like any other digest it cannot match.)
                raise Rejected(RejectReason.INVALID_DIGEST, str(error)) from None
            except TarSumVersionUnsupported:
                pass
            finish = Finish(
                command_id=command.command_id,
                source=src.tag,
                size=command.size,
                digest=command.digest,
                staged_size=state.durable_offset,
                at_ms=now_ms(),
                prev_hash=state.chain_head,
                content_sha256=self.digests.digest(command.upload_id, state.durable_offset),
            )
            event = self._finished(command, finish)
            state = await self.staging.finish(state, finish, _hash(event))
            self.digests.drop([command.upload_id])
            self._remember(state, src.partition)
            return [event]
        assert state.finish is not None  # a finished state always says how
        return [self._finished(command, state.finish)]

    def _finished(self, command: FinishUpload, finish: Finish) -> UploadFinished:
        return UploadFinished(
            event_id=derived_id(command.command_id, "UploadFinished"),
            upload_id=command.upload_id,
            repository=command.repository,
            caused_by=command.command_id,
            size=command.size,
            digest=command.digest,
            staged_size=finish.staged_size,
            staging_key=staging_key(command.upload_id),
            content_sha256=finish.content_sha256,
            occurred_at=at_ms(finish.at_ms),
            prev_hash=finish.prev_hash,
            actor=command.subject,
        )

    async def _cancel(self, command: CancelUpload, state: UploadState, src: Source) -> list[Event]:
        return self._close(command, state, src, Status.CANCELLED, ttl_ms=None)

    async def _expire(
        self, command: ExpireUpload, state: UploadState | None, src: Source
    ) -> list[Event]:
        # Never a rejection: no client sent it.
        if state is None:
            return []
        # Anyone who may write commands can send an ExpireUpload (it carries no token): the idle
        # time it needs is never below this worker's own setting.
        ttl_seconds = max(command.ttl_seconds, self.settings.upload_ttl_seconds)
        return self._close(command, state, src, Status.EXPIRED, ttl_ms=ttl_seconds * 1000)

    def _close(
        self,
        command: CancelUpload | ExpireUpload,
        state: UploadState,
        src: Source,
        status: Status,
        ttl_ms: int | None,
    ) -> list[Event]:
        """Cancels the upload (ttl_ms None) or expires it if idle for ttl_ms; its staged bytes go
        once the closed state is saved."""
        if state.status == status and state.closed_by == command.command_id:
            if state.closed_from != src.tag:
                return []  # the command sent again: it is applied already
            closing = state.closing  # a replay: finish the removal, publish the same event
            assert closing is not None  # a closed state always says how
        else:
            idle_ms = 0
            if ttl_ms is None:
                self._check_open(state)
            else:
                # Re-checked here, in the upload's own order: a chunk that arrived after the
                # scan found the upload idle makes the expiry a no-op.
                idle_ms = now_ms() - state.updated_ms
                if state.status != Status.OPEN or idle_ms < ttl_ms:
                    return []
            closing = Closing(now_ms(), state.chain_head, state.durable_offset, idle_ms // 1000)
        event: Event
        if status == Status.EXPIRED:
            fields = _closed_fields(command, state, closing, "UploadExpired")
            event = UploadExpired(**fields, idle_seconds=closing.idle_seconds)
        else:
            event = UploadCancelled(**_closed_fields(command, state, closing, "UploadCancelled"))
        state = self.staging.discard(
            state, status, command.command_id, src.tag, closing, _hash(event)
        )
        self.digests.drop([command.upload_id])
        self._remember(state, src.partition)
        return [event]

    def _check_open(self, state: UploadState) -> None:
        if state.status == Status.FINISHED:
            raise Rejected(RejectReason.UPLOAD_FINISHED, f"upload {state.upload_id} is finished")
        if state.status in (Status.CANCELLED, Status.EXPIRED):
            raise Rejected(
                RejectReason.UPLOAD_CANCELLED, f"upload {state.upload_id} is {state.status}"
            )

    def rejection(self, command: Command, rejection: Rejected, at: int) -> CommandRejected:
        """The rejection, stamped with the command record's time: a replay makes the same bytes."""
        refused_authority = rejection.reason == RejectReason.UNAUTHORIZED
        return CommandRejected(
            occurred_at=at_ms(at),
            event_id=derived_id(command.command_id, "CommandRejected"),
            upload_id=command.upload_id,
            repository=command.repository,
            caused_by=command.command_id,
            command_type=type(command).__name__,
            reason=rejection.reason,
            detail=rejection.detail,
            expected_offset=rejection.expected_offset,
            # A refused authority names nobody: the subject is only what the record claims.
            actor=None if refused_authority else command.subject,
        )


class _ClosedFields(TypedDict):
    event_id: str
    upload_id: str
    repository: str
    caused_by: str
    durable_offset: int
    occurred_at: datetime
    prev_hash: str | None
    actor: str | None


def _closed_fields(
    command: Command, state: UploadState, closing: Closing, kind: str
) -> _ClosedFields:
    """What UploadCancelled and UploadExpired both say."""
    return {
        "event_id": derived_id(command.command_id, kind),
        "upload_id": command.upload_id,
        "repository": state.repository,
        "caused_by": command.command_id,
        "durable_offset": closing.durable_offset,
        "occurred_at": at_ms(closing.at_ms),
        "prev_hash": closing.prev_hash,
        # Expiry is the worker's own doing, whatever an ExpireUpload record says of its sender.
        "actor": UPLOAD_WORKER if isinstance(command, ExpireUpload) else command.subject,
    }


def _hash(event: Event) -> str:
    return event_hash(CODEC.encode(event))


async def _sha256(data: bytes) -> str:
    # hashlib releases the GIL on large buffers, so a thread keeps the event loop responsive.
    if len(data) < 1 << 16:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
