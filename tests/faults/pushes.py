"""crane pushes to the registry while the fault tests kill services, and the checks they end with:
every pushed image pulls back byte for byte, every tag names its last successful push, and the
log holds each manifest PUT's effects exactly once.

Pushes to one tag run one after another, so "the last successful push" is well defined; pushes
to different tags run side by side, and images of one repository share a base layer, so two
pushes upload the same blob to the same repository at once.
"""

from __future__ import annotations

import asyncio
import filecmp
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.core.codec import CODEC
from services.core.eventlog import read_partition
from services.core.kafka import connection
from services.core.principals import Principal
from services.core.records import (
    ManifestStored,
    PutManifest,
    RepositoryCommandRejected,
    RepositoryEvent,
    TagMoved,
)
from services.core.settings import Settings
from services.oci.references import is_digest
from tests.layers import random_tar
from tests.registry.clients import CLIENT_TIMEOUT, client_path
from tests.registry.images import LAYER_TAR, Descriptor, Layout, sha256, write_random_tar_layer

MIB = 1 << 20
# (repository, tag): two tags of one repository, so concurrent pushes share its blobs.
TAGS = (("faults/reg-0", "a"), ("faults/reg-0", "b"), ("faults/reg-1", "a"), ("faults/reg-2", "a"))
# Each tag gets at least MIN pushes, then more until the kills are over (so crane is mid-push at
# every kill), and never more than MAX: the test stays bounded even if the kills stall.
MIN_PUSHES_PER_TAG = 3
MAX_PUSHES_PER_TAG = 10
# A push that fails (the registry was killed under it, or is still starting) is run again.
# crane retries some errors itself; these bound ours: ATTEMPTS runs, the pause between two
# growing by a second each time up to MAX_PAUSE (about a minute for the registry to come back).
ATTEMPTS = 12
MAX_PAUSE = 5.0


@dataclass(frozen=True)
class Pushed:
    repository: str
    tag: str
    layout: Layout
    manifest: Descriptor
    attempts: int  # crane runs it took; more than 1 when a kill interrupted it


