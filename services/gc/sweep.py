"""One sweep of the garbage collector, in four phases a test can also run one at a time.

Who may start to rely on a stored copy K of a digest D, and how
----------------------------------------------------------------
Only three readers ever pick an existing copy; everything else reads through an index, which
never serves a reclaimed copy (services/query/index.py: blob()).

- dedupe (the verifier): reads D's blobs/ pointer (P1); when it names K, writes the hold
  gc-holds/blobs/D/upload-U, reads the pointer again (P2) and checks the object P2 names is
  there; its verdict names that object, or the upload's own copy when P2 is gone (then it claims
  a fresh pointer naming its own copy). It stores the verdict, deletes its own copy if it points
  at another, and publishes LayerCommitted + BlobLinked in one transaction.
- mount (the upload worker's MountBlob): reads the pointer; when there is one, writes the hold
  gc-holds/blobs/D/mount-C, reads it again and checks the object (resolve_blob), decides, and
  publishes BlobMounted (or BLOB_UNKNOWN, and the registry falls back to an upload).
- manifest PUT (the upload worker's PutManifest): writes gc-holds/manifests/M/put-C, then the
  copy manifests/M, then publishes ManifestStored.

A pointer is only ever written by a claim, and a claim names the claiming upload's own staged
copy, which no committed event names yet: nothing but a reader's claim brings a withdrawn
pointer back, and never pointing at a copy the log already named.

The sweep
---------
1. mark: catch the index up to the log's end (cut A). A copy K of D is a candidate when no link
   names it, no repository's layers row serves it, it is not reclaimed yet, and D's links (link,
   unlink, commit) have not moved for LAYERLOG_GC_GRACE_SECONDS. UNLINKED when no repository has
   D; UNNAMED_COPY when one has it through another copy. A manifest no repository stores, idle
   as long, is one too (UNSTORED).
2. withdraw: where D's pointer names K, delete it. From here on a dedupe or a mount that reads
   the pointer cannot pick K.
3. check: list every hold. One whose cause's outcome is in the index (the upload's verdict, the
   command's outcome) is resolved and deleted; an active one keeps every candidate of its digest.
   Then catch the index up again (cut B, read after the listing) and keep K when D's links
   moved since A or something names K now (a racing push or mount landed). Read the pointer
   once more: a pointer naming K again (a claim written long after it was decided) is withdrawn
   again, and K kept.
4. reclaim: publish BlobReclaimed (ManifestReclaimed) in a transaction; only after it commits,
   delete the bytes. For a manifest, list its holds once more after the delete and write the
   copy back if there is one (the same bytes: the key is the content's digest).

Why no reader's link ever names deleted bytes
----------------------------------------------
Say a reader's link L names K and the sweep deletes K. If L committed before cut B's end offsets
were read, B holds L: K is named, or D's links moved since A (L is a link of D), and K is kept.
So L committed after that, and so after the holds were listed. The reader picked K from its
second pointer read P2 (P1 alone is never trusted). Had P2 come after the withdrawal it could not
name K (only a claim writes the pointer again, and a claim names a fresh copy), so P2 came
before it, the reader's hold before P2, and the listing after the withdrawal saw the hold. It
was not resolved, since that needs L (or the reader's refusal) in the index before the listing.
An active hold keeps K: contradiction. A verdict stored before a crash and published by the
replay later is covered by the same hold, which stays until that verdict is in the log. The
argument needs storage that shows every acknowledged write to a later read or list, as S3 (since
2020) and versitygw's posix backend do; it needs no clock and no waiting.

Every interleaving, and where tests/test_gc_race.py drives it on the real stack
--------------------------------------------------------------------------------
- push before the mark: K is named, no candidate (kept, nothing reclaimed).
- push linked between mark and check: D's links moved, kept as racing_link.
- dedupe read P1 before the withdrawal, hold and P2 after it: P2 finds no pointer, the push keeps
  its own copy and claims the pointer; K is reclaimed (or kept as racing_link when the push's
  link landed before B). Either way the push's bytes are its own copy.
- dedupe hold and P2 before the withdrawal, link after the listing: the hold keeps K; the push's
  link names K, which is there.
- dedupe verdict stored, not yet published (and the verifier killed there, then replayed): the
  hold keeps K through every sweep until the replayed verdict is in the log.
- a stored verdict whose copy is gone anyway (an operator removed it, which the collector never
  does under a hold): the replay publishes the upload's own copy while it is there, else fails
  the upload (MISSING_DATA); never a link to missing bytes.
- push after the withdrawal: no pointer, the push keeps its own copy; K goes now or, when the push
  landed before B, at the next sweep as an UNNAMED_COPY of a digest linked elsewhere.
- mount resolved (hold written) before the withdrawal, published after the listing: the hold
  keeps K. A mount after the withdrawal: BLOB_UNKNOWN, and the registry's POST ?mount= becomes an
  upload, as the distribution spec lets a registry answer. (The registry sends no mount for a
  digest no repository links: its index has no source to name.)
- manifest PUT whose hold was listed: kept. Whose hold came after the listing: its copy may land
  before the delete; the listing after the delete restores it. A sweep stopped in between: the
  next sweep writes back the copy of every reclaimed manifest a repository stores again.
- the collector stopped after publishing, before deleting: the next sweep finishes every reclaim
  its index has and its ledger does not (services/gc/ledger.py).
- two sweepers at once (the service and `layerlog gc`): the collector only ever deletes pointers,
  so neither creates a reference the other must see; one transactional id lets only the newest
  publish, and a fenced sweep deletes nothing.
- pulls: a copy the log says is reclaimed is 404 BLOB_UNKNOWN from every index; before that it
  served only repositories that had unlinked it, which answered 404 already.

What it does not cover: a pointer write delayed past the re-read in phase 3 (a verifier paused
for longer than the grace period between deciding a claim and writing it). A reader then finds
the object gone when it checks it, and keeps its own copy, unless the delete lands between its
check and its link: the grace period is the margin for that.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from services.core import metrics
from services.core.holds import MANIFEST_HOLDS, list_holds, parse_hold_key
from services.core.layout import blob_pointer_key, manifest_key, read_blob_pointer
from services.core.objectstore import ObjectNotFound, ObjectStore
from services.core.records import (
    GARBAGE_COLLECTOR,
    BlobReclaimed,
    ManifestReclaimed,
    PointerFate,
    StorageEvent,
    at_ms,
    derived_id,
)
from services.core.settings import Settings
from services.gc.follower import LogFollower
from services.gc.ledger import Ledger
from services.gc.plan import (
    Candidate,
    Cut,
    Kept,
    KeptReason,
    Kind,
    Plan,
    mark_blobs,
    mark_manifests,
    recheck_blob,
    recheck_manifest,
    review_holds,
)
from services.gc.publisher import Publisher
from services.query.index import Index, ReclaimRow, UploadStates

log = logging.getLogger(__name__)

# Reclaims published in one transaction; the bytes of each batch are deleted once it commits.
BATCH = 500
# Deletes in flight at once.
DELETES_AT_ONCE = 16


@dataclass
class Report:
    """What a sweep did (or, dry, would do)."""

    sweep_id: str
    dry_run: bool
    marked_at: Cut
    checked_at: Cut | None = None
    reclaimed: list[Candidate] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # manifests whose copy was written back
    holds_released: int = 0
    finished: int = 0  # earlier reclaims whose bytes this sweep deleted
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.reclaimed)

    def to_json(self) -> dict[str, object]:
        def candidate(c: Candidate) -> dict[str, object]:
            return {
                "kind": c.kind.value,
                "digest": c.digest,
                "object_key": c.object_key,
                "size": c.size,
                "reason": c.reason.value,
                "idle_since": at_ms(c.idle_since_ms).isoformat(),
                **({"pointer": c.pointer.value} if c.kind == Kind.BLOB else {}),
            }

        return {
            "sweep_id": self.sweep_id,
            "dry_run": self.dry_run,
            "marked_at": str(self.marked_at),
            "checked_at": None if self.checked_at is None else str(self.checked_at),
            "reclaimed" if not self.dry_run else "would_reclaim": [
                candidate(c) for c in self.reclaimed
            ],
            "bytes": self.bytes,
            "kept": [{**candidate(k.candidate), "kept": k.reason.value} for k in self.kept],
            "restored": self.restored,
            "holds_released": self.holds_released,
            "finished": self.finished,
            "seconds": round(self.seconds, 3),
        }


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        follower: LogFollower,
        publisher: Publisher,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.follower = follower
        self.index: Index = follower.index
        self.publisher = publisher
        self.ledger = ledger  # None: a throwaway index (`layerlog gc` without --index)
        self.clock = clock
        self._one_at_a_time = asyncio.Lock()

    async def sweep(self, *, dry_run: bool = False) -> Report:
        """The four phases (dry: the mark only, changing nothing)."""
        async with self._one_at_a_time:
            started = time.monotonic()
            try:
                finished = 0 if dry_run else await self.finish_interrupted()
                plan = await self.mark()
                if dry_run:
                    report = Report(plan.sweep_id, True, plan.marked_at)
                    report.reclaimed, report.kept = list(plan.candidates), list(plan.kept)
                else:
                    await self.withdraw(plan)
                    await self.check(plan)
                    report = await self.reclaim(plan)
                    report.finished = finished
            except BaseException:
                if not dry_run:
                    metrics.GC_SWEEPS.labels("failed").inc()
                raise
            report.seconds = time.monotonic() - started
            if not dry_run:
                metrics.GC_SWEEPS.labels("done").inc()
                metrics.GC_SWEEP_SECONDS.observe(report.seconds)
            return report

    # Phase 1

    async def mark(self) -> Plan:
        marked_at = await self.follower.catch_up()
        now_ms = int(self.clock() * 1000)
        grace = self.settings.gc_grace_seconds
        plan = Plan(str(uuid.uuid4()), now_ms, grace, marked_at)
        copies = await asyncio.to_thread(self.index.unnamed_blob_copies)
        blobs, kept_blobs = await asyncio.to_thread(
            mark_blobs, copies, self.index.blob_digest_state, now_ms, grace
        )
        manifests, kept_manifests = mark_manifests(
            await asyncio.to_thread(self.index.unstored_manifests), now_ms, grace
        )
        plan.candidates = [*blobs, *manifests]
        plan.kept = [*kept_blobs, *kept_manifests]
        return plan

    # Phase 2

    async def withdraw(self, plan: Plan) -> None:
        """Deletes the blobs/ pointer of every candidate copy it names: no dedupe or mount that
        reads it from now on can pick the copy."""
        for candidate in plan.candidates:
            if candidate.kind == Kind.BLOB:
                candidate.pointer = await self._withdraw_pointer(candidate)

    async def _withdraw_pointer(self, candidate: Candidate) -> PointerFate:
        pointer = await read_blob_pointer(self.store, candidate.digest)
        if pointer is None:
            return PointerFate.ABSENT
        if pointer.object_key != candidate.object_key:
            return PointerFate.ELSEWHERE
        await self.store.delete(blob_pointer_key(candidate.digest))
        return PointerFate.WITHDRAWN

    # Phase 3

    async def check(self, plan: Plan) -> int:
        """Holds, a second catch-up and a second look at the pointer; returns the holds released.
        What is left in plan.candidates may be reclaimed."""
        # After the withdrawal: a reader that read the pointer before it has its hold here.
        holds = await list_holds(self.store)
        review = await asyncio.to_thread(
            review_holds, holds, self._upload_decided, self._command_decided
        )
        for resolved in review.resolved:
            await self.store.delete(resolved.key)
        metrics.GC_HOLDS_RELEASED.inc(len(review.resolved))
        # After the listing: every link a resolved hold's cause published is below this cut.
        plan.checked_at = await self.follower.catch_up()
        unnamed_now = {
            c.object_key for c in await asyncio.to_thread(self.index.unnamed_blob_copies)
        }
        unstored_now = {m.digest: m for m in await asyncio.to_thread(self.index.unstored_manifests)}
        held_blobs, held_manifests = review.held_blobs(), review.held_manifests()
        for candidate in list(plan.candidates):
            reason: KeptReason | None
            if candidate.kind == Kind.BLOB:
                if candidate.digest in held_blobs:
                    reason = KeptReason.HOLD
                else:
                    state = await asyncio.to_thread(self.index.blob_digest_state, candidate.digest)
                    reason = recheck_blob(candidate, unnamed_now, state)
            elif candidate.digest in held_manifests:
                reason = KeptReason.HOLD
            else:
                reason = recheck_manifest(candidate, unstored_now.get(candidate.digest))
            if reason is not None:
                plan.keep(candidate, reason)
        for candidate in [c for c in plan.candidates if c.kind == Kind.BLOB]:
            if await self._withdraw_pointer(candidate) == PointerFate.WITHDRAWN:
                plan.keep(candidate, KeptReason.POINTER)
        return len(review.resolved)

    def _upload_decided(self, upload_id: str) -> bool:
        row = self.index.upload(upload_id)
        return row is not None and row.state in UploadStates.TERMINAL

    def _command_decided(self, command_id: str) -> bool:
        return self.index.outcome(command_id) is not None

    # Phase 4

    async def reclaim(self, plan: Plan) -> Report:
        if plan.checked_at is None:
            raise RuntimeError("reclaim() before check(): nothing was checked")
        report = Report(plan.sweep_id, False, plan.marked_at, plan.checked_at)
        report.restored += await self.restore_revived()
        bodies: dict[str, bytes] = {}
        for candidate in [c for c in plan.candidates if c.kind == Kind.MANIFEST]:
            try:  # kept until the delete is safe: a racing PUT's copy is written back from it
                bodies[candidate.digest] = await self.store.get(candidate.object_key)
            except ObjectNotFound:
                plan.candidates.remove(candidate)  # gone already: nothing to reclaim
        for start in range(0, len(plan.candidates), BATCH):
            batch = plan.candidates[start : start + BATCH]
            events = [self._event(plan, c) for c in batch]
            await self.publisher.publish(events)
            # Committed: the log says why these bytes are absent; now they may go.
            await self._delete_all([c.object_key for c in batch])
            report.restored += await self._restore_held(
                {c.digest: bodies[c.digest] for c in batch if c.kind == Kind.MANIFEST}
            )
            if self.ledger is not None:
                await asyncio.to_thread(self.ledger.finish, [e.event_id for e in events])
            report.reclaimed += batch
            for candidate in batch:
                metrics.GC_RECLAIMED.labels(candidate.kind.value).inc()
                metrics.GC_RECLAIMED_BYTES.labels(candidate.kind.value).inc(candidate.size)
        report.kept = list(plan.kept)
        for kept in plan.kept:
            metrics.GC_KEPT.labels(kept.candidate.kind.value, kept.reason.value).inc()
        metrics.GC_MANIFESTS_RESTORED.inc(len(report.restored))
        return report

    def _event(self, plan: Plan, candidate: Candidate) -> StorageEvent:
        assert plan.checked_at is not None
        common = {
            "digest": candidate.digest,
            "object_key": candidate.object_key,
            "size": candidate.size,
            "reason": candidate.reason.value,
            "idle_since": at_ms(candidate.idle_since_ms),
            "grace_seconds": plan.grace_seconds,
            "sweep_id": plan.sweep_id,
            "marked_at": str(plan.marked_at),
            "checked_at": str(plan.checked_at),
            "occurred_at": at_ms(plan.now_ms),
            "actor": GARBAGE_COLLECTOR,
        }
        if candidate.kind == Kind.BLOB:
            return BlobReclaimed(
                # A blob copy's key names its upload and is never reused: one reclaim per key,
                # and a sweep retried after an unknown commit publishes the same id.
                event_id=derived_id(candidate.object_key, "BlobReclaimed"),
                blob_sha256=candidate.blob_sha256,
                pointer=candidate.pointer.value,
                **common,  # type: ignore[arg-type]
            )
        return ManifestReclaimed(
            event_id=derived_id(f"{plan.sweep_id}:{candidate.digest}", "ManifestReclaimed"),
            **common,  # type: ignore[arg-type]
        )

    async def _delete_all(self, keys: list[str]) -> None:
        limit = asyncio.Semaphore(DELETES_AT_ONCE)

        async def delete(key: str) -> None:
            async with limit:
                await self.store.delete(key)

        await asyncio.gather(*(delete(key) for key in keys))

    async def _restore_held(self, bodies: dict[str, bytes]) -> list[str]:
        """After deleting manifest copies: a PUT whose hold the check did not see may have
        written its copy just before the delete. Any hold on the digest now (the check deleted
        the resolved ones) writes the copy back."""
        if not bodies:
            return []
        held = set()
        for key in await self.store.list_keys(MANIFEST_HOLDS):
            parsed = parse_hold_key(key)
            if parsed is not None and parsed.manifest:
                held.add(parsed.digest)
        restored = []
        for digest in sorted(held & bodies.keys()):
            await self.store.put(manifest_key(digest), bodies[digest])
            restored.append(digest)
        return restored

    async def restore_revived(self) -> list[str]:
        """Writes back the copy of every reclaimed manifest a repository stores again whose copy
        is missing (a PUT that raced the delete of a sweep that stopped before its restore)."""
        restored = []
        for digest in await asyncio.to_thread(self.index.revived_manifests):
            key = manifest_key(digest)
            try:
                await self.store.stat(key)
                continue
            except ObjectNotFound:
                pass
            row = await asyncio.to_thread(self.index.manifest_stored_anywhere, digest)
            if row is not None:
                await self.store.put(key, row.body)
                restored.append(digest)
        return restored

    # Before a sweep

    async def finish_interrupted(self) -> int:
        """Deletes the bytes of reclaims the log has and the ledger does not: published by a
        sweep that stopped before its deletes, or by another sweeper."""
        if self.ledger is None:
            return 0
        await self.follower.catch_up()
        unfinished = await asyncio.to_thread(self.ledger.unfinished)
        blobs = []
        for row in [r for r in unfinished if r.kind == Kind.BLOB]:
            if await asyncio.to_thread(self.index.blob_copy_linked, row.object_key, row.digest):
                # No sweep decides that (it re-checks the links last): a reclaim written into
                # the log out of band. Its bytes stay; `audit verify` reports the event.
                log.error(
                    "gc: the reclaim %s names %s, which a repository links; not deleting it",
                    row.event_id,
                    row.object_key,
                )
                continue
            blobs.append(row)
        await self._delete_all([r.object_key for r in blobs])
        manifests = [r for r in unfinished if r.kind == Kind.MANIFEST]
        for row in manifests:
            await self._finish_manifest(row)
        await asyncio.to_thread(self.ledger.finish, [r.event_id for r in unfinished])
        if unfinished:
            log.info("gc: finished %d reclaims published earlier", len(unfinished))
        return len(unfinished)

    async def _finish_manifest(self, row: ReclaimRow) -> None:
        # Stored again since: its copy is the live one (restore_revived sees to it being there).
        if await asyncio.to_thread(self.index.manifest_stored_anywhere, row.digest):
            return
        # Stored and deleted again since: that copy waits for its own grace period and sweep.
        copy = await asyncio.to_thread(self.index.manifest_copy, row.digest)
        if copy is None or copy.changed_at_ms > row.reclaimed_at_ms:
            return
        try:
            body = await self.store.get(row.object_key)
        except ObjectNotFound:
            return
        await self.store.delete(row.object_key)
        await self._restore_held({row.digest: body})
