"""THE RACE: a push (or a mount) of a digest whose only copy a sweep is reclaiming must never lose
its bytes. Either the sweep sees the new link (or the push's hold) and keeps the copy, or the push
stores a copy of its own.

Each iteration makes a digest that nothing links (pushed to a repository, then deleted from it:
the collector's candidate), then runs one interleaving on purpose: the collector's phases (mark,
withdraw, check, reclaim; services/gc/sweep.py) are called by the test one at a time, and the
in-process verifier and upload worker are stopped at a checkpoint (services/core/checkpoints.py)
between them, or killed there, as a crash. Pushes go through the SDK and through the registry
(aiohttp: a mount by content discovery, then a monolithic upload), mounts as MountBlob commands.
After every iteration, on the real Kafka and S3:

- every blob a repository links is served (registry GET), byte for byte, from a copy in S3;
- no reclaimed copy is served by any linked repository, and its object is gone;
- `audit verify` over the whole log is clean, which also checks each BlobReclaimed against the
  links at its cut (no repository linked the digest for UNLINKED, none served the copy) and that
  no link names reclaimed bytes afterwards.

LAYERLOG_GC_RACE_ITERATIONS (default 72: six of each of the twelve interleavings) sets how many
run.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest

from services.audit.verify import verify_log
from services.core.checkpoints import Step
from services.core.objectstore import ObjectNotFound
from services.core.records import MountBlob, ReclaimReason
from services.gc.plan import KeptReason
from services.gc.sweep import Report
from tests.gc_stack import GcStack, gc_stack, sha256, until
from tests.repository_log import produce

pytestmark = pytest.mark.timeout(900)

ITERATIONS = int(os.environ.get("LAYERLOG_GC_RACE_ITERATIONS", "72"))
OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module")
async def stack(settings, tmp_path_factory) -> GcStack:
    async with gc_stack(settings, tmp_path_factory.mktemp("gc-race"), "gcrace") as running:
        yield running
    print("\ngc race outcomes:", dict(sorted(OUTCOMES.items())))


@pytest.fixture(scope="module")
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


EXPECTED: dict[str, bytes] = {}  # every digest pushed, with its bytes


@dataclass
class Dead:
    """A digest nothing links: its one copy is the sweep's candidate."""

    digest: str
    data: bytes
    key: str  # its copy
    source: str  # the repository it was pushed to and deleted from
    target: str  # where the racing push or mount goes


async def dead_digest(stack: GcStack, http: aiohttp.ClientSession, label: str) -> Dead:
    data = label.encode() + os.urandom(int.from_bytes(os.urandom(2)) % 30_000 + 1_000)
    digest = sha256(data)
    EXPECTED[digest] = data
    source, target = f"race/{label}/src", f"race/{label}/dst"
    await stack.push(source, data)
    await stack.caught_up()
    row = stack.index.blob(source, digest)
    assert row is not None
    await stack.unlink(http, source, digest)
    await stack.caught_up()
    return Dead(digest, data, row.object_key, source, target)


async def served_copy(stack: GcStack, repository: str, digest: str) -> str | None:
    await stack.caught_up()
    row = stack.index.blob(repository, digest)
    return None if row is None else row.object_key


def reclaimed(report: Report, dead: Dead) -> bool:
    return dead.key in {c.object_key for c in report.reclaimed}


def kept(report: Report, dead: Dead) -> KeptReason | None:
    return next((k.reason for k in report.kept if k.candidate.object_key == dead.key), None)


async def gone(stack: GcStack, key: str) -> bool:
    try:
        await stack.store.stat(key)
        return False
    except ObjectNotFound:
        return True


# The interleavings. Each returns a label for the tally.


async def push_before_mark(stack: GcStack, http, dead: Dead) -> str:
    await stack.push(dead.target, dead.data)
    report = await stack.sweeper.sweep()
    assert not reclaimed(report, dead)
    assert await served_copy(stack, dead.target, dead.digest) == dead.key  # deduplicated
    return "kept: linked before the mark"


async def link_between_mark_and_check(stack: GcStack, http, dead: Dead) -> str:
    plan = await stack.sweeper.mark()
    assert dead.key in {c.object_key for c in plan.candidates}
    await stack.push(dead.target, dead.data)  # the pointer is still there: deduplicated
    await stack.sweeper.withdraw(plan)
    await stack.sweeper.check(plan)
    report = await stack.sweeper.reclaim(plan)
    assert not reclaimed(report, dead)
    reason = kept(report, dead)
    assert reason in (KeptReason.RACING_LINK, KeptReason.HOLD)
    assert await served_copy(stack, dead.target, dead.digest) == dead.key
    return f"kept: {reason}"


