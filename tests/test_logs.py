"""Structured logs: one JSON object per line, with the service, the upload and the command."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import pytest

from services.core import logs
from services.core.settings import Settings, SettingsError
from tests.conftest import ROOT, settings_env


@pytest.fixture()
def json_logger():
    """A logger wired to a JsonFormatter on a StringIO, without touching the root logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("upload-worker"))
    logger = logging.getLogger("layerlog.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_the_standard_fields(json_logger):
    logger, stream = json_logger
    logger.info("upload-worker: assigned partitions %s", [0, 1, 2])
    [line] = lines(stream)
    assert line["level"] == "INFO"
    assert line["service"] == "upload-worker"
    assert line["logger"] == "layerlog.test.logs"
    assert line["message"] == "upload-worker: assigned partitions [0, 1, 2]"
    assert line["ts"].endswith("+00:00")
    # The phrase tests find assignments by still matches inside the JSON line.
    assert "assigned partitions [0, 1, 2]" in stream.getvalue()


def test_upload_and_command_ids_come_from_extra(json_logger):
    logger, stream = json_logger
    logger.warning("chunk rejected", extra={"upload_id": "u-1", "command_id": "c-1"})
    [line] = lines(stream)
    assert (line["upload_id"], line["command_id"]) == ("u-1", "c-1")


def test_bound_fields_reach_every_line_inside_the_block(json_logger):
    logger, stream = json_logger
    with logs.bound(upload_id="u-2"):
        logger.info("inside")
        with logs.bound(command_id="c-2", ignored=None):
            logger.info("nested")
    logger.info("outside")
    inside, nested, outside = lines(stream)
    assert inside["upload_id"] == "u-2" and "command_id" not in inside
    assert nested["upload_id"] == "u-2" and nested["command_id"] == "c-2"
    assert "ignored" not in nested
    assert "upload_id" not in outside


def test_exceptions_and_odd_values_stay_on_one_line(json_logger):
    logger, stream = json_logger
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("cannot apply", extra={"offset": object()})
    assert len(stream.getvalue().splitlines()) == 1
    [line] = lines(stream)
    assert line["level"] == "ERROR"
    assert "RuntimeError: boom" in line["exception"]
    assert line["offset"].startswith("<object object")


def test_configure_json_sets_the_level_and_captures_warnings():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    try:
        logs.configure_json("verifier", "warning", stream)
        logging.getLogger("services.x").info("not shown at WARNING")
        logging.getLogger("services.x").warning("shown")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library complains", DeprecationWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    found = lines(stream)
    assert found[0]["message"] == "shown"
    assert all(line["service"] == "verifier" for line in found)
    assert any("a library complains" in line["message"] for line in found)


def test_the_level_is_a_setting_checked_at_start_up():
    assert Settings.from_env({"LAYERLOG_LOG_LEVEL": "debug"}).log_level == "debug"
    with pytest.raises(SettingsError, match="LAYERLOG_LOG_LEVEL"):
        Settings.from_env({"LAYERLOG_LOG_LEVEL": "LOUD"})
    # settings_env() passes Settings fields to service processes, so the level reaches them.
    env = settings_env(replace(Settings(), log_level="DEBUG"))
    assert env["LAYERLOG_LOG_LEVEL"] == "DEBUG"


def test_a_service_with_a_bad_level_stops_with_status_2():
    env = settings_env(Settings())
    env["LAYERLOG_LOG_LEVEL"] = "LOUD"
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "verifier"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "LAYERLOG_LOG_LEVEL" in done.stderr


async def test_the_running_services_log_json_lines(stack_services):
    # The worker may be given its partitions after the query service answers.
    worker_log = stack_services["upload-worker"].log_path
    deadline = time.monotonic() + 60
    while "assigned partitions [" not in worker_log.read_text():
        assert time.monotonic() < deadline, "the upload worker never logged its assignment"
        await asyncio.sleep(0.2)
    for name, service in stack_services.items():
        text = service.log_path.read_text()
        found = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert found, f"{name} logged nothing"
        assert {line["service"] for line in found} == {name}
        assert all({"ts", "level", "logger", "message"} <= line.keys() for line in found)
