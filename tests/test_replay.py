"""Time travel: `layerlog replay --until ...` rebuilds the index as of a point of the log, and
`layerlog query --index FILE --read-only` serves Exists/Fetch from it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from services.audit.timetravel import Until, UntilError, parse_until
from services.client import LayerService
from services.query.index import Index
from services.query.replay import cut_offsets
from tests.conftest import ROOT, free_port, run_cli, settings_env, wait_for_query

pytestmark = pytest.mark.usefixtures("stack_services")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push(settings, name: str, data: bytes) -> str:
    async with LayerService(settings, finish_timeout=60) as service:
        upload = await service.upload(name)
        await upload.write(data)
        await upload.finish(len(data), sha256(data))
    return sha256(data)


def test_until_takes_one_time_or_partition_offsets():
    assert parse_until(None) == Until()
    assert parse_until(["0:12", "3:4"]) == Until(offsets={0: 12, 3: 4})
    moment = parse_until(["2025-01-31T12:00:00Z"]).time
    assert moment == datetime(2025, 1, 31, 12, tzinfo=UTC)
    # A time without a zone is UTC, like the log's timestamps.
    assert parse_until(["2025-01-31T12:00:00"]).time == moment
    assert parse_until(["2025-01-31T13:00:00+01:00"]).time == moment
    for bad in (["yesterday"], ["0:1", "2025-01-31T12:00:00Z"], ["0:1", "0:2"], ["1:x"]):
        with pytest.raises(UntilError):
            parse_until(bad)


@pytest.fixture()
async def before_and_after(settings):
    """Layer A committed before the cut, layer B after it; the cut as offsets and as a time."""
    # Unique bytes per use: a digest committed by an earlier test would be "before" any cut.
    run = uuid.uuid4().bytes
    before = run + b"committed before the cut " * 2000
    after = run + b"committed after the cut " * 2000
    digest_a = await push(settings, "travel/layers", before)
    cut = await cut_offsets(settings)  # the log's end now: everything of A, nothing of B
    await asyncio.sleep(0.05)  # timestamps are milliseconds: keep A's and B's apart
    moment = datetime.now(UTC)
    await asyncio.sleep(0.05)
    digest_b = await push(settings, "travel/layers", after)
    return {"a": (digest_a, before), "b": (digest_b, after), "cut": cut, "moment": moment}


async def test_a_layer_committed_after_the_cut_is_absent_from_the_replay(
    settings, cli_env, capsys, tmp_path, before_and_after
):
    (digest_a, _), (digest_b, _) = before_and_after["a"], before_and_after["b"]
    until = [f"--until={p}:{o}" for p, o in sorted(before_and_after["cut"].items())]
    out = tmp_path / "by-offsets.sqlite"
    status, stdout, _ = await run_cli(capsys, "replay", *until, "--out", str(out), "--json")
    assert status == 0
    report = json.loads(stdout)
    assert report["cut"] == {str(p): o for p, o in before_and_after["cut"].items()}
    assert report["layers"] >= 1 and report["events"] > 0
    replayed = Index(str(out), read_only=True)
    assert replayed.layer("travel/layers", digest_a) is not None
    assert replayed.layer("travel/layers", digest_b) is None
    # The live index has both.
    async with LayerService(settings) as service:
        assert await service.exists("travel/layers", digest_a)
        assert await service.exists("travel/layers", digest_b)
    # The same cut given as a time.
    by_time = tmp_path / "by-time.sqlite"
    moment = before_and_after["moment"].isoformat()
    status, stdout, _ = await run_cli(capsys, "replay", "--until", moment, "--out", str(by_time))
    assert status == 0
    assert "read-only" in stdout  # says how to serve it
    replayed = Index(str(by_time), read_only=True)
    assert replayed.layer("travel/layers", digest_a) is not None
    assert replayed.layer("travel/layers", digest_b) is None
    # One self-contained file: no WAL beside it that a reader would need.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by-offsets.sqlite", "by-time.sqlite"]


async def test_the_read_only_query_serves_the_replayed_index(
    settings, cli_env, capsys, tmp_path, before_and_after
):
    (digest_a, data_a), (digest_b, _) = before_and_after["a"], before_and_after["b"]
    out = tmp_path / "as-of.sqlite"
    moment = before_and_after["moment"].isoformat()
    status, _, _ = await run_cli(capsys, "replay", "--until", moment, "--out", str(out))
    assert status == 0
    port = free_port()
    served = replace(
        settings, query_listen=f"127.0.0.1:{port}", query_url=f"http://127.0.0.1:{port}"
    )
    process = start_read_only(served, out, tmp_path / "read-only-query.log")
    try:
        await wait_for_query(served)
        async with aiohttp.ClientSession(base_url=served.query_url) as http:
            async with http.head(f"/v2/travel/layers/blobs/{digest_a}") as response:
                assert response.status == 200
                assert response.headers["Content-Length"] == str(len(data_a))
            async with http.get(f"/v2/travel/layers/blobs/{digest_a}") as response:
                assert response.status == 200
                assert await response.read() == data_a
            async with http.head(f"/v2/travel/layers/blobs/{digest_b}") as response:
                assert response.status == 404
            async with http.get(f"/v2/travel/layers/blobs/{digest_b}") as response:
                assert response.status == 404
                assert (await response.json())["error"] == "BLOB_UNKNOWN"
            async with http.get("/healthz") as response:
                # No projection runs: nothing to lag behind.
                assert await response.json() == {"status": "ok"}
        async with LayerService(served) as service:
            assert await service.exists("travel/layers", digest_a)
            assert not await service.exists("travel/layers", digest_b)
            layer = await service.fetch("travel/layers", digest_a)
            assert await layer.read() == data_a
            await layer.close()
        await asyncio.sleep(0.5)
        assert process.poll() is None
    finally:
        process.send_signal(2)  # SIGINT: the service's own clean stop
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
    assert process.returncode == 0
    # It wrote nothing: the replayed index is still the one file, unchanged in content.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["as-of.sqlite", "read-only-query.log"]


def start_read_only(settings, index: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`layerlog query --index FILE --read-only` as its own process, as an operator runs it."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "query", "--index", str(index), "--read-only"],
            env=settings_env(settings),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_replay_refuses_an_existing_file_and_a_bad_until(cli_env, capsys, tmp_path):
    taken = tmp_path / "taken.sqlite"
    taken.write_bytes(b"")
    status, _, err = await run_cli(capsys, "replay", "--out", str(taken))
    assert status == 2 and "exists" in err
    never = str(tmp_path / "never.sqlite")
    status, _, err = await run_cli(capsys, "replay", "--until", "soon", "--out", never)
    assert status == 2 and "ISO-8601" in err
    status, out, err = await run_cli(
        capsys, "replay", "--until", "0:1", "--until", "0:2", "--out", never, "--json"
    )
    assert status == 2 and json.loads(out)["error"] == "UntilError"
    assert not await asyncio.to_thread(Path(never).exists)


async def test_read_only_query_needs_an_index_file(settings, tmp_path):
    for index in (tmp_path / "missing.sqlite", tmp_path / "garbage.sqlite"):
        if index.name == "garbage.sqlite":
            index.write_bytes(b"not sqlite at all" * 100)
        started = time.monotonic()
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "services.cli", "query", "--index", str(index), "--read-only"],
            env=settings_env(settings),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert str(index) in done.stderr
        assert time.monotonic() - started < 30


async def test_a_time_before_the_log_gives_an_empty_index(settings, cli_env, capsys, tmp_path):
    out = tmp_path / "empty.sqlite"
    before = (datetime.now(UTC) - timedelta(days=3650)).isoformat()
    status, stdout, _ = await run_cli(
        capsys, "replay", "--until", before, "--out", str(out), "--json"
    )
    assert status == 0
    report = json.loads(stdout)
    assert (report["events"], report["layers"], report["uploads"]) == (0, 0, 0)
    assert set(report["cut"].values()) == {0}