@dataclass
class Pushes:
    host: str  # HOST:PORT of the registry
    pushed: list[Pushed] = field(default_factory=list)  # in completion order
    last: dict[tuple[str, str], str] = field(default_factory=dict)  # (repo, tag): digest
    running: int = 0  # crane push processes running now
    # Of those, the ones sending a manifest PUT: pid -> (repository, tag) of the PUT.
    putting: dict[int, tuple[str, str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # why attempts failed, for the report
    answers: list[str] = field(default_factory=list)  # crane's log of each manifest PUT's answer

    def follow(self, pid: int, line: str) -> None:
        """Notes, from crane --verbose's request log, which cranes are sending a manifest PUT:
        "--> PUT URL" as it sends one, "<-- STATUS URL" (or an error) once it is answered."""
        if not line:
            self.putting.pop(pid, None)  # crane is exiting
            return
        if "/manifests/" not in line:
            return
        if " --> PUT " in line:
            path = line.split("/v2/", 1)[1].split()[0]  # <repository>/manifests/<tag>
            repository, tag = path.rsplit("/manifests/", 1)
            self.putting[pid] = (repository, tag)
        elif " <-- " in line and pid in self.putting:
            del self.putting[pid]
            self.answers.append(line.split(" <-- ", 1)[1].strip()[-200:])

    def ref(self, repository: str, reference: str) -> str:
        separator = "@" if is_digest(reference) else ":"
        return f"{self.host}/{repository}{separator}{reference}"


async def crane(
    *args: str,
    timeout: float = CLIENT_TIMEOUT,
    on_line: Callable[[int, str], None] | None = None,
) -> tuple[int, bytes, bytes]:
    """Runs crane against the plain-HTTP registry without holding a thread (the SDK uploads
    beside it need the default executor); killed, and the test failed, after timeout. on_line
    sees each stderr line as it comes, with crane's pid, then "" at the end of stderr."""
    process = await asyncio.create_subprocess_exec(
        client_path("crane"),
        "--insecure",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,  # --verbose dumps a manifest's body on one line
    )
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = process.stdout, process.stderr

    async def errors() -> bytes:
        lines = []
        while line := await stderr.readline():
            lines.append(line)
            if on_line is not None:
                on_line(process.pid, line.decode(errors="replace"))
        if on_line is not None:
            on_line(process.pid, "")  # the end of stderr: crane is exiting
        return b"".join(lines)

    try:
        out, err, _ = await asyncio.wait_for(
            asyncio.gather(stdout.read(), errors(), process.wait()), timeout
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"crane {' '.join(args)} did not finish within {timeout:.0f}s")
    assert process.returncode is not None
    return process.returncode, out, err


async def crane_ok(*args: str) -> bytes:
    code, out, err = await crane(*args)
    if code != 0:
        pytest.fail(f"crane {' '.join(args)} exited {code}:\n{err.decode(errors='replace')}")
    return out


def build_image(path: Path, base: bytes, seed: int) -> tuple[Layout, Descriptor]:
    """A layout of one image: the repository's shared base layer, then one or two layers of
    1-8 MiB random bytes of its own."""
    rng = random.Random(seed)
    layout = Layout(path)
    layers = [(layout.add_blob(base, LAYER_TAR), sha256(base))]
    for _ in range(rng.randint(1, 2)):
        blob = write_random_tar_layer(layout, rng.randint(MIB, 8 * MIB))
        layers.append((blob, blob.digest))  # uncompressed: the diff id is the digest
    return layout, layout.add_image(layers)


async def push(pushes: Pushes, repository: str, tag: str, layout: Layout, manifest: Descriptor):
    """crane push, run again while it fails, up to ATTEMPTS runs; recorded once it succeeds."""
    ref = pushes.ref(repository, tag)
    for attempt in range(1, ATTEMPTS + 1):
        pushes.running += 1
        try:
            code, out, err = await crane(
                "--verbose", "push", str(layout.path), ref, on_line=pushes.follow
            )
        finally:
            pushes.running -= 1
        if code == 0:
            # crane prints the reference by digest: the registry kept the manifest's bytes.
            assert out.decode().strip() == f"{pushes.host}/{repository}@{manifest.digest}"
            pushes.pushed.append(Pushed(repository, tag, layout, manifest, attempt))
            pushes.last[(repository, tag)] = manifest.digest
            return
        why = [line for line in err.decode(errors="replace").splitlines() if "Error:" in line]
        why = why[-1:] or ["(no error line)"]
        pushes.failures.append(f"{ref} attempt {attempt}: exit {code}: {why[0][:300]}")
        await asyncio.sleep(min(attempt, MAX_PAUSE))
    pytest.fail(f"crane push {ref} failed {ATTEMPTS} times:\n" + "\n".join(pushes.failures))


async def until_crane_runs(
    pushes: Pushes, *, putting_manifest: bool = False, timeout: float = 120.0
) -> None:
    """Until some crane push is running (not pausing between attempts), or, with
    putting_manifest, is sending a manifest PUT: a kill then lands on one mid-push."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (pushes.putting if putting_manifest else pushes.running):
        if asyncio.get_running_loop().time() > deadline:
            what = "sending a manifest PUT" if putting_manifest else "running"
            pytest.fail(f"no crane push {what} for {timeout:.0f}s: {pushes.failures}")
        await asyncio.sleep(0.01)


async def until_manifest_put_logged(
    settings: Settings, pushes: Pushes, timeout: float = 120.0
) -> None:
    """Until a PutManifest reaches the commands topic while a crane still waits for its PUT's
    answer: a kill then lands after the registry put the command on the log and before it
    answered (the worker may or may not have applied it yet)."""
    repositories = {repository.encode() for repository, _ in TAGS}
    consumer = AIOKafkaConsumer(
        **connection(settings, Principal.AUDITOR),
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * MIB,  # whole AppendChunk records, which are skipped
        fetch_max_wait_ms=10,  # the worker applies a command in tens of milliseconds
    )
    await consumer.start()
    try:
        topic = settings.commands_topic
        partitions = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)  # resolves the end now: nothing later is missed
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=20)
            for record in (r for records in batch.values() for r in records):
                # Repository commands are keyed by the repository; only those are decoded.
                if record.key in repositories and pushes.putting:
                    command = CODEC.decode(record.value or b"")
                    # The PUT of this very command still waits for its answer.
                    putting = set(pushes.putting.values())
                    if isinstance(command, PutManifest) and (
                        (command.repository, command.reference) in putting
                    ):
                        return
        pytest.fail(f"no PutManifest logged during a manifest PUT within {timeout:.0f}s")
    finally:
        await consumer.stop()


async def run_pushes(pushes: Pushes, scratch: Path, seed: int, kills_done: asyncio.Event) -> None:
    """Each tag's pushes one after another, the tags side by side."""
    bases = {
        repo: random_tar(seed + n, files=3, max_size=MIB)
        for n, repo in enumerate(sorted({repo for repo, _ in TAGS}))
    }

    async def chain(number: int, repository: str, tag: str) -> None:
        def build(count: int) -> tuple[Layout, Descriptor]:
            path = scratch / f"image-{number}-{count}"
            return build_image(path, bases[repository], seed * 1000 + number * 100 + count)

        # The next image is built while this one is pushed: no gap between pushes.
        upcoming: asyncio.Task[tuple[Layout, Descriptor]] | None = asyncio.create_task(
            asyncio.to_thread(build, 0)
        )
        count = 0
        while upcoming is not None:
            layout, manifest = await upcoming
            count += 1
            upcoming = None
            if count < MAX_PUSHES_PER_TAG:
                upcoming = asyncio.create_task(asyncio.to_thread(build, count))
            await push(pushes, repository, tag, layout, manifest)
            if count >= MIN_PUSHES_PER_TAG and kills_done.is_set():
                break
        if upcoming is not None:
            await upcoming  # built for nothing; its thread is let finish

    await asyncio.gather(*(chain(n, repo, tag) for n, (repo, tag) in enumerate(TAGS)))


async def assert_pushes_pull_back(pushes: Pushes, scratch: Path) -> None:
    """Every pushed image, by digest, pulls back byte for byte: manifest, config, layers."""
    for number, pushed in enumerate(pushes.pushed):
        ref = pushes.ref(pushed.repository, pushed.manifest.digest)
        manifest = await crane_ok("manifest", ref)
        assert manifest == pushed.layout.blob_path(pushed.manifest.digest).read_bytes(), ref
        document = json.loads(manifest)
        digests = [document["config"]["digest"], *(d["digest"] for d in document["layers"])]
        pulled = scratch / f"pulled-{number}"
        await crane_ok("pull", "--format", "oci", ref, str(pulled))
        for digest in [pushed.manifest.digest, *digests]:
            copy = pulled / "blobs" / "sha256" / digest.removeprefix("sha256:")
            assert filecmp.cmp(copy, pushed.layout.blob_path(digest), shallow=False), (
                f"{ref}: {digest} pulled back different bytes"
            )


async def assert_tags_point_at_last_push(pushes: Pushes) -> None:
    """GET by tag on the (restarted) registry answers the manifest of its last successful push."""
    assert set(pushes.last) == set(TAGS)
    for (repository, tag), digest in pushes.last.items():
        manifest = await crane_ok("manifest", pushes.ref(repository, tag))
        assert sha256(manifest) == digest, f"{repository}:{tag} is {sha256(manifest)}, not {digest}"


async def assert_manifest_puts_applied_once(settings: Settings, pushes: Pushes) -> int:
    """Each PutManifest on the commands topic has exactly one ManifestStored and, for a tag, one
    TagMoved (kills made the worker apply batches again); every tag's moves form one chain from
    nothing to its last successful push. Returns how many PutManifest commands there were."""
    puts: dict[str, PutManifest] = {}
    events: list[RepositoryEvent] = []
    for partition in range(settings.partitions):
        async for logged in read_partition(settings, settings.commands_topic, partition):
            if isinstance(logged.record, PutManifest):
                puts[logged.record.command_id] = logged.record
        async for logged in read_partition(settings, settings.events_topic, partition):
            if isinstance(logged.record, RepositoryEvent):
                events.append(logged.record)
    ids = Counter(event.event_id for event in events)
    assert [i for i, n in ids.items() if n > 1] == [], "repository events published twice"
    caused: dict[str, Counter[type]] = defaultdict(Counter)
    for event in events:
        caused[event.caused_by or ""][type(event)] += 1
    for command_id, put in puts.items():
        kinds = caused[command_id]
        assert kinds[RepositoryCommandRejected] == 0, f"{put.reference} refused: {command_id}"
        assert kinds[ManifestStored] == 1, f"{command_id}: {kinds[ManifestStored]} ManifestStored"
        moves = 0 if is_digest(put.reference) else 1
        assert kinds[TagMoved] == moves, f"{command_id}: {kinds[TagMoved]} TagMoved"
    assert {p.digest for p in puts.values()} >= {p.manifest.digest for p in pushes.pushed}
    # One repository, one partition: its TagMoved events are in the order they were applied.
    heads: dict[tuple[str, str], str | None] = {}
    for event in events:
        if isinstance(event, TagMoved):
            key = (event.repository, event.tag)
            assert event.previous_digest == heads.get(key), f"{key} moved from a stale digest"
            heads[key] = event.digest
    assert heads == pushes.last, "the log's tags do not end at the last successful pushes"
    return len(puts)
