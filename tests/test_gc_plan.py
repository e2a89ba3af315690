"""The collector's pure decisions (services/gc/plan.py), the hold layout (services/core/holds.py)
and the audit's judgement of reclaims (services/audit/reclaims.py), without a stack."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.audit.reclaims import ReclaimAudit
from services.core.holds import (
    HoldCause,
    blob_hold_key,
    manifest_hold_key,
    parse_hold_key,
)
from services.core.records import (
    GARBAGE_COLLECTOR,
    BlobLinked,
    BlobMounted,
    BlobReclaimed,
    BlobUnlinked,
    LayerCommitted,
    PointerFate,
    ReclaimReason,
)
from services.gc.plan import (
    Candidate,
    Cut,
    KeptReason,
    Kind,
    mark_blobs,
    recheck_blob,
    review_holds,
)
from services.query.index import BlobCopy, DigestState

D = "sha256:" + "d" * 64
K, K2 = "uploads/one/data", "uploads/two/data"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_marking_keeps_what_the_grace_period_covers():
    copies = [BlobCopy(K, D, 10, D)]
    quiet = DigestState(D, False, changed_at_ms=1_000)
    candidates, kept = mark_blobs(copies, lambda _: quiet, now_ms=1_000 + 59_999, grace_seconds=60)
    assert candidates == [] and [k.reason for k in kept] == [KeptReason.GRACE]
    candidates, kept = mark_blobs(copies, lambda _: quiet, now_ms=1_000 + 60_000, grace_seconds=60)
    assert [(c.object_key, c.reason) for c in candidates] == [(K, ReclaimReason.UNLINKED)]
    linked = DigestState(D, True, changed_at_ms=1_000)
    candidates, _ = mark_blobs(copies, lambda _: linked, now_ms=10**9, grace_seconds=60)
    assert candidates[0].reason == ReclaimReason.UNNAMED_COPY


def test_a_digest_whose_links_moved_between_mark_and_check_is_kept():
    candidate = Candidate(Kind.BLOB, D, K, 10, ReclaimReason.UNLINKED, idle_since_ms=1_000)
    same = DigestState(D, False, 1_000)
    assert recheck_blob(candidate, {K}, same) is None
    assert recheck_blob(candidate, set(), same) == KeptReason.RACING_LINK  # named again
    moved = DigestState(D, False, 2_000)  # linked and unlinked again meanwhile
    assert recheck_blob(candidate, {K}, moved) == KeptReason.RACING_LINK
    # Linked through another copy, with a clock that makes the link look older: still kept.
    assert recheck_blob(candidate, {K}, DigestState(D, True, 1_000)) == KeptReason.RACING_LINK


def test_holds_name_their_cause_and_resolve_by_it():
    upload = blob_hold_key(D, HoldCause.UPLOAD, "u-1")
    mount = blob_hold_key(D, HoldCause.MOUNT, "c-1")
    put = manifest_hold_key(D, "c-2")
    assert upload == f"gc-holds/blobs/sha256/{'d' * 64}/upload-u-1"
    parsed = [parse_hold_key(k) for k in (upload, mount, put)]
    assert [(h.manifest, h.digest, h.cause, h.cause_id) for h in parsed if h] == [
        (False, D, HoldCause.UPLOAD, "u-1"),
        (False, D, HoldCause.MOUNT, "c-1"),
        (True, D, HoldCause.PUT, "c-2"),
    ]
    for bad in ("gc-holds/blobs/sha256/x", "blobs/sha256/x/upload-u", "gc-holds/blobs/a/b/put-c"):
        assert parse_hold_key(bad) is None
    review = review_holds(
        [h for h in parsed if h],
        upload_decided=lambda u: u == "u-1",
        command_decided=lambda _: False,
    )
    assert [h.cause_id for h in review.resolved] == ["u-1"]
    assert review.held_blobs() == {D} and review.held_manifests() == {D}


def test_a_cut_reads_back_as_written():
    cut = Cut({2: 9, 0: 13, 1: 5})
    assert str(cut) == "0:13 1:5 2:9" and Cut.parse(str(cut)) == cut


def _commit(repository: str, key: str) -> LayerCommitted:
    return LayerCommitted(
        event_id=f"c-{repository}-{key}",
        upload_id="u",
        repository=repository,
        caused_by=None,
        digest=D,
        size=10,
        object_key=key,
        committed_at=T0,
        blob_sha256=D,
    )


def _link(repository: str, key: str) -> BlobLinked:
    return BlobLinked(
        event_id=f"l-{repository}-{key}",
        repository=repository,
        caused_by=None,
        digest=D,
        size=10,
        object_key=key,
        blob_sha256=D,
        upload_id="u",
    )


def _reclaim(key: str, reason: ReclaimReason, checked_at: str, idle_hours: int = 2):
    return BlobReclaimed(
        event_id=f"r-{key}",
        digest=D,
        object_key=key,
        size=10,
        reason=reason,
        idle_since=T0,
        grace_seconds=3600,
        sweep_id="s",
        marked_at=checked_at,
        checked_at=checked_at,
        occurred_at=T0 + timedelta(hours=idle_hours),
        blob_sha256=D,
        pointer=PointerFate.WITHDRAWN,
        actor=GARBAGE_COLLECTOR,
    )


def _audit(*events: tuple[int, int, object]) -> ReclaimAudit:
    audit = ReclaimAudit()
    for partition, offset, event in events:
        audit.see(partition, offset, event)
    return audit


def test_the_audit_allows_a_reclaim_of_a_digest_nothing_linked_at_its_cut():
    unlinked = BlobUnlinked(event_id="x", repository="r", caused_by=None, digest=D)
    audit = _audit(
        (0, 0, _commit("r", K)),
        (1, 0, _link("r", K)),
        (1, 1, unlinked),
        (2, 0, _reclaim(K, ReclaimReason.UNLINKED, "0:1 1:2 2:0")),
    )
    assert audit.problems() == []
    assert audit.blob_absence_explained(audit.links[0].at, K)


def test_the_audit_refuses_reclaims_the_log_did_not_allow():
    # Linked at the cut (the unlink came after it).
    unlinked = BlobUnlinked(event_id="x", repository="r", caused_by=None, digest=D)
    early = _audit(
        (0, 0, _commit("r", K)),
        (1, 0, _link("r", K)),
        (1, 1, unlinked),
        (2, 0, _reclaim(K, ReclaimReason.UNLINKED, "0:1 1:1 2:0")),
    )
    (problem,) = early.problems()
    assert "r served" in problem.problem
    # UNLINKED while another repository had the digest through another copy.
    other = _audit(
        (0, 0, _commit("r", K)),
        (1, 0, _link("r", K)),
        (1, 1, unlinked),
        (
            3,
            0,
            BlobMounted(
                event_id="m",
                repository="s",
                caused_by=None,
                digest=D,
                size=10,
                object_key=K2,
                blob_sha256=D,
                source_repository=None,
            ),
        ),
        (2, 0, _reclaim(K, ReclaimReason.UNLINKED, "0:1 1:2 2:0 3:1")),
    )
    (problem,) = other.problems()
    assert "UNLINKED" in problem.problem and "s had" in problem.problem
    assert (
        _audit(
            (0, 0, _commit("r", K)),
            (1, 0, _link("r", K)),
            (1, 1, unlinked),
            (
                3,
                0,
                BlobMounted(
                    event_id="m",
                    repository="s",
                    caused_by=None,
                    digest=D,
                    size=10,
                    object_key=K2,
                    blob_sha256=D,
                    source_repository=None,
                ),
            ),
            (2, 0, _reclaim(K, ReclaimReason.UNNAMED_COPY, "0:1 1:2 2:0 3:1")),
        ).problems()
        == []
    )
    # Inside its grace period; and bytes nothing ever named.
    (problem,) = _audit(
        (0, 0, _commit("r", K)),
        (1, 0, _link("r", K)),
        (1, 1, unlinked),
        (2, 0, _reclaim(K, ReclaimReason.UNLINKED, "0:1 1:2 2:0", idle_hours=0)),
    ).problems()
    assert "grace" in problem.problem
    (problem,) = _audit((2, 0, _reclaim(K2, ReclaimReason.UNLINKED, "2:0"))).problems()
    assert "no commit" in problem.problem


def test_the_audit_reports_a_link_to_reclaimed_bytes():
    unlinked = BlobUnlinked(event_id="x", repository="r", caused_by=None, digest=D)
    audit = _audit(
        (0, 0, _commit("r", K)),
        (1, 0, _link("r", K)),
        (1, 1, unlinked),
        (2, 0, _reclaim(K, ReclaimReason.UNLINKED, "0:1 1:2 2:0")),
        (1, 2, _link("r", K)),  # past the cut: a push that deduplicated onto the taken copy
    )
    (problem,) = audit.problems()
    assert str(problem.at) == "1:2" and "whose bytes the reclaim at 2:0 took" in problem.problem
    assert not audit.blob_absence_explained(audit.links[-1].at, K)
