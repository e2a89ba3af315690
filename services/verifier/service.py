"""The verifier: on UploadFinished, checks the staged bytes and publishes the verdict.

LayerCommitted makes the layer visible under its digest, and a BlobLinked in the same transaction,
keyed by the repository, links it into the repository; LayerValidationFailed removes the staged
bytes. The verdict is stored (verdicts/<uuid>.json) before it is published, so a verifier that
crashes between the two publishes the same verdict when the event is replayed.

Deduplicating against the garbage collector (services/gc): a push of known bytes is pointed at
the digest's first copy, which the collector may be reclaiming at that very moment. So before
the verifier trusts the pointer it leaves a hold (services/core/holds.py) and reads the pointer
again: the collector withdraws the pointer before it reads the holds, so either this second read
finds the pointer gone (the push keeps its own copy and claims a fresh pointer) or the collector
finds the hold and keeps the copy until this upload's verdict is in the log. A replayed verdict
(stored before a crash) that names a copy which is gone anyway (an operator removed it) is never
published as it is: it falls back to the upload's own copy while that is still there, and fails
with MISSING_DATA otherwise, rather than link bytes that do not exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from aiokafka.structs import ConsumerRecord

from services.core import kafka, metrics, objectstore
from services.core.checkpoints import Checkpoint, Step, passing
from services.core.codec import CODEC, DecodeError, event_hash
from services.core.holds import HoldCause, hold_blob
from services.core.layout import BlobPointer
from services.core.objectstore import ObjectNotFound, ObjectStore
from services.core.principals import Principal
from services.core.processor import Output, Processor, dead_letter
from services.core.records import (
    BlobLinked,
    DeadLetterReason,
    Event,
    FailureReason,
    LayerCommitted,
    LayerValidationFailed,
    UploadFinished,
    at_ms,
    derived_id,
)
from services.core.settings import Settings
from services.verifier.verdicts import Judge, Verdict, failed, verdict_key

log = logging.getLogger(__name__)

# Layers up to this size are judged while the stored-verdict lookup is in flight.
OVERLAP_BYTES = 1 << 20


def group_id(settings: Settings) -> str:
    return kafka.verifier_group(settings)


class Verifier:
    def __init__(
        self, settings: Settings, store: ObjectStore, checkpoint: Checkpoint = passing
    ) -> None:
        self.settings = settings
        self.store = store
        self.judge = Judge(store)
        self.checkpoint = checkpoint  # where a test may stop it (services/core/checkpoints.py)

    async def handle(self, record: ConsumerRecord) -> list[Output]:
        try:
            event = CODEC.decode(record.value or b"")
        except DecodeError as error:
            # Not ours to fix: the events topic is written by the services; keep it visible.
            return [self.dead_letter(record, error.reason, error.detail)]
        if not isinstance(event, UploadFinished):
            return []
        verdict = await self.decide(event, f"{record.partition}@{record.offset}")
        if verdict is None:
            return []
        # The verdict continues the upload's hash chain from the UploadFinished it answers.
        published = self.verdict_event(event, verdict, event_hash(record.value or b""))
        topic = self.settings.events_topic
        outputs = [Output(topic, event.upload_id.encode(), CODEC.encode(published))]
        if isinstance(published, LayerCommitted):
            # In the same transaction, keyed by the repository: the link lands in the partition
            # of the repository's unlinks and mounts, so the log orders them, not the clocks.
            link = linked(published)
            outputs.append(Output(topic, event.repository.encode(), CODEC.encode(link)))
        return outputs

    async def decide(self, event: UploadFinished, source: str) -> Verdict | None:
        """The verdict to publish for this record, or None if another record got it already."""
        key = verdict_key(event.upload_id)
        first_copy: str | None = None  # the pointer's object as first read
        if event.staged_size <= OVERLAP_BYTES:
            # A small layer's check is a few round trips: asking at once whether a verdict is
            # stored and where the digest's first copy is saves two; a judgement made for
            # nothing (a replayed record) costs little.
            stored, judged, first_copy = await asyncio.gather(
                self._stored(key), self._judge(event), self.judge.first_copy(event.digest)
            )
        else:
            stored, judged = await self._stored(key), None
        if stored is not None and stored.source != source:
            return None  # one upload, one verdict: this UploadFinished is a second copy
        own_copy = event.staging_key
        verdict = stored
        if verdict is not None:
            verdict = await self._still_there(event, verdict)
        if verdict is None:
            verdict = judged or await self._judge(event)
            claim = False
            if verdict.committed:
                if judged is None:
                    first_copy = await self.judge.first_copy(event.digest)
                verdict = await self._one_copy(event, verdict, first_copy)
                claim = verdict.object_key == own_copy != first_copy
            verdict = replace(verdict, source=source, at_ms=time.time_ns() // 1_000_000)
            # The verdict is the commit point, so a crash between the two writes leaves at
            # worst no pointer: a later upload of the digest then keeps a copy of its own.
            await self._store(event, verdict, claim)
        await self.checkpoint(Step.VERIFIER_VERDICT_STORED, event.digest)
        if not verdict.committed:
            await self.store.delete_prefix(f"uploads/{event.upload_id}/")
        elif verdict.object_key != own_copy:
            # Only once the verdict is stored: a replay judges nothing again, so it never finds
            # these bytes gone. The copy the verdict names outlives the publication: this
            # upload's hold keeps the collector away from it until the verdict is in the log.
            await self.store.delete(own_copy)
        await self.checkpoint(Step.VERIFIER_DECIDED, event.digest)
        return verdict

    async def _store(self, event: UploadFinished, verdict: Verdict, claim: bool) -> None:
        writes = [self.store.put(verdict_key(event.upload_id), verdict.to_json())]
        if claim:
            pointer = BlobPointer(event.staging_key, event.size, verdict.blob_sha256)
            writes.append(self.judge.claim(event.digest, pointer))
        await asyncio.gather(*writes)

    async def _one_copy(
        self, event: UploadFinished, verdict: Verdict, first_copy: str | None
    ) -> Verdict:
        """The copy a committed verdict names: the digest's first copy when there is one that
        the collector cannot take away meanwhile, else the upload's own."""
        if first_copy is None or first_copy == verdict.object_key:
            return verdict
        await self.checkpoint(Step.VERIFIER_POINTER_READ, event.digest)
        # The hold first, then the pointer again: a collector that withdrew the pointer before
        # this second read is seen here (no pointer, or a fresh one); one that withdraws it
        # after finds the hold. Either way the copy named below outlives this upload's link.
        await hold_blob(self.store, event.digest, HoldCause.UPLOAD, event.upload_id, first_copy)
        current = await self.judge.first_copy(event.digest)
        chosen = await self.judge.keep_one_copy(verdict, current)
        await self.checkpoint(Step.VERIFIER_COPY_CHOSEN, event.digest)
        return chosen

    async def _still_there(self, event: UploadFinished, stored: Verdict) -> Verdict:
        """A stored verdict, as a replay may publish it: never naming bytes that are gone.

        The collector does not take a held copy, so a verdict stored by this version names a
        copy that is still there; one an operator removed, or a verdict stored before holds
        existed, falls back to the upload's own copy while it is there (its bytes are the ones
        judged), and otherwise fails the upload instead of linking nothing."""
        if not stored.committed or stored.object_key == event.staging_key:
            return stored
        try:
            await self.store.stat(stored.object_key)
            return stored
        except ObjectNotFound:
            pass
        try:
            await self.store.stat(event.staging_key)
            kept = replace(stored, object_key=event.staging_key)
            claim = True
        except ObjectNotFound:
            kept = replace(
                failed(
                    FailureReason.MISSING_DATA,
                    event.digest,
                    "",
                    "the stored copy this upload was deduplicated onto is gone, and so is its own",
                ),
                source=stored.source,
                at_ms=stored.at_ms,
            )
            claim = False
        log.warning(
            "verifier: the copy %s that upload %s's stored verdict names is gone; publishing %s",
            stored.object_key,
            event.upload_id,
            kept.object_key or kept.reason,
        )
        await self._store(event, kept, claim)
        return kept

    async def _judge(self, event: UploadFinished) -> Verdict:
        return await self.judge.judge(
            event.staging_key, event.size, event.staged_size, event.digest, event.content_sha256
        )

    async def _stored(self, key: str) -> Verdict | None:
        try:
            return Verdict.from_json(await self.store.get(key))
        except ObjectNotFound:
            return None

    def verdict_event(self, event: UploadFinished, verdict: Verdict, prev_hash: str) -> Event:
        common = {
            "upload_id": event.upload_id,
            "repository": event.repository,
            "caused_by": event.caused_by,
            "occurred_at": at_ms(verdict.at_ms),
            "prev_hash": prev_hash,
            # The upload's pusher, as its UploadFinished says: the verifier acts for them.
            "actor": event.actor,
        }
        if verdict.committed:
            return LayerCommitted(
                event_id=derived_id(event.event_id, "LayerCommitted"),
                digest=event.digest,
                size=event.size,
                object_key=verdict.object_key,
                committed_at=at_ms(verdict.at_ms),
                blob_sha256=verdict.blob_sha256,
                **common,  # type: ignore[arg-type]
            )
        return LayerValidationFailed(
            event_id=derived_id(event.event_id, "LayerValidationFailed"),
            reason=verdict.reason,
            expected=verdict.expected,
            actual=verdict.actual,
            detail=verdict.detail,
            **common,  # type: ignore[arg-type]
        )

    def dead_letter(self, record: ConsumerRecord, reason: str, detail: str) -> Output:
        return dead_letter(self.settings.dead_letter_topic, record, reason, detail)

    def on_error(self, record: ConsumerRecord, error: Exception) -> list[Output]:
        return [self.dead_letter(record, DeadLetterReason.HANDLER_ERROR, repr(error))]


