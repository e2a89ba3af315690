"""The staging area: where an upload's bytes wait in object storage until it is finished.

Layout in the bucket, per upload:
  upload-state/<uuid>.json        the upload's state; writing it is the commit point of its steps
  uploads/<uuid>/pending/<offset>  chunks not yet part of a multipart part (S3 parts are >= 5 MiB)
  uploads/<uuid>/data              the assembled layer: a multipart upload, created with the first
                                   5 MiB part, or for a smaller layer one PUT of its pending bytes

The upload worker applies a batch of commands, then save()s once before it publishes the batch's
events: each touched upload's state is written once, and the small chunks applied since the last
save are merged into one pending object per upload. A chunk is durable once its bytes are in a
pending object or a part *and* a saved state names them. A crash before save() leaves at most
bytes no state names; the batch's commands were not committed, so they are applied again and
write the same keys and part numbers again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

from services.core.objectstore import S3_MAX_PARTS, ObjectNotFound, ObjectStore, StagedPart

# A batch whose events did not commit is applied again, and each of its chunks is recognised
# by its ledger entry: the ledger must hold more chunks than a batch (the worker's max_records).
LEDGER_LENGTH = 256


class Status(StrEnum):  # each member is the string stored in upload-state/<uuid>.json
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
class Finish:
    """What the FinishUpload that finished the upload said, so a replay publishes it again."""

    command_id: str
    source: str  # partition@offset of the FinishUpload record
    size: int
    digest: str
    staged_size: int
    at_ms: int
    prev_hash: str | None = None
    content_sha256: str | None = None  # what the UploadFinished says of the staged bytes


@dataclass(frozen=True)
class Closing:
    """What the UploadCancelled or UploadExpired that closed the upload said."""

    at_ms: int
    prev_hash: str | None
    durable_offset: int
    idle_seconds: int = 0


def _optional(cls: type[Any], raw: dict[str, Any] | None) -> Any:
    # States written before these were dataclasses store {} for "none yet".
    return cls(**raw) if raw else None


@dataclass(frozen=True)
class UploadState:
    upload_id: str
    repository: str
    status: Status
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
    finish: Finish | None = None
    closing: Closing | None = None
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
        raw["status"] = Status(raw["status"])
        raw["finish"] = _optional(Finish, raw.get("finish"))
        raw["closing"] = _optional(Closing, raw.get("closing"))
        return cls(**raw)


Removal = Callable[[], Awaitable[None]]


def staging_key(upload_id: str) -> str:
    return f"uploads/{upload_id}/data"


STATE_PREFIX = "upload-state/"


def state_key(upload_id: str) -> str:
    return f"{STATE_PREFIX}{upload_id}.json"


class StagingArea:
    """Stages chunks; the states the verbs return are written by save(), once per batch.

    Until then the changes live here: the states, the bytes of small chunks not written yet, and
    removals that must wait until no saved state names what they remove.
    """

    def __init__(self, store: ObjectStore, part_size: int, max_parts: int = S3_MAX_PARTS) -> None:
        self.store = store
        self.part_size = part_size
        self.max_parts = max_parts  # a parameter so tests can reach the limit with a few parts
        self.unsaved: dict[str, UploadState] = {}  # by upload id
        self.unwritten: dict[str, list[bytes]] = {}  # pending key -> its bytes, in pieces
        self.removals: dict[str, list[Removal]] = {}  # by upload id: run after its save

    async def load(self, upload_id: str) -> UploadState | None:
        if upload_id in self.unsaved:
            return self.unsaved[upload_id]
        try:
            return UploadState.from_json(await self.store.get(state_key(upload_id)))
        except ObjectNotFound:
            return None

    def start(
        self,
        upload_id: str,
        repository: str,
        command_id: str,
        source: str,
        now_ms: int,
        chain_head: str,
    ) -> UploadState:
        # No multipart upload yet: most layers are small enough for one PUT at finish.
        return self._changed(
            UploadState(
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
        )

    def has_room(self, state: UploadState) -> bool:
        """Whether one more chunk fits in the layer's multipart upload.

        A chunk either joins the pending bytes (which finish() makes one last part) or turns them
        into the next part; either way the layer then needs len(parts) + 1 parts. Each staged
        part holds at least part_size bytes, so max_parts * part_size bytes always fit."""
        return len(state.parts) < self.max_parts

    @property
    def largest_layer(self) -> int:
        """Bytes that always fit in one layer."""
        return self.max_parts * self.part_size

    async def append(
        self, state: UploadState, data: bytes, record: ChunkRecord, chain_head: str
    ) -> UploadState:
        """Stages data, which starts at state.durable_offset; durable once saved."""
        offset = state.durable_offset
        parts, pending = state.parts, state.pending
        if state.pending_bytes + len(data) < self.part_size:
            last = pending[-1] if pending else None
            if last is not None and last.key in self.unwritten:
                # Chunks applied since the last save share one pending object.
                self.unwritten[last.key].append(data)
                merged = PendingChunk(last.offset, last.length + len(data), last.key)
                pending = (*pending[:-1], merged)
            else:
                key = f"uploads/{state.upload_id}/pending/{offset:020d}"
                self.unwritten[key] = [data]
                pending = (*pending, PendingChunk(offset, len(data), key))
        else:
            body = await self._pending_data(state) + data
            state = replace(state, multipart_id=await self._multipart_id(state))
            part = await self.store.put_part(
                state.staging_key, state.multipart_id, len(parts) + 1, body
            )
            self._obsolete(state, pending)
            parts, pending = (*parts, part), ()
        return self._changed(
            replace(
                state,
                parts=parts,
                pending=pending,
                ledger=(*state.ledger, record)[-LEDGER_LENGTH:],
                updated_ms=record.at_ms,
                chain_head=chain_head,
            )
        )

    async def finish(self, state: UploadState, finish: Finish, chain_head: str) -> UploadState:
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
                # Completing cannot be undone: the parts this batch staged are saved first, so
                # that a replay of the batch finds them in the state instead of uploading parts
                # to a multipart upload that is gone.
                if state.upload_id in self.unsaved:
                    await self._save_one(state.upload_id)
                await self.store.complete_multipart(
                    state.staging_key, state.multipart_id, list(parts)
                )
        except ObjectNotFound:
            # The run that crashed before saving the state had completed the upload already;
            # stat raises ObjectNotFound again if the assembled object is not there either.
            await self.store.stat(state.staging_key)
        self._obsolete(state, state.pending)
        return self._changed(
            replace(
                state,
                status=Status.FINISHED,
                parts=parts,
                pending=(),
                closed_by=finish.command_id,
                closed_from=finish.source,
                finish=finish,
                updated_ms=finish.at_ms,
                chain_head=chain_head,
            )
        )

    def discard(
        self,
        state: UploadState,
        status: Status,
        command_id: str,
        source: str,
        closing: Closing,
        chain_head: str,
    ) -> UploadState:
        """Closes an open upload; every staged byte is removed once the closed state is saved,
        so no later append can stage bytes again in between."""
        for chunk in state.pending:
            self.unwritten.pop(chunk.key, None)
        self.removals.setdefault(state.upload_id, []).append(lambda: self._remove_all(state))
        return self._changed(
            replace(
                state,
                status=status,
                parts=(),
                pending=(),
                closed_by=command_id,
                closed_from=source,
                closing=closing,
                updated_ms=closing.at_ms,
                chain_head=chain_head,
            )
        )

    async def save(self, upload_ids: Iterable[str]) -> None:
        """Writes the uploads' unwritten chunks and states, then runs their removals.

        Safe to call again after a failure: what was written is not written twice."""
        ids = list(upload_ids)
        await _all(self._save_one(u) for u in ids if u in self.unsaved)
        await _all(self._remove(u) for u in ids if u in self.removals)

    def drop(self, upload_ids: Iterable[str]) -> None:
        """Forgets the uploads' unsaved changes: their commands are about to be applied again."""
        for upload_id in upload_ids:
            self.unsaved.pop(upload_id, None)
            self.removals.pop(upload_id, None)
            prefix = f"uploads/{upload_id}/"
            for key in [k for k in self.unwritten if k.startswith(prefix)]:
                del self.unwritten[key]

    async def _save_one(self, upload_id: str) -> None:
        state = self.unsaved[upload_id]
        for chunk in state.pending:
            pieces = self.unwritten.get(chunk.key)
            if pieces is not None:
                await self.store.put(chunk.key, b"".join(pieces))
                self.unwritten.pop(chunk.key, None)
        await self.store.put(state_key(upload_id), state.to_json())
        if self.unsaved.get(upload_id) is state:
            del self.unsaved[upload_id]

    async def _remove(self, upload_id: str) -> None:
        removals = self.removals[upload_id]
        while removals:
            await removals[0]()
            removals.pop(0)  # only once done: a failed removal is tried again by the next save
        del self.removals[upload_id]

    def _changed(self, state: UploadState) -> UploadState:
        self.unsaved[state.upload_id] = state
        return state

    def _obsolete(self, state: UploadState, chunks: tuple[PendingChunk, ...]) -> None:
        """These pending chunks are in a part or the assembled layer now."""
        written = [c.key for c in chunks if self.unwritten.pop(c.key, None) is None]
        if written:
            self.removals.setdefault(state.upload_id, []).append(lambda: self._delete_keys(written))

    async def _remove_all(self, state: UploadState) -> None:
        for multipart_id in await self._multipart_ids(state):
            await self.store.abort_multipart(state.staging_key, multipart_id)
        await self.store.delete_prefix(f"uploads/{state.upload_id}/")

    async def _delete_keys(self, keys: list[str]) -> None:
        await asyncio.gather(*(self.store.delete(key) for key in keys))

    async def _multipart_ids(self, state: UploadState) -> set[str]:
        """The upload's multipart uploads: the state's, and one a crash kept it from naming."""
        key = state.staging_key
        found = {mp for k, mp in await self.store.multipart_uploads(key) if k == key}
        return found | {state.multipart_id} - {""}

    async def _multipart_id(self, state: UploadState) -> str:
        if state.multipart_id:
            return state.multipart_id
        # A crash after creating the multipart upload but before saving the state would leak
        # it; the command applied again finds and adopts it instead of creating another.
        existing = await self._multipart_ids(state)
        return min(existing) if existing else await self.store.start_multipart(state.staging_key)

    async def _pending_data(self, state: UploadState) -> bytes:
        async def data(chunk: PendingChunk) -> bytes:
            pieces = self.unwritten.get(chunk.key)
            return b"".join(pieces) if pieces is not None else await self.store.get(chunk.key)

        return b"".join(await asyncio.gather(*(data(c) for c in state.pending)))


async def _all(steps: Iterable[Awaitable[None]]) -> None:
    """Runs the steps at once and raises the first failure only when every one has ended: none
    may still be writing when the caller retries or abandons the batch."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
