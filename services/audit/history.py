"""`layerlog history`: an upload's events, in log order, each with who did it (its actor) and
the command that caused it.

Keying by upload id puts all of an upload's events in one partition of the events topic and all
of its commands in one partition of the commands topic, so the history of one upload reads one
partition of each and decodes only the records with that key.

The commands topic carries the chunk bytes and is the expensive one to read, so it is read in a
time window around the upload's events first (a command is sent shortly before its event), and
the rest of the partition only when a causing command is not in the window. Commands are kept
7 days: an older event's command is reported as gone, not searched for forever.

`--repo` has no key to go by: it scans every partition of the events topic once, keeps the events
of that repository (and digest), and then reads each needed commands partition once for all the
uploads found in it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, TextIO

from services.audit.logread import LogReader, RawRecord
from services.core.codec import CODEC, DecodeError
from services.core.eventlog import partition_for
from services.core.kafka import COMMAND_RETENTION_MS
from services.core.records import (
    Command,
    Event,
    LayerCommitted,
    LayerValidationFailed,
    UploadCancelled,
    UploadExpired,
    UploadFinished,
    UploadStarted,
)
from services.core.settings import Settings

# How far from an upload's events its commands are looked for first. Only speed depends on it:
# a command outside the window is still found, by reading the rest of the partition.
WINDOW_MARGIN_MS = 5 * 60 * 1000
RETENTION_NOTE = f"commands are kept {COMMAND_RETENTION_MS // (24 * 3600 * 1000)} days"

# Shown on their own, not among an event's or a command's details. A command's token is not
# shown at all: it is a credential, and who it was issued to is the command's subject.
_EVENT_COMMON = (
    "event_id",
    "upload_id",
    "repository",
    "caused_by",
    "occurred_at",
    "schema_version",
    "actor",
)
_COMMAND_COMMON = (
    "command_id",
    "upload_id",
    "repository",
    "issued_at",
    "schema_version",
    "subject",
    "token",
)
_STATES = {
    UploadStarted: "open",
    UploadFinished: "finishing",
    LayerCommitted: "committed",
    LayerValidationFailed: "failed",
    UploadCancelled: "cancelled",
    UploadExpired: "expired",
}


class CommandStatus:
    FOUND = "found"  # the causing command, read from the commands topic
    GONE = "gone"  # caused_by names a command no longer in the commands topic
    NONE = "none"  # the event names no command (raised by a service itself)
    PENDING = "pending"  # a command with no event (yet): the worker has not got to it


@dataclass(frozen=True)
class LoggedEvent:
    partition: int
    offset: int
    timestamp_ms: int
    event: Event | None
    error: str | None = None  # why the bytes did not decode, when event is None


@dataclass
class CommandInfo:
    kind: str
    command_id: str
    partition: int
    offset: int
    issued_at: datetime
    details: dict[str, Any]
    copies: int = 1  # a client that resends after a timeout puts the same command twice
    subject: str | None = None  # who issued it, as its sender verified (None: not recorded)


@dataclass(frozen=True)
class Entry:
    upload_id: str
    repository: str
    logged: LoggedEvent | None
    command: CommandInfo | None
    command_id: str | None
    command_status: str

    @property
    def time(self) -> datetime:
        if self.logged is not None and self.logged.event is not None:
            return self.logged.event.occurred_at
        if self.logged is not None:
            return datetime.fromtimestamp(self.logged.timestamp_ms / 1000, UTC)
        assert self.command is not None
        return self.command.issued_at

    @property
    def actor(self) -> str | None:
        """Who did it: the event's actor, or for a command with no event yet its subject."""
        if self.logged is not None:
            return None if self.logged.event is None else self.logged.event.actor
        return None if self.command is None else self.command.subject

    @property
    def name(self) -> str:
        if self.logged is None:
            return "-"
        if self.logged.event is None:
            return "(undecodable)"
        return type(self.logged.event).__name__


@dataclass
class UploadHistory:
    upload_id: str
    repository: str
    events_partition: int
    commands_partition: int | None
    entries: list[Entry] = field(default_factory=list)

    @property
    def pushed_by(self) -> str | None:
        """Who started the upload: its UploadStarted's actor."""
        for entry in self.entries:
            if entry.logged is not None and isinstance(entry.logged.event, UploadStarted):
                return entry.logged.event.actor
        return None

    @property
    def state(self) -> str:
        state = "unknown"
        for entry in self.entries:
            if entry.logged is not None and entry.logged.event is not None:
                state = _STATES.get(type(entry.logged.event), state)  # type: ignore[call-overload]
        return state


async def upload_history(settings: Settings, upload_id: str) -> UploadHistory | None:
    """The history of one upload; None when the events topic has nothing for it."""
    async with LogReader(settings, settings.events_topic) as reader:
        partition = partition_for(upload_id, len(await reader.partitions()))
        bounds = await reader.bounds([partition])
        key = upload_id.encode()
        events = [_event(raw) async for raw in reader.read(bounds, lambda k, _value: k == key)]
        # The key says whose it is even when the bytes do not decode; an event whose body names
        # another upload is not this upload's (and would be a bug worth seeing in its own right).
        events = [e for e in events if e.event is None or e.event.upload_id == upload_id]
    if not events:
        return None
    return (await _with_commands(settings, {upload_id: events}))[0]


