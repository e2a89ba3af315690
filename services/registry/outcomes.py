"""What became of a repository command, as this process's index records it.

The read side projects each repository event's caused_by into Index.outcome. A command's events
are published in one transaction but may reach the projection in two batches, so a command
counts as applied only once the last event it produces is in the index.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    TagDeleted,
    TagMoved,
    UnlinkBlob,
)
from services.oci.references import is_digest
from services.query.index import Index
from services.registry.commandlog import Watcher


@dataclass(frozen=True)
class Outcome:
    applied: bool
    reason: str | None  # a RepositoryRejectReason when not applied
    detail: str | None


def last_event(command: RepositoryCommand) -> str:
    """The name of the last event the worker publishes for an applied command."""
    if isinstance(command, PutManifest):
        return ManifestStored.__name__ if is_digest(command.reference) else TagMoved.__name__
    last = {
        DeleteManifest: ManifestDeleted,
        DeleteTag: TagDeleted,
        MountBlob: BlobMounted,
        UnlinkBlob: BlobUnlinked,
    }[type(command)]
    return last.__name__


def read_outcome(index: Index, command: RepositoryCommand) -> Outcome | None:
    """None until the command's refusal, or all of its events, are projected."""
    row = index.outcome(command.command_id)
    if row is None:
        return None
    if not row.applied:
        return Outcome(applied=False, reason=row.reason, detail=row.detail)
    if last_event(command) not in row.kinds:
        return None
    return Outcome(applied=True, reason=None, detail=None)


async def await_outcome(
    watch: Watcher, index: Index, command: RepositoryCommand, what: str, timeout: float
) -> Outcome:
    return await watch.until(lambda: read_outcome(index, command), timeout, what)
