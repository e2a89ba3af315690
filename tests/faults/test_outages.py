"""Kafka, then S3, stopped for 10 s in the middle of uploads and started again: the services
recover by themselves and the clients see delay, never corruption."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from tests.conftest import ROOT
from tests.faults.audit import Outcomes, assert_consistent
from tests.faults.test_crashes import run_uploads

OUTAGE_SECONDS = 10


def stack(*args: str) -> None:
    subprocess.run([str(ROOT / "deploy" / "stack"), *args], check=True, capture_output=True)


async def outage(server: str) -> float:
    """Stops one server, keeps it down, starts it again; returns how long it was away."""
    started = time.monotonic()
    await asyncio.to_thread(stack, "stop", server)
    await asyncio.sleep(OUTAGE_SECONDS)
    await asyncio.to_thread(stack, "up")
    return time.monotonic() - started


@pytest.mark.timeout(900)
@pytest.mark.parametrize("server", ["kafka", "s3"])
async def test_server_outage_mid_stream(pipeline, fault_settings, fault_store, tmp_path, server):
    outcomes = Outcomes()
    uploads = asyncio.create_task(run_uploads(fault_settings, 11, outcomes, count=20))
    await asyncio.sleep(3)
    assert not uploads.done(), "the uploads finished before the outage"
    away = await outage(server)
    assert away >= OUTAGE_SECONDS
    await asyncio.wait_for(uploads, 600)
    assert len(outcomes.committed) == 16 and len(outcomes.cancelled) == 2
    for name in ("upload-worker", "verifier", "query"):
        assert pipeline[name].alive(), f"{name} died during the {server} outage"
    await assert_consistent(fault_settings, fault_store, outcomes, tmp_path)