async def repository_history(
    settings: Settings, repository: str, digest: str | None = None
) -> list[UploadHistory]:
    """The histories of every upload to a repository (with that digest): scans the whole log."""
    async with LogReader(settings, settings.events_topic) as reader:
        bounds = await reader.bounds(await reader.partitions())
        # Avro strings are their UTF-8 bytes, so a record that does not contain the name's bytes
        # cannot be of that repository; most records are skipped without decoding.
        needle = repository.encode()
        found: dict[str, list[LoggedEvent]] = {}
        async for raw in reader.read(bounds, lambda _key, value: needle in value):
            logged = _event(raw)
            if logged.event is None or logged.event.repository != repository:
                continue
            found.setdefault(logged.event.upload_id, []).append(logged)
        if digest is not None:
            found = {
                upload_id: events
                for upload_id, events in found.items()
                if any(getattr(e.event, "digest", None) == digest for e in events)
            }
    ordered = dict(sorted(found.items(), key=lambda item: _first_ms(item[1])))
    return await _with_commands(settings, ordered)


async def _with_commands(
    settings: Settings, uploads: dict[str, list[LoggedEvent]]
) -> list[UploadHistory]:
    commands: dict[str, dict[str, CommandInfo]] = {upload_id: {} for upload_id in uploads}
    count = 0
    async with LogReader(settings, settings.commands_topic) as reader:
        try:
            count = len(await reader.partitions())
        except LookupError:
            pass  # no commands topic at all: every command is gone
        groups: dict[int, dict[str, list[LoggedEvent]]] = {}
        if count:
            for upload_id, events in uploads.items():
                groups.setdefault(partition_for(upload_id, count), {})[upload_id] = events
        for partition, group in sorted(groups.items()):
            await _read_commands(reader, partition, group, commands)
    histories = []
    for upload_id, events in uploads.items():
        events.sort(key=lambda e: e.offset)
        repository = next((e.event.repository for e in events if e.event is not None), "?")
        history = UploadHistory(
            upload_id,
            repository,
            events[0].partition,
            partition_for(upload_id, count) if count else None,
        )
        known = commands[upload_id]
        answered = set()
        for logged in events:
            cause = logged.event.caused_by if logged.event is not None else None
            if cause is None:
                status = CommandStatus.NONE
            elif cause in known:
                status = CommandStatus.FOUND
                answered.add(cause)
            else:
                status = CommandStatus.GONE
            history.entries.append(
                Entry(upload_id, repository, logged, known.get(cause or ""), cause, status)
            )
        for command_id, info in known.items():
            if command_id not in answered:
                history.entries.append(
                    Entry(upload_id, repository, None, info, command_id, CommandStatus.PENDING)
                )
        histories.append(history)
    return histories


async def _read_commands(
    reader: LogReader,
    partition: int,
    group: dict[str, list[LoggedEvent]],
    commands: dict[str, dict[str, CommandInfo]],
) -> None:
    """Finds the commands of the uploads in group, all keyed to this one commands partition."""
    keys = {upload_id.encode() for upload_id in group}
    wanted = {
        e.event.caused_by
        for events in group.values()
        for e in events
        if e.event is not None and e.event.caused_by
    }
    begin, end = (await reader.bounds([partition]))[partition]
    stamps = [e.timestamp_ms for events in group.values() for e in events]
    start = await reader.offset_at(partition, min(stamps) - WINDOW_MARGIN_MS)
    stop = await reader.offset_at(partition, max(stamps) + WINDOW_MARGIN_MS)
    start = end if start is None else max(start, begin)
    stop = end if stop is None else max(stop, start)

    async def scan(first: int, last: int) -> None:
        records = reader.read({partition: (first, last)}, lambda k, _value: k in keys)
        async for raw in records:
            info = _command(raw)
            if info is None:
                continue
            upload_id, command = info
            seen = commands.setdefault(upload_id, {})
            if command.command_id in seen:
                seen[command.command_id].copies += 1
            else:
                seen[command.command_id] = command

    await scan(start, stop)
    found = {command_id for seen in commands.values() for command_id in seen}
    if wanted - found:
        # Outside the window (a client with a skewed clock, a worker that was down for long):
        # read the rest once. What is still missing after that has been deleted.
        await scan(begin, start)
        await scan(stop, end)


def _event(raw: RawRecord) -> LoggedEvent:
    try:
        record = CODEC.decode(raw.value)
    except DecodeError as error:
        return LoggedEvent(raw.partition, raw.offset, raw.timestamp_ms, None, str(error))
    if not isinstance(record, Event):
        return LoggedEvent(
            raw.partition, raw.offset, raw.timestamp_ms, None, f"a {type(record).__name__}"
        )
    return LoggedEvent(raw.partition, raw.offset, raw.timestamp_ms, record)


