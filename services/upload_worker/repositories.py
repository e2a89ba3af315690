"""Repository commands in, repository events out: manifests, tags and blob links.

Each repository has one state object, repository-state/<name>/_state.json: its tags, the
manifests it stores, the head of its hash chain, and a ledger of the commands applied last with
what was decided for each (when, the chain head before it, the tag's previous digest, ...). A
command's events are a pure function of the command and its ledger entry, so a batch applied
again (its transaction did not commit) publishes byte-identical events, even when the state was
already saved with the batch's changes. Like upload states, the touched states are written once
per batch, before the batch's events and offsets are committed.

Repository commands are keyed by the repository name, so one repository lives in one partition
and its commands are applied in log order: the last PutManifest to a tag wins, and every move
names the digest the tag pointed at before it.

A mount names the copy the digest's blobs/ pointer names, and a PutManifest writes the copy its
ManifestStored names; the garbage collector may be reclaiming either. So each leaves a hold
(services/core/holds.py) before it reads the pointer again or writes the copy: the collector,
which withdraws the pointer (for a manifest: deletes the copy) before it reads the holds, then
keeps the bytes until the command's outcome is in the log, or restores the manifest's copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, TypeVar

from aiokafka.structs import ConsumerRecord, TopicPartition

from services.auth.authority import CommandAuthority
from services.core.checkpoints import Checkpoint, Step, passing
from services.core.codec import CODEC, event_hash
from services.core.holds import HoldCause, hold_blob, hold_manifest
from services.core.layout import (
    manifest_key,
    read_blob_pointer,
    repository_state_key,
    resolve_blob,
)
from services.core.names import InvalidName, check_repository
from services.core.objectstore import ObjectNotFound, ObjectStore
from services.core.processor import Output
from services.core.records import (
    BlobMounted,
    BlobUnlinked,
    DeleteManifest,
    DeleteTag,
    ManifestDeleted,
    ManifestStored,
    MountBlob,
    PutManifest,
    RepositoryCommand,
    RepositoryCommandRejected,
    RepositoryEvent,
    RepositoryRejectReason,
    TagDeleted,
    TagMoved,
    UnlinkBlob,
    at_ms,
    derived_id,
)
from services.core.settings import Settings
from services.oci.manifest import ManifestInvalid, parse_manifest
from services.oci.references import (
    InvalidReference,
    OciDigest,
    check_tag,
    is_digest,
    parse_oci_digest,
)
from services.upload_worker.staging import LEDGER_LENGTH, _all

T = TypeVar("T")

# States kept in memory, most recently used first out last; each holds a ledger of up to
# LEDGER_LENGTH entries (a batch applied again finds each of its commands there).
CACHE_SIZE = 1_000
# Bodies up to this size are hashed and parsed on the event loop; larger ones in a thread.
INLINE_BYTES = 1 << 16


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decision:
    """What applying one command decided; with the command it determines the events."""

    command_id: str
    source: str  # partition@offset of the record that applied it
    at_ms: int
    prev_hash: str | None = None  # the chain head before the command (None: first event)
    reason: str = ""  # a rejection's reason ("" when applied) and detail
    detail: str = ""
    media_type: str = ""  # ManifestStored
    subject: str | None = None
    artifact_type: str | None = None
    previous_digest: str | None = None  # TagMoved, TagDeleted
    tags: tuple[str, ...] = ()  # DeleteManifest: the tags it removed, in event order
    size: int = 0  # BlobMounted
    object_key: str = ""
    blob_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        # Only what differs from the defaults: a state holds a few hundred of these.
        defaults = _DECISION_DEFAULTS
        return {k: v for k, v in asdict(self).items() if k not in defaults or defaults[k] != v}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Decision:
        return cls(**{**raw, "tags": tuple(raw.get("tags", ()))})


_DECISION_DEFAULTS = {f.name: f.default for f in fields(Decision) if f.default is not MISSING}


@dataclass(frozen=True)
class RepositoryState:
    repository: str
    tags: dict[str, str] = field(default_factory=dict)  # tag -> manifest digest
    manifests: frozenset[str] = frozenset()
    chain_head: str | None = None  # hash of the repository's last chained event
    ledger: tuple[Decision, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "repository": self.repository,
                "tags": self.tags,
                "manifests": sorted(self.manifests),
                "chain_head": self.chain_head,
                "ledger": [d.to_dict() for d in self.ledger],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RepositoryState:
        raw = json.loads(data)
        return cls(
            repository=raw["repository"],
            tags=dict(raw["tags"]),
            manifests=frozenset(raw["manifests"]),
            chain_head=raw["chain_head"],
            ledger=tuple(Decision.from_dict(d) for d in raw["ledger"]),
        )

    def decided(self, command_id: str) -> Decision | None:
        return next((d for d in reversed(self.ledger) if d.command_id == command_id), None)


_UNAUTHORIZED = RepositoryRejectReason.UNAUTHORIZED


class RepositoryCommands:
    """Applies repository commands; the processor's settle/abandon/forget reach it through the
    upload worker's CommandHandler, partition by partition."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        authority: CommandAuthority,
        checkpoint: Checkpoint = passing,
    ) -> None:
        self.settings = settings
        self.store = store
        self.authority = authority
        self.checkpoint = checkpoint  # where a test may stop it (services/core/checkpoints.py)
        # States this worker changed last, by repository, with the partition they live in.
        self.cache: OrderedDict[str, tuple[int, RepositoryState]] = OrderedDict()
        self.unsaved: dict[str, RepositoryState] = {}
        self.touched: dict[int, set[str]] = {}  # by partition, since its last settle()

    # Batch boundaries

    async def settle(self, partition: int) -> None:
        """Writes the states the partition's applied commands changed. Raises if storage
        fails; calling it again writes what is still unwritten."""
        names = self.touched.get(partition, set())
        await _all(self._save(name) for name in names if name in self.unsaved)
        self.touched.pop(partition, None)

    def abandon(self, partition: int) -> None:
        """The partition's unsettled commands will be applied again, from the saved states."""
        for name in self.touched.pop(partition, set()):
            self.unsaved.pop(name, None)
            self.cache.pop(name, None)

    def forget(self, revoked: set[TopicPartition]) -> None:
        """Another worker may own these partitions now: its writes would make our cache stale."""
        partitions = {tp.partition for tp in revoked if tp.topic == self.settings.commands_topic}
        for name in [n for n, (p, _) in self.cache.items() if p in partitions]:
            del self.cache[name]

    async def _save(self, name: str) -> None:
        state = self.unsaved[name]
        await self.store.put(repository_state_key(name), state.to_json())
        if self.unsaved.get(name) is state:
            del self.unsaved[name]

    # Applying

    async def handle(self, command: RepositoryCommand, record: ConsumerRecord) -> list[Output]:
        source = f"{record.partition}@{record.offset}"
        try:
            check_repository(command.repository)
        except InvalidName as error:
            return self._outputs(command, self._stateless(command, record, str(error)))
        if record.key != command.repository.encode():
            detail = (
                f"keyed {_text(record.key)!r}: a repository command is keyed by its repository "
                "name, so that the repository's commands are applied in order"
            )
            return self._outputs(command, self._stateless(command, record, detail))
        refusal = self.authority.refusal(command, record.timestamp)
        if refusal is not None:
            return self._outputs(command, self._stateless(command, record, refusal, _UNAUTHORIZED))
        state = await self._state(command.repository)
        decision = state.decided(command.command_id)
        if decision is not None:
            if decision.source != source:
                return []  # the client sent this command again: it is applied already
            # A replay of this very record: the transaction with its events did not commit.
            return self._outputs(command, decision)
        decision = await self._decide(command, state, source)
        events = self._outputs(command, decision)
        self._remember(self._next_state(command, state, decision, events), record.partition)
        return events

    async def _state(self, name: str) -> RepositoryState:
        cached = self.cache.get(name)
        if cached is not None:
            self.cache.move_to_end(name)
            return cached[1]
        if name in self.unsaved:
            return self.unsaved[name]
        try:
            return RepositoryState.from_json(await self.store.get(repository_state_key(name)))
        except ObjectNotFound:
            return RepositoryState(repository=name)

    def _remember(self, state: RepositoryState, partition: int) -> None:
        self.unsaved[state.repository] = state
        self.cache[state.repository] = (partition, state)
        self.cache.move_to_end(state.repository)
        self.touched.setdefault(partition, set()).add(state.repository)
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)

    def _stateless(
        self,
        command: RepositoryCommand,
        record: ConsumerRecord,
        detail: str,
        reason: RepositoryRejectReason = RepositoryRejectReason.INVALID_REPOSITORY,
    ) -> Decision:
        # No state to keep a decision in: the record's own timestamp makes a replay identical.
        return Decision(
            command_id=command.command_id,
            source=f"{record.partition}@{record.offset}",
            at_ms=record.timestamp,
            reason=reason,
            detail=detail,
        )

    async def _decide(
        self, command: RepositoryCommand, state: RepositoryState, source: str
    ) -> Decision:
        decision = Decision(command.command_id, source, _now_ms(), prev_hash=state.chain_head)
        try:
            if isinstance(command, PutManifest):
                return await self._put_manifest(command, state, decision)
            if isinstance(command, DeleteManifest):
                _check_digest(command.digest)
                if command.digest not in state.manifests:
                    raise Rejected(
                        RepositoryRejectReason.MANIFEST_UNKNOWN,
                        f"{state.repository} has no manifest {command.digest}",
                    )
                tags = sorted(t for t, d in state.tags.items() if d == command.digest)
                return replace(decision, tags=tuple(tags))
            if isinstance(command, DeleteTag):
                _check_tag(command.tag)
                if command.tag not in state.tags:
                    raise Rejected(
                        RepositoryRejectReason.MANIFEST_UNKNOWN,
                        f"{state.repository} has no tag {command.tag}",
                    )
                return replace(decision, previous_digest=state.tags[command.tag])
            if isinstance(command, MountBlob):
                return await self._mount(command, decision)
            assert isinstance(command, UnlinkBlob)
            _check_digest(command.digest)
            return decision
        except Rejected as rejection:
            return replace(
                decision, prev_hash=None, reason=rejection.reason, detail=rejection.detail
            )

    async def _put_manifest(
        self, command: PutManifest, state: RepositoryState, decision: Decision
    ) -> Decision:
        claimed = _check_digest(command.digest)
        if is_digest(command.reference):
            if command.reference != command.digest:
                raise Rejected(
                    RepositoryRejectReason.INVALID_DIGEST,
                    f"PUT by digest {command.reference[:150]!r}, but the manifest's digest is "
                    f"{command.digest}",
                )
        else:
            _check_tag(command.reference)
        body = command.body
        actual = await _off_loop(body, lambda: hashlib.new(claimed.algorithm, body).hexdigest())
        if actual != claimed.hex:
            raise Rejected(
                RepositoryRejectReason.INVALID_DIGEST,
                f"the manifest's bytes have {claimed.algorithm}:{actual}, not {command.digest}",
            )
        try:
            manifest = await _off_loop(body, lambda: parse_manifest(body, command.media_type))
        except ManifestInvalid as error:
            raise Rejected(RepositoryRejectReason.MANIFEST_INVALID, str(error)) from None
        # Content addressed, so writing it again (a replay, another repository) changes nothing;
        # written before any state names it, and after the hold that tells the collector a
        # ManifestStored is on its way (it restores a copy it deleted under a hold).
        key = manifest_key(command.digest)
        await hold_manifest(self.store, command.digest, command.command_id, key)
        await self.store.put(key, body)
        return replace(
            decision,
            media_type=manifest.media_type,
            subject=manifest.subject.digest if manifest.subject else None,
            artifact_type=manifest.artifact_type,
            previous_digest=None
            if is_digest(command.reference)
            else state.tags.get(command.reference),
        )

    async def _mount(self, command: MountBlob, decision: Decision) -> Decision:
        _check_digest(command.digest)
        if command.source_repository is not None:
            try:
                check_repository(command.source_repository)
            except InvalidName as error:
                raise Rejected(RepositoryRejectReason.INVALID_REPOSITORY, str(error)) from None
        blob = None
        first = await read_blob_pointer(self.store, command.digest)
        if first is not None:
            # The hold first, then the pointer again (resolve_blob reads it and checks the copy
            # is there): a collector that withdrew the pointer before is seen here, one that
            # withdraws it after finds the hold.
            await hold_blob(
                self.store, command.digest, HoldCause.MOUNT, command.command_id, first.object_key
            )
            blob = await resolve_blob(self.store, command.digest)
        if blob is None:
            raise Rejected(
                RepositoryRejectReason.BLOB_UNKNOWN, f"no committed blob {command.digest}"
            )
        await self.checkpoint(Step.WORKER_MOUNT_RESOLVED, command.digest)
        return replace(
            decision,
            size=blob.size or 0,
            object_key=blob.object_key,
            blob_sha256=blob.blob_sha256 or "",
        )

    def _next_state(
        self,
        command: RepositoryCommand,
        state: RepositoryState,
        decision: Decision,
        outputs: list[Output],
    ) -> RepositoryState:
        ledger = (*state.ledger, decision)[-LEDGER_LENGTH:]
        if decision.reason:
            return replace(state, ledger=ledger)  # rejected: only the ledger changes
        tags, manifests = state.tags, state.manifests
        if isinstance(command, PutManifest):
            manifests = manifests | {command.digest}
            if not is_digest(command.reference):
                tags = {**tags, command.reference: command.digest}
        elif isinstance(command, DeleteManifest):
            manifests = manifests - {command.digest}
            tags = {t: d for t, d in tags.items() if d != command.digest}
        elif isinstance(command, DeleteTag):
            tags = {t: d for t, d in tags.items() if t != command.tag}
        return replace(
            state,
            tags=tags,
            manifests=manifests,
            chain_head=event_hash(outputs[-1].value),
            ledger=ledger,
        )

    def failed(self, command: RepositoryCommand, record: ConsumerRecord, detail: str) -> Output:
        """A rejection for a command the worker failed on, so its waiter is not left waiting."""
        decision = self._stateless(command, record, detail, RepositoryRejectReason.HANDLER_ERROR)
        return self._outputs(command, decision)[0]

    # Events

    def _outputs(self, command: RepositoryCommand, decision: Decision) -> list[Output]:
        """The command's events, encoded, each chained to the one before it."""
        key = command.repository.encode()
        if decision.reason:
            rejected = RepositoryCommandRejected(
                event_id=derived_id(command.command_id, "RepositoryCommandRejected"),
                repository=command.repository,
                caused_by=command.command_id,
                occurred_at=at_ms(decision.at_ms),
                command_type=type(command).__name__,
                reason=decision.reason,
                detail=decision.detail,
                # A refused authority names nobody: the subject is only what the record claims.
                actor=None
                if decision.reason == RepositoryRejectReason.UNAUTHORIZED
                else command.subject,
            )
            return [Output(self.settings.events_topic, key, CODEC.encode(rejected))]
        outputs = []
        head = decision.prev_hash
        for event in _events(command, decision):
            encoded = CODEC.encode(replace(event, prev_hash=head))
            head = event_hash(encoded)
            outputs.append(Output(self.settings.events_topic, key, encoded))
        return outputs