async def pointer_read_before_withdraw(stack: GcStack, http, dead: Dead) -> str:
    # The verifier read the pointer (naming the copy) and stops before its hold; the sweep then
    # withdraws, checks and reclaims; the verifier's second read finds no pointer.
    pause = stack.pauses.arm(Step.VERIFIER_POINTER_READ, dead.digest)
    push = asyncio.create_task(stack.push(dead.target, dead.data))
    await pause.wait_reached()
    plan = await stack.sweeper.mark()
    await stack.sweeper.withdraw(plan)
    await stack.sweeper.check(plan)
    report = await stack.sweeper.reclaim(plan)
    assert reclaimed(report, dead), report.kept
    assert await gone(stack, dead.key)
    pause.go.set()
    await push
    own = await served_copy(stack, dead.target, dead.digest)
    assert own is not None and own != dead.key
    return "reclaimed; the push kept its own copy"


async def hold_after_listing_copy_chosen_before_delete(stack: GcStack, http, dead: Dead) -> str:
    # The sharpest one: the verifier read the pointer before the withdrawal, but writes its hold
    # only after the sweep listed the holds, and chooses its copy before the delete. Only its
    # second pointer read (after its hold) saves it: it finds no pointer and keeps its own.
    first = stack.pauses.arm(Step.VERIFIER_POINTER_READ, dead.digest)
    push = asyncio.create_task(stack.push(dead.target, dead.data))
    await first.wait_reached()
    plan = await stack.sweeper.mark()
    await stack.sweeper.withdraw(plan)
    await stack.sweeper.check(plan)
    assert dead.key in {c.object_key for c in plan.candidates}  # no hold was there to see
    chosen = stack.pauses.arm(Step.VERIFIER_COPY_CHOSEN, dead.digest)
    first.go.set()
    await chosen.wait_reached()
    report = await stack.sweeper.reclaim(plan)
    assert reclaimed(report, dead)
    chosen.go.set()
    await push
    own = await served_copy(stack, dead.target, dead.digest)
    assert own is not None and own != dead.key
    return "reclaimed; the push chose its own copy after its hold"


async def _held(stack: GcStack, dead: Dead, step: Step) -> str:
    pause = stack.pauses.arm(step, dead.digest)
    push = asyncio.create_task(stack.push(dead.target, dead.data))
    await pause.wait_reached()
    plan = await stack.sweeper.mark()
    await stack.sweeper.withdraw(plan)
    await stack.sweeper.check(plan)
    report = await stack.sweeper.reclaim(plan)
    assert not reclaimed(report, dead)
    assert kept(report, dead) == KeptReason.HOLD
    pause.go.set()
    await push
    assert await served_copy(stack, dead.target, dead.digest) == dead.key
    after = await stack.sweeper.sweep()
    assert not reclaimed(after, dead)
    return f"kept: hold ({step})"


async def hold_before_withdraw(stack: GcStack, http, dead: Dead) -> str:
    return await _held(stack, dead, Step.VERIFIER_COPY_CHOSEN)


async def verdict_stored_before_withdraw(stack: GcStack, http, dead: Dead) -> str:
    return await _held(stack, dead, Step.VERIFIER_DECIDED)


async def _crash(stack: GcStack, dead: Dead, step: Step) -> str:
    # The verdict naming the copy is stored, then the verifier dies before publishing it. Every
    # sweep until the replayed verdict is in the log keeps the copy.
    pause = stack.pauses.arm(step, dead.digest)
    push = asyncio.create_task(stack.push(dead.target, dead.data))
    await pause.wait_reached()
    await stack.kill("verifier")
    report = await stack.sweeper.sweep()
    assert not reclaimed(report, dead)
    assert kept(report, dead) == KeptReason.HOLD
    stack.start("verifier")
    await push
    assert await served_copy(stack, dead.target, dead.digest) == dead.key
    assert not reclaimed(await stack.sweeper.sweep(), dead)
    return f"kept: hold across a verifier crash ({step})"


async def crash_after_verdict_stored(stack: GcStack, http, dead: Dead) -> str:
    return await _crash(stack, dead, Step.VERIFIER_VERDICT_STORED)


async def crash_after_own_copy_deleted(stack: GcStack, http, dead: Dead) -> str:
    return await _crash(stack, dead, Step.VERIFIER_DECIDED)


async def push_after_withdraw(stack: GcStack, http, dead: Dead) -> str:
    plan = await stack.sweeper.mark()
    await stack.sweeper.withdraw(plan)
    await stack.push(dead.target, dead.data)  # no pointer: a copy of its own
    own = await served_copy(stack, dead.target, dead.digest)
    assert own is not None and own != dead.key
    await stack.sweeper.check(plan)
    report = await stack.sweeper.reclaim(plan)
    assert not reclaimed(report, dead)
    assert kept(report, dead) == KeptReason.RACING_LINK
    # The next sweep takes the old copy: its digest is linked, through the new one.
    after = await stack.sweeper.sweep()
    (copy,) = [c for c in after.reclaimed if c.object_key == dead.key]
    assert copy.reason == ReclaimReason.UNNAMED_COPY
    assert await served_copy(stack, dead.target, dead.digest) == own
    return "kept: racing link, then reclaimed as an unnamed copy"


