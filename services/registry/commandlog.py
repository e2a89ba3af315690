"""The registry's two halves of the log: commands out to Kafka, outcomes in from its own index.

The registry is a Kafka client of its own (not the SDK): it produces the commands, and learns
what became of them from the events its projection applies to this process's index.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.core import kafka
from services.core.codec import CODEC
from services.core.principals import Principal
from services.core.records import AppendChunk, Command, RepositoryCommand
from services.core.settings import MIB, Settings
from services.query.barrier import Behind, ReadBarrier
from services.query.projection import Projection
from services.registry.errors import unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bytes of chunks handed to the Kafka client and not yet acknowledged, per request: a streamed
# multi-GiB PATCH then holds about this much of the body in memory (the SDK's window too).
IN_FLIGHT_BYTES = 32 * MIB
# Body bytes the whole process holds, read and not yet acknowledged by Kafka, across every
# upload request: twenty docker clients pushing five layers each must not need gigabytes. A
# request past it waits (and its client's TCP window closes), it is not refused.
PROCESS_BODY_BYTES = 32 * MIB
# A wait also re-reads the index this often, in case a notification came between read and wait.
RECHECK_SECONDS = 1.0


def key_of(command: Command | RepositoryCommand) -> bytes:
    # Upload commands stay keyed by upload id; repository commands by the repository name, so
    # each repository's manifests and tags change in one partition's order.
    if isinstance(command, Command):
        return command.upload_id.encode()
    return command.repository.encode()


class ByteBudget:
    """A count of bytes the process may hold, taken before body bytes are read and given back
    once Kafka has them. One request larger than the whole budget still goes, alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()
        self._notifying: set[asyncio.Task[None]] = set()

    def can_take(self, count: int) -> bool:
        return self.used == 0 or self.used + count <= self.limit

    def try_take(self, count: int) -> bool:
        """Takes the bytes if that needs no wait (no await between the check and the take)."""
        if not self.can_take(count):
            return False
        self.used += count
        return True

    async def take(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + count <= self.limit)
            self.used += count

    def give(self, count: int) -> None:
        if not count:
            return
        self.used -= count
        # Called from futures' callbacks too, outside any coroutine: wake the waiters later
        # (the task is kept until it ran, so it cannot be collected half way).
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


class CommandLog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.budget = ByteBudget(PROCESS_BODY_BYTES)
        # Batches of up to 1 MiB: a small blob's last chunk and its FinishUpload then travel in
        # one batch, which the worker reads in one fetch.
        self.producer: AIOKafkaProducer = kafka.producer(
            settings, Principal.REGISTRY, max_batch_size=MIB
        )

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    def sender(self) -> Sender:
        return Sender(self)

    async def deliver(self, *commands: Command | RepositoryCommand) -> None:
        """Puts the commands on the log in order and waits until Kafka has all of them."""
        sender = self.sender()
        for command in commands:
            await sender.send(command)
        await sender.drain()


class Sender:
    """One request's commands, in order, with a bounded window of unacknowledged chunk bytes.

    A Kafka failure is answered with 503: the client asks for the upload's offset and goes on
    from what did arrive, so no chunk is kept here for a retry of our own.
    """

    def __init__(self, log: CommandLog) -> None:
        self.log = log
        self._in_flight: deque[tuple[asyncio.Future[Any], int]] = deque()
        self._in_flight_bytes = 0

    async def send(self, command: Command | RepositoryCommand, budgeted: int = 0) -> None:
        """Hands the command to Kafka; `budgeted` bytes of the process's ByteBudget, taken for
        its body, are given back once Kafka has acknowledged (or refused) it."""
        size = len(command.data) if isinstance(command, AppendChunk) else 0
        value = CODEC.encode(command)
        try:
            future = await self.log.producer.send(
                self.log.settings.commands_topic, value, key=key_of(command)
            )
        except KafkaError as error:
            self.log.budget.give(budgeted)
            await self.abandon()
            # The client error's text names brokers and internals: the log has it, not the client.
            log.warning("Kafka did not take a %s: %r", type(command).__name__, error)
            raise unavailable("Kafka did not take the command; retry shortly") from None
        except BaseException:
            self.log.budget.give(budgeted)  # cancelled, say: no callback will give it back
            raise
        if budgeted:
            future.add_done_callback(lambda _: self.log.budget.give(budgeted))
        self._in_flight.append((future, size))
        self._in_flight_bytes += size
        await self._settle(IN_FLIGHT_BYTES)

    async def drain(self) -> None:
        await self._settle(0)

    async def abandon(self) -> None:
        """Lets what is in flight land or fail before the request answers, without raising."""
        await asyncio.gather(*(f for f, _ in self._in_flight), return_exceptions=True)
        self._in_flight.clear()
        self._in_flight_bytes = 0

    async def _settle(self, at_most: int) -> None:
        while self._in_flight and (at_most == 0 or self._in_flight_bytes > at_most):
            future, size = self._in_flight[0]
            try:
                await future
            except KafkaError as error:
                await self.abandon()
                log.warning("Kafka did not acknowledge a command: %r", error)
                raise unavailable("Kafka did not acknowledge the command; retry shortly") from None
            self._in_flight.popleft()
            self._in_flight_bytes -= size


class Watcher:
    """Waits for the projection to bring this process's index to a state."""

    def __init__(self, projection: Projection) -> None:
        self.projection = projection

    async def until(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        """check's first non-None answer; check reads the index (in a thread)."""
        deadline = time.monotonic() + timeout
        changed = self.projection.changed
        while True:
            # Read before the check: if a batch lands while the check runs, the count differs
            # and the check runs again instead of waiting for a notification already sent.
            seen = self.projection.applied
            found = await asyncio.to_thread(check)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise unavailable(f"{what}: not seen in the event log within {timeout:.0f}s")
            async with changed:
                if self.projection.applied != seen:
                    continue
                try:
                    await asyncio.wait_for(changed.wait(), min(remaining, RECHECK_SECONDS))
                except TimeoutError:
                    pass


async def caught_up(barrier: ReadBarrier, repository: str | None = None) -> None:
    """The index holds every event the log had (the repository's partition, or all): a check
    made next sees what another replica acknowledged a moment ago. 503 when it cannot."""
    try:
        await barrier.caught_up(repository)
    except Behind as behind:
        raise unavailable(f"the index is behind the log: {behind}") from None
