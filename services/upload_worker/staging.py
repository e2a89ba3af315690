"""The staging area: where an upload's bytes wait in object storage until it is finished.

Layout in the bucket, per upload:
  upload-state/<uuid>.json        the upload's state; writing it is the commit point of every step
  uploads/<uuid>/pending/<offset>  chunks not yet part of a multipart part (S3 parts are >= 5 MiB)
  uploads/<uuid>/data              the assembled layer: a multipart upload, created with the first
                                   5 MiB part, or for a smaller layer one PUT of its pending bytes

A chunk is durable once its bytes are in a pending object or a part *and* the state names them.
A crash between the two leaves bytes the state does not name; the redelivered command writes them
again under the same key or part number, so replaying changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field, replace

from services.core.objectstore import ObjectNotFound, ObjectStore, StagedPart

LEDGER_LENGTH = 64  # redeliveries replay the last few commands; older chunks are not kept


class Status:
    OPEN = "open"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(frozen=True)
class ChunkRecord:
    offset: int
    length: int
    sha256: str
    command_id: str
    durable_after: int
    source: str = ""  # partition@offset of the command record that applied it
    at_ms: int = 0  # when its ChunkAppended happened, so a replay publishes the same bytes
    prev_hash: str | None = None  # the chain head its ChunkAppended linked to


@dataclass(frozen=True)
class PendingChunk:
    offset: int
    length: int
    key: str


@dataclass(frozen=True)
class UploadState:
    upload_id: str
    repository: str
    status: str
    multipart_id: str  # "" until the first part is staged
    started_by: str
    created_ms: int
    updated_ms: int
    parts: tuple[StagedPart, ...] = ()
    pending: tuple[PendingChunk, ...] = ()
    ledger: tuple[ChunkRecord, ...] = ()
    closed_by: str | None = None
    started_from: str = ""  # partition@offset of the StartUpload record
    closed_from: str = ""  # partition@offset of the record that closed the upload
    finish: dict[str, object] = field(default_factory=dict)
    closing: dict[str, object] = field(default_factory=dict)  # what the close event said
    chain_head: str | None = None  # hash of the upload's last chained event

    @property
    def staging_key(self) -> str:
        return staging_key(self.upload_id)

    @property
    def durable_offset(self) -> int:
        return sum(p.size for p in self.parts) + sum(c.length for c in self.pending)

    @property
    def pending_bytes(self) -> int:
        return sum(c.length for c in self.pending)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> UploadState:
        raw = json.loads(data)
        raw["parts"] = tuple(StagedPart(**p) for p in raw["parts"])
        raw["pending"] = tuple(PendingChunk(**c) for c in raw["pending"])
        raw["ledger"] = tuple(ChunkRecord(**c) for c in raw["ledger"])
        return cls(**raw)


def staging_key(upload_id: str) -> str:
    return f"uploads/{upload_id}/data"


STATE_PREFIX = "upload-state/"


def state_key(upload_id: str) -> str:
    return f"{STATE_PREFIX}{upload_id}.json"


class StagingArea:
    def __init__(self, store: ObjectStore, part_size: int) -> None:
        self.store = store
        self.part_size = part_size

    async def load(self, upload_id: str) -> UploadState | None:
        try:
            return UploadState.from_json(await self.store.get(state_key(upload_id)))
        except ObjectNotFound:
            return None

    async def save(self, state: UploadState) -> None:
        await self.store.put(state_key(state.upload_id), state.to_json())

    async def start(
        self,
        upload_id: str,
        repository: str,
        command_id: str,
        source: str,
        now_ms: int,
        chain_head: str,
    ) -> UploadState:
        # No multipart upload yet: most layers are small enough for one PUT at finish, and the
        # start of an upload is then a single write.
        state = UploadState(
            upload_id=upload_id,
            repository=repository,
            status=Status.OPEN,
            multipart_id="",
            started_by=command_id,
            started_from=source,
            created_ms=now_ms,
            updated_ms=now_ms,
            chain_head=chain_head,
        )
        await self.save(state)
        return state

    async def append(
        self, state: UploadState, data: bytes, record: ChunkRecord, chain_head: str
    ) -> UploadState:
        """Makes data (which starts at state.durable_offset) durable; returns the saved state."""
        offset = state.durable_offset
        if state.pending_bytes + len(data) < self.part_size:
            key = f"uploads/{state.upload_id}/pending/{offset:020d}"
            await self.store.put(key, data)
            parts, pending = state.parts, (*state.pending, PendingChunk(offset, len(data), key))
            obsolete: tuple[PendingChunk, ...] = ()
        else:
            body = await self._pending_data(state) + data
            state = replace(state, multipart_id=await self._multipart_id(state))
            part = await self.store.put_part(
                state.staging_key, state.multipart_id, len(state.parts) + 1, body
            )
            parts, pending, obsolete = (*state.parts, part), (), state.pending
        updated = replace(
            state,
            parts=parts,
            pending=pending,
            ledger=(*state.ledger, record)[-LEDGER_LENGTH:],
            updated_ms=record.at_ms,
            chain_head=chain_head,
        )
        await self.save(updated)
        await self._delete_pending(obsolete)
        return updated

    async def finish(
        self, state: UploadState, finish: dict[str, object], chain_head: str
    ) -> UploadState:
        """Assembles the staged bytes into state.staging_key and marks the upload finished."""
        parts = state.parts
        try:
            if not parts:
                # Smaller than one part: the layer is its pending chunks, written in one PUT.
                await self.store.put(state.staging_key, await self._pending_data(state))
                if state.multipart_id:  # states written before multipart uploads were lazy
                    await self.store.abort_multipart(state.staging_key, state.multipart_id)
            else:
                if state.pending:
                    # The last part of a multipart upload may be smaller than the minimum.
                    tail = await self._pending_data(state)
                    number = len(parts) + 1
                    parts = (
                        *parts,
                        await self.store.put_part(
                            state.staging_key, state.multipart_id, number, tail
                        ),
                    )
                await self.store.complete_multipart(
                    state.staging_key, state.multipart_id, list(parts)
                )
        except ObjectNotFound:
            # The run that crashed before saving the state had completed the upload already;
            # stat raises ObjectNotFound again if the assembled object is not there either.
            await self.store.stat(state.staging_key)
        finished = replace(
            state,
            status=Status.FINISHED,
            parts=parts,
            pending=(),
            closed_by=str(finish["command_id"]),
            closed_from=str(finish["source"]),
            finish=finish,
            updated_ms=int(finish["at_ms"]),  # type: ignore[call-overload]
            chain_head=chain_head,
        )
        await self.save(finished)
        await self._delete_pending(state.pending)
        return finished

    async def discard(
        self,
        state: UploadState,
        status: str,
        command_id: str,
        source: str,
        closing: dict[str, object],
        chain_head: str,
    ) -> UploadState:
        """Removes every staged byte of an open upload; the state stays as a tombstone."""
        closed = replace(
            state,
            status=status,
            parts=(),
            pending=(),
            closed_by=command_id,
            closed_from=source,
            closing=closing,
            updated_ms=int(closing["at_ms"]),  # type: ignore[call-overload]
            chain_head=chain_head,
        )
        # The tombstone is saved first: once it says closed, no append can stage bytes again.
        await self.save(closed)
        for multipart_id in await self._multipart_ids(state):
            await self.store.abort_multipart(state.staging_key, multipart_id)
        await self.store.delete_prefix(f"uploads/{state.upload_id}/")
        return closed

    async def _multipart_ids(self, state: UploadState) -> set[str]:
        """The upload's multipart uploads: the state's, and one a crash kept it from naming."""
        key = state.staging_key
        found = {mp for k, mp in await self.store.multipart_uploads(key) if k == key}
        return found | {state.multipart_id} - {""}

    async def _multipart_id(self, state: UploadState) -> str:
        if state.multipart_id:
            return state.multipart_id
        # A crash after creating the multipart upload but before saving the state would leak
        # it; the redelivered command finds and adopts it instead of creating another.
        existing = await self._multipart_ids(state)
        return min(existing) if existing else await self.store.start_multipart(state.staging_key)

    async def _pending_data(self, state: UploadState) -> bytes:
        pieces = await asyncio.gather(*(self.store.get(c.key) for c in state.pending))
        return b"".join(pieces)

    async def _delete_pending(self, chunks: tuple[PendingChunk, ...]) -> None:
        await asyncio.gather(*(self.store.delete(c.key) for c in chunks))
