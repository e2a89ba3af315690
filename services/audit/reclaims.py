"""Auditing the garbage collector: every BlobReclaimed and ManifestReclaimed must be one the log
allowed, and a copy a reclaim took is legitimately absent.

The collector publishes the log cut it last checked on (checked_at). Replaying the links to that
cut (each repository's links, unlinks and mounts are in its one partition, so each one's state at
the cut is the last of its events below the cut's offset there), a reclaim is wrong when:

- no commit, link or mount ever named the copy with that digest (it reclaims something else);
- some repository served the copy at the cut: a link naming it, or the repository's newest
  commit of the digest naming it while the digest was in the repository;
- it says UNLINKED and some repository had the digest at the cut;
- it came before its own grace period was over;
- a link or mount names the copy past the cut: a push that got its bytes taken from under it.
  (That is the failure the collector's protocol exists to prevent; services/gc/sweep.py.)

A manifest's reclaim is wrong when a repository stored it at the cut. A ManifestStored whose copy
is missing is explained by a reclaim whose cut it is below; one past every reclaim's cut must
have its copy (a PUT after the reclaim writes it again, or the collector restores it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.core.records import (
    BlobLinked,
    BlobMounted,
    BlobReclaimed,
    BlobUnlinked,
    LayerCommitted,
    ManifestDeleted,
    ManifestReclaimed,
    ManifestStored,
    ReclaimReason,
    StorageEvent,
)


@dataclass(frozen=True)
class Position:
    partition: int
    offset: int

    def below(self, cut: dict[int, int]) -> bool:
        return self.offset < cut.get(self.partition, 0)

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass(frozen=True)
class LinkEvent:
    at: Position
    repository: str
    digest: str
    linked: bool
    object_key: str | None  # None for an unlink


@dataclass(frozen=True)
class CommitEvent:
    at: Position
    repository: str
    digest: str
    object_key: str
    committed_at_ms: int


@dataclass(frozen=True)
class StoreEvent:
    at: Position
    repository: str
    digest: str
    stored: bool  # ManifestStored, else ManifestDeleted


@dataclass(frozen=True)
class Problem:
    at: Position
    event: object
    problem: str


@dataclass
class ReclaimAudit:
    """Fed every event of the log (whatever repository an audit is limited to), then judged."""

    links: list[LinkEvent] = field(default_factory=list)
    commits: list[CommitEvent] = field(default_factory=list)
    stores: list[StoreEvent] = field(default_factory=list)
    reclaims: list[tuple[Position, StorageEvent]] = field(default_factory=list)

    def see(self, partition: int, offset: int, event: object) -> None:
        at = Position(partition, offset)
        if isinstance(event, BlobLinked | BlobMounted):
            self.links.append(LinkEvent(at, event.repository, event.digest, True, event.object_key))
        elif isinstance(event, BlobUnlinked):
            self.links.append(LinkEvent(at, event.repository, event.digest, False, None))
        elif isinstance(event, LayerCommitted):
            moment = int(event.committed_at.timestamp() * 1000)
            self.commits.append(
                CommitEvent(at, event.repository, event.digest, event.object_key, moment)
            )
        elif isinstance(event, ManifestStored | ManifestDeleted):
            stored = isinstance(event, ManifestStored)
            self.stores.append(StoreEvent(at, event.repository, event.digest, stored))
        elif isinstance(event, StorageEvent):
            self.reclaims.append((at, event))

    def reclaimed_blob_keys(self) -> set[str]:
        return {e.object_key for _, e in self.reclaims if isinstance(e, BlobReclaimed)}

    def blob_absence_explained(self, at: Position, object_key: str) -> bool:
        """A commit or mount at `at` names object_key: is a reclaim past it why it is gone?"""
        return any(
            isinstance(e, BlobReclaimed) and e.object_key == object_key and at.below(_cut(e))
            for _, e in self.reclaims
        )

    def manifest_absence_explained(self, at: Position, digest: str) -> bool:
        return any(
            isinstance(e, ManifestReclaimed) and e.digest == digest and at.below(_cut(e))
            for _, e in self.reclaims
        )

    def problems(self, only_keys: set[str] | None = None) -> list[Problem]:
        """Every reclaim the log did not allow, and every link to bytes a reclaim took.
        only_keys: judge only reclaims of these object keys (an audit of one repository)."""
        found: list[Problem] = []
        for at, event in self.reclaims:
            if only_keys is not None and event.object_key not in only_keys:
                continue
            try:
                cut = _cut(event)
            except ValueError:
                found.append(Problem(at, event, f"checked_at {event.checked_at!r} is no log cut"))
                continue
            problem = (
                self._blob_problem(event, cut)
                if isinstance(event, BlobReclaimed)
                else self._manifest_problem(event, cut)
            )
            idle = (event.occurred_at - event.idle_since).total_seconds()
            if problem is None and idle < event.grace_seconds:
                problem = f"reclaimed {idle:.0f}s after it went idle, inside its grace period"
            if problem is not None:
                found.append(Problem(at, event, problem))
            if isinstance(event, BlobReclaimed):
                for link in self.links:
                    if link.object_key == event.object_key and not link.at.below(cut):
                        found.append(
                            Problem(
                                link.at,
                                link,
                                f"links {event.object_key}, whose bytes the reclaim at {at} took",
                            )
                        )
        return found

    def _blob_problem(self, event: BlobReclaimed, cut: dict[int, int]) -> str | None:
        named = any(
            e.object_key == event.object_key and e.digest == event.digest
            for e in (*self.links, *self.commits)
        )
        if not named:
            return f"no commit, link or mount named {event.object_key} as {event.digest}"
        for repository, served in self._serving_at(event.digest, cut).items():
            if event.object_key in served:
                return f"{repository} served {event.object_key} at the cut {event.checked_at}"
            if event.reason == ReclaimReason.UNLINKED:
                return f"reclaimed as UNLINKED, but {repository} had {event.digest} at the cut"
        return None

    def _serving_at(self, digest: str, cut: dict[int, int]) -> dict[str, set[str]]:
        """The repositories that had the digest at the cut, with the copies they served: the
        link's, and the newest commit's (the index's layers row), as services/gc marks them."""
        last_link: dict[str, LinkEvent] = {}
        for link in self.links:
            if link.digest == digest and link.at.below(cut):
                current = last_link.get(link.repository)
                if current is None or _later_in_partition(link.at, current.at):
                    last_link[link.repository] = link
        newest_commit: dict[str, CommitEvent] = {}
        for commit in self.commits:
            if commit.digest == digest and commit.at.below(cut):
                current = newest_commit.get(commit.repository)
                if current is None or (commit.committed_at_ms, commit.object_key) > (
                    current.committed_at_ms,
                    current.object_key,
                ):
                    newest_commit[commit.repository] = commit
        serving: dict[str, set[str]] = {}
        for repository in last_link.keys() | newest_commit.keys():
            link = last_link.get(repository)
            if link is not None and not link.linked:
                continue
            copies = set()
            if link is not None and link.object_key is not None:
                copies.add(link.object_key)
            commit = newest_commit.get(repository)
            if commit is not None:
                copies.add(commit.object_key)
            serving[repository] = copies
        return serving

    def _manifest_problem(self, event: StorageEvent, cut: dict[int, int]) -> str | None:
        last: dict[str, StoreEvent] = {}
        for store in self.stores:
            if store.digest == event.digest and store.at.below(cut):
                current = last.get(store.repository)
                if current is None or _later_in_partition(store.at, current.at):
                    last[store.repository] = store
        if not any(s.digest == event.digest for s in self.stores):
            return f"no ManifestStored ever named {event.digest}"
        for repository, store in sorted(last.items()):
            if store.stored:
                return f"{repository} stored {event.digest} at the cut {event.checked_at}"
        return None


def _later_in_partition(a: Position, b: Position) -> bool:
    # One repository's events are in one partition: its offsets order them.
    return (a.partition, a.offset) > (b.partition, b.offset)


def _cut(event: StorageEvent) -> dict[int, int]:
    offsets = {}
    for pair in event.checked_at.split():
        partition, sep, offset = pair.partition(":")
        if not sep:
            raise ValueError(pair)
        offsets[int(partition)] = int(offset)
    return offsets
