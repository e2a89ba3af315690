"""What a sweep decides, as plain data and pure functions of the index's rows (unit-tested in
tests/test_gc_plan.py); services/gc/sweep.py does the I/O around them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from services.core.holds import Hold, HoldCause
from services.core.records import PointerFate, ReclaimReason
from services.query.index import BlobCopy, DigestState, ManifestCopy


class Kind(StrEnum):
    BLOB = "blob"
    MANIFEST = "manifest"


class KeptReason(StrEnum):
    GRACE = "grace"  # nothing has linked it for less than the grace period
    RACING_LINK = "racing_link"  # linked again, or its links moved, between mark and check
    HOLD = "hold"  # a push, a mount or a manifest PUT in flight holds it
    POINTER = "pointer"  # the blobs/ pointer named it again after it was withdrawn


@dataclass(frozen=True)
class Cut:
    """A point of the events log: per partition, the offset the index had applied up to."""

    offsets: dict[int, int]

    def __str__(self) -> str:
        return " ".join(f"{p}:{o}" for p, o in sorted(self.offsets.items()))

    @classmethod
    def parse(cls, text: str) -> Cut:
        offsets = {}
        for pair in text.split():
            partition, _, offset = pair.partition(":")
            offsets[int(partition)] = int(offset)
        return cls(offsets)


@dataclass
class Candidate:
    kind: Kind
    digest: str
    object_key: str
    size: int
    reason: ReclaimReason
    idle_since_ms: int  # the digest's last link change (a manifest's last store or delete)
    blob_sha256: str = ""
    pointer: PointerFate = PointerFate.ABSENT  # set by the withdrawal


@dataclass(frozen=True)
class Kept:
    candidate: Candidate
    reason: KeptReason


@dataclass
class Plan:
    """One sweep's decisions so far."""

    sweep_id: str
    now_ms: int
    grace_seconds: int
    marked_at: Cut
    candidates: list[Candidate] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    checked_at: Cut | None = None

    def keep(self, candidate: Candidate, reason: KeptReason) -> None:
        self.candidates.remove(candidate)
        self.kept.append(Kept(candidate, reason))

    @property
    def reclaimable_bytes(self) -> int:
        return sum(c.size for c in self.candidates)


def mark_blobs(
    copies: Iterable[BlobCopy],
    state_of: Callable[[str], DigestState],
    now_ms: int,
    grace_seconds: int,
) -> tuple[list[Candidate], list[Kept]]:
    """Every copy nothing serves is a candidate once its digest's links have not moved for the
    grace period; UNLINKED when no repository has the digest, UNNAMED_COPY when one has it
    through another copy."""
    candidates, kept = [], []
    states: dict[str, DigestState] = {}
    for copy in copies:
        state = states.get(copy.digest) or states.setdefault(copy.digest, state_of(copy.digest))
        candidate = Candidate(
            Kind.BLOB,
            copy.digest,
            copy.object_key,
            copy.size,
            ReclaimReason.UNNAMED_COPY if state.linked else ReclaimReason.UNLINKED,
            state.changed_at_ms,
            blob_sha256=copy.blob_sha256,
        )
        if _within_grace(candidate.idle_since_ms, now_ms, grace_seconds):
            kept.append(Kept(candidate, KeptReason.GRACE))
        else:
            candidates.append(candidate)
    return candidates, kept


def mark_manifests(
    copies: Iterable[ManifestCopy], now_ms: int, grace_seconds: int
) -> tuple[list[Candidate], list[Kept]]:
    candidates, kept = [], []
    for copy in copies:
        candidate = Candidate(
            Kind.MANIFEST,
            copy.digest,
            copy.object_key,
            copy.size,
            ReclaimReason.UNSTORED,
            copy.changed_at_ms,
        )
        if _within_grace(copy.changed_at_ms, now_ms, grace_seconds):
            kept.append(Kept(candidate, KeptReason.GRACE))
        else:
            candidates.append(candidate)
    return candidates, kept


def _within_grace(idle_since_ms: int, now_ms: int, grace_seconds: int) -> bool:
    return now_ms - idle_since_ms < grace_seconds * 1000


def recheck_blob(
    candidate: Candidate, unnamed_now: set[str], state_now: DigestState
) -> KeptReason | None:
    """Why a blob candidate must stay after the check's catch-up, or None to reclaim it. The
    sweep acts only on a digest whose links did not move between the mark and the check: a
    link, unlink or commit of the digest in between (a push racing the sweep) keeps it."""
    if candidate.object_key not in unnamed_now:
        return KeptReason.RACING_LINK  # a link (or a repository's layers row) names it now
    if state_now.changed_at_ms != candidate.idle_since_ms:
        return KeptReason.RACING_LINK
    if candidate.reason == ReclaimReason.UNLINKED and state_now.linked:
        return KeptReason.RACING_LINK
    return None


def recheck_manifest(candidate: Candidate, now: ManifestCopy | None) -> KeptReason | None:
    """`now`: the manifest as the caught-up index lists it among those no repository stores
    (None: stored again, or reclaimed meanwhile)."""
    if now is None or now.changed_at_ms != candidate.idle_since_ms:
        return KeptReason.RACING_LINK
    return None


@dataclass(frozen=True)
class HoldReview:
    active: list[Hold]  # their cause's outcome is not in the log yet: their digests stay
    resolved: list[Hold]  # done with: delete them

    def held_blobs(self) -> set[str]:
        return {h.digest for h in self.active if not h.manifest}

    def held_manifests(self) -> set[str]:
        return {h.digest for h in self.active if h.manifest}


def review_holds(
    holds: Iterable[Hold],
    upload_decided: Callable[[str], bool],
    command_decided: Callable[[str], bool],
) -> HoldReview:
    """A hold is resolved once the log has its cause's outcome (then whatever that linked is in
    the index, which the check catches up after reading the holds)."""
    active, resolved = [], []
    for held in holds:
        if held.cause == HoldCause.UPLOAD:
            done = upload_decided(held.cause_id)
        else:
            done = command_decided(held.cause_id)
        (resolved if done else active).append(held)
    return HoldReview(active, resolved)