# What a BlobLinked repeats of its LayerCommitted, field for field.
_LINK_FIELDS = (
    "repository",
    "caused_by",
    "occurred_at",
    "digest",
    "size",
    "object_key",
    "blob_sha256",
    "upload_id",
    "actor",
)


def linked(committed: LayerCommitted) -> BlobLinked:
    """The repository's side of a commit. Every field comes from the LayerCommitted, itself made
    from the stored verdict, so a replayed batch publishes the very same bytes. Outside the
    repository's chain (prev_hash None): the verifier holds no repository state."""
    return BlobLinked(
        event_id=derived_id(committed.event_id, "BlobLinked"),
        **{name: getattr(committed, name) for name in _LINK_FIELDS},
    )


async def run(settings: Settings, stop: asyncio.Event, checkpoint: Checkpoint = passing) -> None:
    verifier = Verifier(settings, ObjectStore(settings), checkpoint)
    processor = Processor(
        settings,
        name="verifier",
        principal=Principal.VERIFIER,
        input_topic=settings.events_topic,
        group_id=group_id(settings),
        handle=verifier.handle,
        is_transient=objectstore.is_transient,
        on_error=verifier.on_error,
    )
    stop_metrics = metrics.serve(settings.verifier_metrics_listen, "verifier")
    try:
        await processor.run(stop)
    finally:
        stop_metrics()
