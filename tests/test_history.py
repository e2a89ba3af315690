"""`layerlog history`: an upload's events in log order with the commands that caused them."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from services.audit import history
from services.audit.history import CommandStatus
from services.client import LayerInvalidDigest, LayerService
from services.core.codec import CODEC
from services.core.kafka import connection
from services.core.principals import Principal
from services.core.records import StartUpload, UploadStarted, derived_id
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("stack_services")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push(settings, name: str, data: bytes, digest: str | None = None) -> str:
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        upload = await service.upload(name)
        await upload.write(data)
        await upload.finish(len(data), digest or sha256(data))
        return upload.uuid


async def test_an_upload_history_pairs_every_event_with_its_command(settings):
    data = bytes(range(256)) * 1000  # 256000 bytes: 4 chunks of 64 KiB
    upload_id = await push(settings, "history/one", data)
    found = await history.upload_history(settings, upload_id)
    assert found is not None
    assert found.state == "committed"
    names = [entry.name for entry in found.entries]
    assert names == [
        "UploadStarted",
        *["ChunkAppended"] * 4,
        "UploadFinished",
        "LayerCommitted",
    ]
    offsets = [entry.logged.offset for entry in found.entries if entry.logged]
    assert offsets == sorted(offsets)
    assert [e.command_status for e in found.entries] == [CommandStatus.FOUND] * 7, [
        (e.name, e.command_id, e.logged and (e.logged.offset, e.logged.timestamp_ms), e.command)
        for e in found.entries
    ]
    causes = [entry.command.kind for entry in found.entries if entry.command]
    assert causes == ["StartUpload", *["AppendChunk"] * 4, "FinishUpload", "FinishUpload"]
    # Sizes and digests are there; the chunk bytes are not.
    appended = [e for e in found.entries if e.name == "ChunkAppended"]
    assert [e.command.details for e in appended] == [
        {"offset": n * 65536, "length": min(65536, len(data) - n * 65536)} for n in range(4)
    ]
    committed = found.entries[-1].logged.event
    assert committed.digest == sha256(data) and committed.size == len(data)


async def test_json_lines_carry_every_field_and_no_bytes(settings, cli_env, capsys):
    data = b"json lines for history " * 5000
    upload_id = await push(settings, "history/json", data)
    status, out, _ = await run_cli(capsys, "history", upload_id, "--json")
    assert status == 0
    found = [json.loads(line) for line in out.splitlines()]
    assert [line["event"] for line in found][-1] == "LayerCommitted"
    assert {line["upload_id"] for line in found} == {upload_id}
    chunk = next(line for line in found if line["event"] == "ChunkAppended")
    assert chunk["details"]["length"] == 65536  # the SDK's chunk size in push()
    assert chunk["command"]["type"] == "AppendChunk"
    assert chunk["command"]["details"] == {"offset": 0, "length": 65536}
    assert "data" not in chunk["command"]["details"]
    assert max(len(line) for line in out.splitlines()) < 2000
    finished = next(line for line in found if line["event"] == "UploadFinished")
    assert finished["details"]["digest"] == sha256(data)
    assert finished["command_status"] == "found"


async def test_the_table_shows_verdicts_and_causes(settings, cli_env, capsys):
    data = b"a layer that will not verify" * 100
    with pytest.raises(LayerInvalidDigest):
        await push(settings, "history/failed", data, digest="sha256:" + "0" * 64)
    found = await history.repository_history(settings, "history/failed")
    [failed] = found
    status, out, _ = await run_cli(capsys, "history", failed.upload_id)
    assert status == 0
    header, columns, *rows = out.splitlines()
    assert failed.upload_id in header and "state failed" in header
    assert columns.split()[:3] == ["TIME", "(UTC)", "EVENT"]
    assert "LayerValidationFailed" in rows[-1]
    assert "FinishUpload" in rows[-1]
    assert "reason=INVALID_DIGEST" in rows[-1]
    assert f"actual={sha256(data)}" in rows[-1]


async def test_repo_scans_for_every_upload_and_filters_by_digest(settings):
    first, second = b"first layer of history/many" * 50, b"second layer of history/many" * 50
    ids = [
        await push(settings, "history/many", first),
        await push(settings, "history/many", second),
    ]
    # A name that contains the one asked for must not match it.
    await push(settings, "history/many-more", b"not in history/many" * 50)
    everything = await history.repository_history(settings, "history/many")
    assert [h.upload_id for h in everything] == ids
    assert {h.repository for h in everything} == {"history/many"}
    only = await history.repository_history(settings, "history/many", sha256(second))
    assert [h.upload_id for h in only] == [ids[1]]
    assert await history.repository_history(settings, "history/none") == []


async def test_a_command_outside_the_time_window_is_still_found(settings):
    """The commands partition is read around the events first; a command whose timestamp is
    outside that window (a client clock ahead of the broker's) is found by reading the rest."""
    upload_id = str(uuid.uuid4())
    command = StartUpload(upload_id=upload_id, repository="history/skewed")
    producer = AIOKafkaProducer(**connection(settings, Principal.CLIENT), acks="all")
    await producer.start()
    try:
        ahead = int(time.time() * 1000) + 10 * 60 * 1000  # past WINDOW_MARGIN_MS
        await producer.send_and_wait(
            settings.commands_topic,
            CODEC.encode(command),
            key=upload_id.encode(),
            timestamp_ms=ahead,
        )
    finally:
        await producer.stop()
    deadline = time.monotonic() + 30
    while (found := await history.upload_history(settings, upload_id)) is None:
        assert time.monotonic() < deadline, "the worker did not start the upload"
        await asyncio.sleep(0.2)
    [started] = found.entries
    assert started.name == "UploadStarted"
    assert started.command_status == CommandStatus.FOUND
    assert started.command.command_id == command.command_id


async def test_a_command_no_longer_kept_is_reported_gone(settings, cli_env, capsys):
    # An event whose command is not in the commands topic, as after the 7 days it is kept.
    upload_id = str(uuid.uuid4())
    event = UploadStarted(
        event_id=derived_id(upload_id, "UploadStarted"),
        upload_id=upload_id,
        repository="history/old",
        caused_by=str(uuid.uuid4()),
        staging_key=f"uploads/{upload_id}/data",
    )
    producer = AIOKafkaProducer(**connection(settings, Principal.ADMIN), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.events_topic, CODEC.encode(event), key=upload_id.encode()
        )
    finally:
        await producer.stop()
    found = await history.upload_history(settings, upload_id)
    assert found is not None
    assert [e.command_status for e in found.entries] == [CommandStatus.GONE]
    table = io.StringIO()
    history.write_table([found], table)
    assert "(gone)" in table.getvalue()
    assert "commands are kept 7 days" in table.getvalue()
    status, out, _ = await run_cli(capsys, "history", upload_id, "--json")
    assert status == 0
    assert json.loads(out)["command_status"] == "gone"


async def test_usage_and_nothing_found(cli_env, capsys):
    status, _, err = await run_cli(capsys, "history", str(uuid.uuid4()))
    assert status == 1 and "no events" in err
    status, _, err = await run_cli(capsys, "history", "--repo", "history/never-pushed")
    assert status == 1
    status, _, err = await run_cli(capsys, "history")
    assert status == 2
    status, _, err = await run_cli(capsys, "history", str(uuid.uuid4()), "--digest", "sha256:0")
    assert status == 2 and "--digest goes with --repo" in err
