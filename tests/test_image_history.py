"""`layerlog history --repo R --tag T`: every digest a tag pointed to, when, and the command
that moved it, from repository events and commands on the real topics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from services.core.records import DeleteTag, PutManifest, TagDeleted, new_id
from services.core.settings import Settings
from services.oci.manifest import OCI_MANIFEST
from tests.conftest import own_topics, run_cli
from tests.registry_events import (
    EventWriter,
    image_manifest,
    repository_event,
    unique_repository,
)


@pytest.fixture(scope="module")
async def settings(settings: Settings) -> AsyncIterator[Settings]:
    """This module writes events and commands straight onto the log: its own topics, so that no
    other module's worker applies them and no other module's reader meets its odd records."""
    async with own_topics(settings, "image-history") as own:
        yield own


async def put(events: EventWriter, name: str, seed: str, tag: str, previous: str | None) -> str:
    """A PutManifest on the commands topic and the events the worker answers it with."""
    body = image_manifest(seed)
    cause = new_id()
    digest = await events.manifest(name, body, tag=tag, previous=previous, command_id=cause)
    fields = {"repository": name, "reference": tag, "digest": digest, "body": body}
    await events.command(PutManifest(media_type=OCI_MANIFEST, command_id=cause, **fields))
    return digest


async def test_the_history_of_a_tag_lists_every_digest_and_the_command_that_moved_it(
    settings, cli_env, capsys
):
    name = unique_repository("history/image")
    async with EventWriter(settings) as events:
        first = await put(events, name, "first latest", "latest", None)
        second = await put(events, name, "second latest", "latest", first)
        # Another tag of the repository, and the same tag of another repository: not this story.
        await put(events, name, "another tag", "stable", None)
        await put(events, unique_repository("history/elsewhere"), "elsewhere", "latest", None)
        untag = DeleteTag(repository=name, tag="latest")
        await events.command(untag)
        untagged = dict(tag="latest", previous_digest=second)
        await events.events(repository_event(TagDeleted, name, untag.command_id, **untagged))
        # A move whose command is no longer in the commands topic.
        third = await put(events, name, "third latest", "other", None)
        gone = new_id()
        await events.move(name, "latest", third, None, gone)

    status, out, err = await run_cli(capsys, "history", "--repo", name, "--tag", "latest", "--json")
    assert status == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line["event"], line["digest"], line["previous_digest"]) for line in lines] == [
        ("TagMoved", first, None),
        ("TagMoved", second, first),
        ("TagDeleted", None, second),
        ("TagMoved", third, None),
    ]
    assert {line["repository"] for line in lines} == {name}
    assert [line["command"] and line["command"]["type"] for line in lines] == [
        "PutManifest",
        "PutManifest",
        "DeleteTag",
        None,
    ]
    assert [line["command_status"] for line in lines] == ["found", "found", "found", "gone"]
    assert lines[2]["caused_by"] == untag.command_id
    assert lines[3]["caused_by"] == gone
    # One partition, the repository key's; in log order.
    assert len({line["partition"] for line in lines}) == 1
    offsets = [line["offset"] for line in lines]
    assert offsets == sorted(offsets)
    times = [line["time"] for line in lines]
    assert times == sorted(times)

    status, table, _ = await run_cli(capsys, "history", "--repo", name, "--tag", "latest")
    assert status == 0
    header, columns, *rows = table.splitlines()
    assert header.startswith(f"tag {name}:latest")
    assert columns.split()[:3] == ["TIME", "(UTC)", "EVENT"]
    assert len(rows) == 5  # four changes and the note on the command that is gone
    assert first in rows[0] and "PutManifest" in rows[0]
    assert second in rows[1] and first in rows[1]
    assert "(deleted)" in rows[2] and "DeleteTag" in rows[2]
    assert f"{gone[:8]} (gone)" in rows[3]
    assert "no longer in the commands topic" in rows[4]


async def test_a_tag_never_moved_and_bad_usage(settings, cli_env, capsys):
    name = unique_repository("history/none")
    status, out, err = await run_cli(capsys, "history", "--repo", name, "--tag", "latest")
    assert (status, out) == (1, "") and "no moves" in err
    status, _, err = await run_cli(capsys, "history", "--tag", "latest")
    assert status == 2
    status, _, err = await run_cli(
        capsys, "history", "--repo", name, "--tag", "latest", "--digest", "sha256:" + "0" * 64
    )
    assert status == 2 and "--tag" in err