async def registry_push_during_check(stack: GcStack, http, dead: Dead) -> str:
    plan = await stack.sweeper.mark()
    await stack.sweeper.withdraw(plan)

    async def sweep_on() -> Report:
        await stack.sweeper.check(plan)
        return await stack.sweeper.reclaim(plan)

    _, report = await asyncio.gather(stack.registry_push(http, dead.target, dead.data), sweep_on())
    outcome = "reclaimed at once" if reclaimed(report, dead) else f"kept: {kept(report, dead)}"
    if not reclaimed(report, dead):
        assert kept(report, dead) in (KeptReason.RACING_LINK, KeptReason.HOLD)
        assert reclaimed(await stack.sweeper.sweep(), dead)
    assert await gone(stack, dead.key)
    status, body = await stack.registry_get(http, dead.target, dead.digest)
    assert status == 200 and body == dead.data
    return f"registry push: {outcome}"


async def mount(stack: GcStack, dead: Dead) -> str:
    command = MountBlob(repository=dead.target, digest=dead.digest, source_repository=dead.source)
    await produce(stack.settings, [command])
    return command.command_id


async def outcome_of(stack: GcStack, command_id: str):
    async def known() -> bool:
        await stack.caught_up()
        return stack.index.outcome(command_id) is not None

    await until(known, what=f"the outcome of {command_id}")
    return stack.index.outcome(command_id)


async def mount_resolved_before_withdraw(stack: GcStack, http, dead: Dead) -> str:
    pause = stack.pauses.arm(Step.WORKER_MOUNT_RESOLVED, dead.digest)
    command_id = await mount(stack, dead)
    await pause.wait_reached()
    plan = await stack.sweeper.mark()
    await stack.sweeper.withdraw(plan)
    await stack.sweeper.check(plan)
    report = await stack.sweeper.reclaim(plan)
    assert not reclaimed(report, dead)
    assert kept(report, dead) == KeptReason.HOLD
    pause.go.set()
    outcome = await outcome_of(stack, command_id)
    assert outcome.applied and outcome.kinds == ("BlobMounted",)
    assert await served_copy(stack, dead.target, dead.digest) == dead.key
    assert not reclaimed(await stack.sweeper.sweep(), dead)
    return "kept: hold (mount)"


async def mount_after_withdraw(stack: GcStack, http, dead: Dead) -> str:
    plan = await stack.sweeper.mark()
    await stack.sweeper.withdraw(plan)
    outcome = await outcome_of(stack, await mount(stack, dead))
    assert not outcome.applied and outcome.reason == "BLOB_UNKNOWN"
    await stack.sweeper.check(plan)
    report = await stack.sweeper.reclaim(plan)
    assert reclaimed(report, dead)
    assert await served_copy(stack, dead.target, dead.digest) is None
    return "reclaimed; the mount was refused (BLOB_UNKNOWN)"


Interleaving = Callable[[GcStack, aiohttp.ClientSession, Dead], Awaitable[str]]
INTERLEAVINGS: list[Interleaving] = [
    push_before_mark,
    link_between_mark_and_check,
    pointer_read_before_withdraw,
    hold_after_listing_copy_chosen_before_delete,
    hold_before_withdraw,
    verdict_stored_before_withdraw,
    crash_after_verdict_stored,
    crash_after_own_copy_deleted,
    push_after_withdraw,
    registry_push_during_check,
    mount_resolved_before_withdraw,
    mount_after_withdraw,
]


async def assert_nothing_lost(stack: GcStack, http: aiohttp.ClientSession) -> None:
    await stack.caught_up()
    served = {}
    for repository, digest in stack.linked():
        row = stack.index.blob(repository, digest)
        assert row is not None, f"{repository} links {digest}, which no index serves"
        served[row.object_key] = (repository, digest)
        assert await stack.store.get(row.object_key) == EXPECTED[digest], (repository, digest)
        status, body = await stack.registry_get(http, repository, digest)
        assert status == 200 and body == EXPECTED[digest], (repository, digest, status)
    for row in stack.index.reclaims():
        assert row.object_key not in served, f"reclaimed {row.object_key} is served"
        if row.kind == "blob":
            assert await gone(stack, row.object_key), row.object_key
    report = await verify_log(stack.settings)
    assert report.breaks == [], "\n".join(map(str, report.breaks))


@pytest.mark.parametrize(
    "iteration",
    [
        pytest.param(i, id=f"{i:02d}-{INTERLEAVINGS[i % len(INTERLEAVINGS)].__name__}")
        for i in range(ITERATIONS)
    ],
)
async def test_a_push_racing_a_sweep_never_loses_its_bytes(stack, http, iteration):
    interleaving = INTERLEAVINGS[iteration % len(INTERLEAVINGS)]
    dead = await dead_digest(stack, http, f"i{iteration:02d}")
    try:
        OUTCOMES[await interleaving(stack, http, dead)] += 1
    finally:
        # A failed iteration must not leave a service stopped (or dead) for the next ones.
        stack.pauses.release_all()
        if "verifier" not in stack.tasks:
            stack.start("verifier")
    await assert_nothing_lost(stack, http)
