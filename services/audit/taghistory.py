"""`layerlog history --repo R --tag T`: every digest a tag pointed to, when, who moved it (the
event's actor) and which command did.

Repository events are keyed by the repository name, so one repository's tag moves are all in the
one events partition that key maps to; only that partition is read, and only records with that
key (and the tag's bytes somewhere in them) are decoded. The causing commands are keyed the same
way on the commands topic: its partition is read in a window around the moves first, and the rest
of it only when a command is not in the window (as for upload histories).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TextIO

from services.audit.history import (
    RETENTION_NOTE,
    WINDOW_MARGIN_MS,
    CommandInfo,
    CommandStatus,
    _iso,
    command_json,
)
from services.audit.logread import LogReader
from services.core.codec import CODEC, DecodeError
from services.core.eventlog import partition_for
from services.core.records import RepositoryCommand, TagDeleted, TagMoved
from services.core.settings import Settings


@dataclass(frozen=True)
class TagChange:
    partition: int
    offset: int
    event: TagMoved | TagDeleted
    command: CommandInfo | None
    command_status: str

    @property
    def digest(self) -> str | None:
        """What the tag points to after this change; None once deleted."""
        return self.event.digest if isinstance(self.event, TagMoved) else None


async def tag_history(settings: Settings, repository: str, tag: str) -> list[TagChange]:
    """The tag's moves and deletions in log order; empty when the log has none."""
    key, needle = repository.encode(), tag.encode()
    moves: list[tuple[int, int, int, TagMoved | TagDeleted]] = []
    async with LogReader(settings, settings.events_topic) as reader:
        partition = partition_for(repository, len(await reader.partitions()))
        bounds = await reader.bounds([partition])
        async for raw in reader.read(bounds, lambda k, value: k == key and needle in value):
            try:
                event = CODEC.decode(raw.value)
            except DecodeError:
                continue  # `audit verify` reports undecodable events; this is a tag's story
            if (
                isinstance(event, TagMoved | TagDeleted)
                and event.repository == repository
                and event.tag == tag
            ):
                moves.append((raw.partition, raw.offset, raw.timestamp_ms, event))
    commands = await _causing_commands(settings, repository, moves)
    changes = []
    for partition, offset, _, event in moves:
        command = commands.get(event.caused_by or "")
        if event.caused_by is None:
            status = CommandStatus.NONE
        else:
            status = CommandStatus.FOUND if command is not None else CommandStatus.GONE
        changes.append(TagChange(partition, offset, event, command, status))
    return changes


async def _causing_commands(
    settings: Settings, repository: str, moves: list[tuple[int, int, int, TagMoved | TagDeleted]]
) -> dict[str, CommandInfo]:
    wanted = {event.caused_by for *_, event in moves if event.caused_by}
    found: dict[str, CommandInfo] = {}
    if not wanted:
        return found
    key = repository.encode()
    async with LogReader(settings, settings.commands_topic) as reader:
        try:
            partition = partition_for(repository, len(await reader.partitions()))
        except LookupError:
            return found  # no commands topic: every command is gone
        begin, end = (await reader.bounds([partition]))[partition]
        stamps = [stamp for _, _, stamp, _ in moves]
        start = await reader.offset_at(partition, min(stamps) - WINDOW_MARGIN_MS)
        stop = await reader.offset_at(partition, max(stamps) + WINDOW_MARGIN_MS)
        start = end if start is None else max(start, begin)
        stop = end if stop is None else max(stop, start)
        for first, last in ((start, stop), (begin, start), (stop, end)):
            if wanted <= found.keys():
                break
            async for raw in reader.read({partition: (first, last)}, lambda k, _v: k == key):
                try:
                    command = CODEC.decode(raw.value)
                except DecodeError:
                    continue
                if isinstance(command, RepositoryCommand) and command.command_id in wanted:
                    if command.command_id in found:
                        found[command.command_id].copies += 1
                        continue
                    found[command.command_id] = CommandInfo(
                        type(command).__name__,
                        command.command_id,
                        raw.partition,
                        raw.offset,
                        command.issued_at,
                        {"reference": getattr(command, "reference", None)},
                        subject=command.subject,
                    )
    return found


def change_json(repository: str, change: TagChange) -> dict[str, Any]:
    event, command = change.event, change.command
    return {
        "repository": repository,
        "tag": event.tag,
        "time": _iso(event.occurred_at),
        "event": type(event).__name__,
        "actor": event.actor,  # who moved or deleted the tag (None: not recorded)
        "digest": change.digest,
        "previous_digest": event.previous_digest,
        "partition": change.partition,
        "offset": change.offset,
        "event_id": event.event_id,
        "caused_by": event.caused_by,
        "command_status": change.command_status,
        "command": None if command is None else command_json(command),
    }


def write_json(repository: str, changes: list[TagChange], out: TextIO) -> None:
    for change in changes:
        out.write(json.dumps(change_json(repository, change), separators=(",", ":")) + "\n")


def write_table(repository: str, tag: str, changes: list[TagChange], out: TextIO) -> None:
    partition = changes[0].partition if changes else "-"
    out.write(f"tag {repository}:{tag}  (events partition {partition})\n")
    rows = [("TIME (UTC)", "EVENT", "BY", "DIGEST", "PREVIOUS", "CAUSED BY", "EVENT AT")]
    for change in changes:
        command = change.command
        if command is not None:
            cause = f"{command.kind} {command.command_id[:8]}"
        elif change.command_status == CommandStatus.GONE:
            cause = f"{(change.event.caused_by or '')[:8]} (gone)"
        else:
            cause = "-"
        rows.append(
            (
                change.event.occurred_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                type(change.event).__name__,
                change.event.actor or "-",
                change.digest or "(deleted)",
                change.event.previous_digest or "-",
                cause,
                f"{change.partition}@{change.offset}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    if any(c.command_status == CommandStatus.GONE for c in changes):
        out.write(
            f"some causing commands are no longer in the commands topic ({RETENTION_NOTE}).\n"
        )