def _command(raw: RawRecord) -> tuple[str, CommandInfo] | None:
    try:
        command = CODEC.decode(raw.value)
    except DecodeError:
        return None  # the dead-letter topic has it, with the reason
    if not isinstance(command, Command):
        return None
    details: dict[str, Any] = {}
    for spec in fields(command):
        if spec.name in _COMMAND_COMMON:
            continue
        value = getattr(command, spec.name)
        # Chunk bytes never leave this function: only their length is kept.
        if isinstance(value, bytes):
            details["length" if spec.name == "data" else f"{spec.name}_length"] = len(value)
        else:
            details[spec.name] = value
    info = CommandInfo(
        type(command).__name__,
        command.command_id,
        raw.partition,
        raw.offset,
        command.issued_at,
        details,
        subject=command.subject,
    )
    return command.upload_id, info


def _first_ms(events: list[LoggedEvent]) -> int:
    return min(e.timestamp_ms for e in events)


def _details(event: Event) -> dict[str, Any]:
    return {s.name: getattr(event, s.name) for s in fields(event) if s.name not in _EVENT_COMMON}


# Rendering


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def entry_json(entry: Entry) -> dict[str, Any]:
    """One line of `history --json`: every field of the event, and the command without bytes."""
    line: dict[str, Any] = {
        "upload_id": entry.upload_id,
        "repository": entry.repository,
        "time": _iso(entry.time),
        "event": None if entry.logged is None else entry.name,
        "actor": entry.actor,
    }
    logged = entry.logged
    if logged is not None:
        line["partition"] = logged.partition
        line["offset"] = logged.offset
        line["log_time"] = _iso(datetime.fromtimestamp(logged.timestamp_ms / 1000, UTC))
        if logged.event is not None:
            line["event_id"] = logged.event.event_id
            line["schema_version"] = logged.event.schema_version
            line["details"] = _plain(_details(logged.event))
        else:
            line["error"] = logged.error
    line["caused_by"] = entry.command_id
    line["command_status"] = entry.command_status
    line["command"] = None if entry.command is None else command_json(entry.command)
    return line


def command_json(command: CommandInfo) -> dict[str, Any]:
    described = asdict(command)
    return {"type": described.pop("kind"), **_plain(described)}


def write_json(histories: Iterable[UploadHistory], out: TextIO) -> None:
    for history in histories:
        for entry in history.entries:
            out.write(json.dumps(entry_json(entry), separators=(",", ":")) + "\n")


def write_table(histories: Iterable[UploadHistory], out: TextIO) -> None:
    first = True
    for history in histories:
        if not first:
            out.write("\n")
        first = False
        commands = (
            f"commands partition {history.commands_partition}"
            if history.commands_partition is not None
            else "no commands topic"
        )
        pushed_by = history.pushed_by
        by = "" if pushed_by is None else f"  pushed by {pushed_by}"
        out.write(
            f"upload {history.upload_id}  repository {history.repository}  "
            f"state {history.state}{by}  (events partition {history.events_partition}, "
            f"{commands})\n"
        )
        rows = [("TIME (UTC)", "EVENT", "BY", "CAUSED BY", "EVENT AT", "COMMAND AT", "DETAILS")]
        rows += [_row(entry) for entry in history.entries]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
        gone = sum(1 for e in history.entries if e.command_status == CommandStatus.GONE)
        if gone:
            out.write(
                f"{gone} causing command(s) are no longer in the commands topic "
                f"({RETENTION_NOTE}).\n"
            )


def _row(entry: Entry) -> tuple[str, str, str, str, str, str, str]:
    moment = entry.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    command = entry.command
    if entry.command_status == CommandStatus.FOUND and command is not None:
        cause = f"{command.kind} {command.command_id[:8]}"
        if command.copies > 1:
            cause += f" (x{command.copies})"
    elif entry.command_status == CommandStatus.GONE:
        cause = f"{(entry.command_id or '')[:8]} (gone)"
    elif entry.command_status == CommandStatus.PENDING and command is not None:
        cause = f"{command.kind} {command.command_id[:8]}"
    else:
        cause = "-"
    at = "-" if entry.logged is None else f"{entry.logged.partition}@{entry.logged.offset}"
    command_at = "-" if command is None else f"{command.partition}@{command.offset}"
    if entry.logged is None:
        assert command is not None
        details = "no event yet: " + _pairs(command.details)
    elif entry.logged.event is None:
        details = entry.logged.error or ""
    else:
        shown = _details(entry.logged.event)
        # The hash chain is for `audit verify`; in a table it is 64 characters of noise.
        shown.pop("prev_hash", None)
        details = _pairs(shown)
    return moment, entry.name, entry.actor or "-", cause, at, command_at, details


def _pairs(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={_plain(v)}" for k, v in values.items() if v is not None and v != "")
