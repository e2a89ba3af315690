"""What became of a repository command, as this process's index records it.

The read side projects repository events into the index, including each command's outcome by
command id. This module is the one place that knows the shape of that row, so the write routes
depend only on Outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.query.index import Index
from services.registry.commandlog import Watcher


@dataclass(frozen=True)
class Outcome:
    applied: bool
    reason: str | None  # a RepositoryRejectReason when not applied
    detail: str | None


def read_outcome(index: Index, command_id: str) -> Outcome | None:
    """None until the command's events are projected."""
    # Assumed from the design: Index.outcome(command_id) -> a row with .state ("applied" or
    # "rejected"), .reason and .detail, written in the same transaction as the command's
    # effects, so that once it is seen every read of this index sees the change too.
    row = index.outcome(command_id)  # type: ignore[attr-defined]
    if row is None:
        return None
    return Outcome(applied=row.state == "applied", reason=row.reason, detail=row.detail)


async def await_outcome(
    watch: Watcher, index: Index, command_id: str, what: str, timeout: float
) -> Outcome:
    return await watch.until(lambda: read_outcome(index, command_id), timeout, what)