def _events(command: RepositoryCommand, decision: Decision) -> list[RepositoryEvent]:
    """The events of an applied command, not yet chained."""

    def common(kind: str) -> dict[str, Any]:
        return {
            "event_id": derived_id(command.command_id, kind),
            "repository": command.repository,
            "caused_by": command.command_id,
            "occurred_at": at_ms(decision.at_ms),
            "actor": command.subject,
        }

    if isinstance(command, PutManifest):
        events: list[RepositoryEvent] = [
            ManifestStored(
                **common("ManifestStored"),
                digest=command.digest,
                media_type=decision.media_type,
                size=len(command.body),
                body=command.body,
                object_key=manifest_key(command.digest),
                subject=decision.subject,
                artifact_type=decision.artifact_type,
            )
        ]
        if not is_digest(command.reference):
            events.append(
                TagMoved(
                    **common("TagMoved"),
                    tag=command.reference,
                    digest=command.digest,
                    previous_digest=decision.previous_digest,
                )
            )
        return events
    if isinstance(command, DeleteManifest):
        return [
            *(
                TagDeleted(**common(f"TagDeleted:{tag}"), tag=tag, previous_digest=command.digest)
                for tag in decision.tags
            ),
            ManifestDeleted(**common("ManifestDeleted"), digest=command.digest),
        ]
    if isinstance(command, DeleteTag):
        assert decision.previous_digest is not None
        return [
            TagDeleted(
                **common("TagDeleted"), tag=command.tag, previous_digest=decision.previous_digest
            )
        ]
    if isinstance(command, MountBlob):
        return [
            BlobMounted(
                **common("BlobMounted"),
                digest=command.digest,
                source_repository=command.source_repository,
                size=decision.size,
                object_key=decision.object_key,
                blob_sha256=decision.blob_sha256,
            )
        ]
    assert isinstance(command, UnlinkBlob)
    return [BlobUnlinked(**common("BlobUnlinked"), digest=command.digest)]


def _check_digest(digest: str) -> OciDigest:
    try:
        return parse_oci_digest(digest)
    except InvalidReference as error:
        raise Rejected(RepositoryRejectReason.INVALID_DIGEST, str(error)) from None


def _check_tag(tag: str) -> None:
    try:
        check_tag(tag)
    except InvalidReference as error:
        raise Rejected(RepositoryRejectReason.INVALID_REFERENCE, str(error)) from None


async def _off_loop(body: bytes, work: Callable[[], T]) -> T:
    # hashlib and json work through megabytes for a large manifest: a thread keeps the loop free.
    if len(body) < INLINE_BYTES:
        return work()
    return await asyncio.to_thread(work)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(key: bytes | None) -> str | None:
    return None if key is None else key[:100].decode("utf-8", errors="replace")
