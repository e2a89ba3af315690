"""The CLI for people and scripts: progress on a terminal, --json, documented exit statuses."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from services import cli
from services.cli.progress import Progress
from tests.authfiles import fetch_token
from tests.conftest import ROOT, free_port, run_cli, settings_env


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# Help and exit statuses


@pytest.mark.parametrize("command", [[], ["push"], ["pull"], ["exists"], ["history"], ["replay"]])
def test_help_documents_the_exit_statuses(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out
    for status in ("0 ", "1 ", "2 ", "3 ", "130"):
        assert f"\n  {status}" in out


def test_history_help_says_repo_scans_the_whole_log(capsys):
    with pytest.raises(SystemExit):
        cli.main(["history", "--help"])
    assert "scans the WHOLE events topic" in capsys.readouterr().out


def test_bad_usage_is_status_2(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["push"])
    assert exited.value.code == 2
    assert cli.main([]) == 2


# The progress bar


def test_progress_draws_percent_rate_and_eta_on_a_terminal():
    stream, clock = Terminal(), Clock()
    progress = Progress("push", 4 << 20, stream=stream, clock=clock)
    progress.update(0, force=True)
    clock.now += 1.0
    progress.update(1 << 20)
    clock.now += 0.01  # too soon to redraw
    progress.update(2 << 20)
    clock.now += 1.0
    progress.update(3 << 20)
    progress.close()
    drawn = stream.getvalue()
    frames = drawn.split("\r")[1:]
    assert len(frames) == 4  # 0, 1 MiB, 3 MiB and the final redraw; not the one too soon
    assert frames[0].startswith("push   0% [........................] 0 B / 4.0 MiB")
    assert "ETA --:--" in frames[0]
    assert frames[1].startswith("push  25% [######..................] 1.0 MiB / 4.0 MiB")
    assert "1.0 MiB/s  ETA 0:03" in frames[1]
    assert "75%" in frames[2] and "ETA 0:01" in frames[2]
    assert drawn.endswith("\n")


def test_progress_says_when_it_is_done_and_pads_over_longer_lines():
    stream, clock = Terminal(), Clock()
    progress = Progress("pull", 1000, stream=stream, clock=clock)
    progress.status("waiting for something with a rather long description")
    clock.now += 2
    progress.update(1000, force=True)
    last = stream.getvalue().split("\r")[-1]
    assert "100%" in last and "in 0:02" in last
    assert len(last) >= len("pull  waiting for something with a rather long description")


@pytest.mark.parametrize("enabled", [True, False])
def test_no_progress_when_piped_or_quiet(enabled):
    piped = io.StringIO()  # not a terminal
    progress = Progress("push", 100, stream=piped, enabled=enabled)
    progress.update(50, force=True)
    progress.status("waiting")
    progress.close()
    assert piped.getvalue() == ""
    quiet = Terminal()
    progress = Progress("push", 100, stream=quiet, enabled=False)
    progress.update(50, force=True)
    progress.close()
    assert quiet.getvalue() == ""


# Client commands against the stack


@pytest.mark.usefixtures("stack_services")
async def test_push_pull_exists_with_json(cli_env, capsys, tmp_path):
    data = uuid.uuid4().bytes * 50_000
    layer = tmp_path / "layer.bin"
    layer.write_bytes(data)
    status, out, err = await run_cli(capsys, "push", "--repo", "cli/json", "--json", str(layer))
    assert status == 0, err
    pushed = json.loads(out)
    assert pushed["digest"] == sha256(data)
    assert pushed["size"] == len(data) and pushed["repository"] == "cli/json"
    uuid.UUID(pushed["upload_id"])
    assert err == ""  # no progress bar: stderr is not a terminal here

    copy = tmp_path / "copy.bin"
    status, out, _ = await run_cli(
        capsys, "pull", "--repo", "cli/json", pushed["digest"], "-o", str(copy), "--json"
    )
    assert status == 0
    pulled = json.loads(out)
    assert pulled["size"] == len(data) and pulled["output"] == str(copy)
    assert copy.read_bytes() == data

    status, out, _ = await run_cli(capsys, "exists", "--repo", "cli/json", "--json", sha256(data))
    assert (status, json.loads(out)["exists"]) == (0, True)
    status, out, _ = await run_cli(capsys, "exists", "--repo", "cli/json", sha256(b"nothing"))
    assert (status, out) == (1, "false\n")
    status, out, _ = await run_cli(
        capsys, "exists", "--repo", "cli/json", "--json", sha256(b"nothing")
    )
    assert (status, json.loads(out)["exists"]) == (1, False)


@pytest.mark.usefixtures("stack_services")
async def test_failures_map_to_their_exit_status(cli_env, capsys, tmp_path, monkeypatch):
    missing = sha256(b"never pushed")
    status, out, err = await run_cli(
        capsys, "pull", "--repo", "cli/none", missing, "-o", str(tmp_path / "x"), "--json"
    )
    assert status == 1
    assert json.loads(out)["error"] == "LayerUnknown"
    assert "LayerUnknown" in err

    layer = tmp_path / "layer.bin"
    layer.write_bytes(b"these bytes do not have that digest")
    status, out, _ = await run_cli(
        capsys, "push", "--repo", "cli/bad", "--digest", missing, "--json", str(layer)
    )
    assert (status, json.loads(out)["error"]) == (1, "LayerInvalidDigest")

    status, _, err = await run_cli(capsys, "exists", "--repo", "Not/Valid", missing)
    assert status == 2 and "repository name" in err
    status, _, err = await run_cli(capsys, "push", "--repo", "cli/x", str(tmp_path / "absent"))
    assert status == 2

    monkeypatch.setenv("LAYERLOG_PARTITIONS", "many")
    status, _, err = await run_cli(capsys, "exists", "--repo", "cli/x", missing)
    assert status == 2 and "LAYERLOG_PARTITIONS" in err
    monkeypatch.undo()


async def test_an_unreachable_query_service_is_status_3(settings, capsys, monkeypatch):
    for name, value in settings_env(settings).items():
        if name.startswith("LAYERLOG_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("LAYERLOG_QUERY_URL", f"http://127.0.0.1:{free_port()}")
    status, out, _ = await run_cli(capsys, "exists", "--repo", "cli/x", "--json", sha256(b"x"))
    assert status == 3
    assert json.loads(out)["error"] == "Unavailable"


def push_on_a_terminal(settings, path: Path, *extra: str) -> tuple[int, str, str]:
    """Runs `layerlog push` with stderr on a pseudo-terminal, as an interactive user would."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "push", "--repo", "cli/tty", *extra, str(path)],
        env=settings_env(settings),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(controller)
    out = process.stdout.read().decode() if process.stdout else ""
    return process.wait(), out, shown.decode(errors="replace")


@pytest.mark.usefixtures("stack_services")
async def test_push_on_a_terminal_shows_progress_unless_quiet(settings, tmp_path):
    data = uuid.uuid4().bytes * 200_000  # 3.2 MB: several chunks
    layer = tmp_path / "layer.bin"
    layer.write_bytes(data)
    status, out, shown = await asyncio.to_thread(push_on_a_terminal, settings, layer)
    assert status == 0
    assert out.strip() == sha256(data)  # stdout stays the digest alone
    assert "\rpush 100% [########################]" in shown
    assert "MiB/s" in shown and "ETA" in shown
    assert "waiting for the verifier" in shown
    status, out, shown = await asyncio.to_thread(push_on_a_terminal, settings, layer, "--quiet")
    assert status == 0 and out.strip() == sha256(data)
    assert shown == ""


def test_run_all_serves_every_service_and_ctrl_c_stops_them(settings, tmp_path):
    """`make run` is `layerlog run-all`: the five services come up, and SIGINT stops them all."""
    registry = f"127.0.0.1:{free_port()}"
    # A query port of its own: the session's query service may hold the session's, and a
    # query service that cannot bind exits, which stops run-all before the SIGINT below.
    query = f"127.0.0.1:{free_port()}"
    own = replace(
        settings,
        query_listen=query,
        query_url=f"http://{query}",
        registry_listen=registry,
        registry_url=f"http://{registry}",
        registry_index_path=str(tmp_path / "registry.sqlite"),
        index_path=str(tmp_path / "query.sqlite"),
        worker_metrics_listen=f"127.0.0.1:{free_port()}",
        verifier_metrics_listen=f"127.0.0.1:{free_port()}",
        gc_metrics_listen=f"127.0.0.1:{free_port()}",
        gc_index_path=str(tmp_path / "gc.sqlite"),
        # As `make run`: logins on, over files run-all creates itself on first start.
        auth=True,
        auth_htpasswd_file=str(tmp_path / "auth" / "htpasswd"),
        auth_policy_file=str(tmp_path / "auth" / "policy.toml"),
        auth_keys_dir=str(tmp_path / "auth" / "keys"),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "run-all"],
        env=settings_env(own),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        said = []
        while not (said and "started" in said[-1]):
            said.append(process.stdout.readline())
            assert said[-1], said
        started = said[-1]
        children = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", started)]
        assert len(children) == 5, started
        assert "gc-service (pid" in started
        password = (tmp_path / "auth" / "admin.password").read_text().strip()
        assert any(f"log in as admin: crane auth login {registry}" in line for line in said), said
        assert _answers_200(f"{own.query_url}/healthz", process), "the query service never answered"
        assert _answers_200(f"{own.registry_url}/v2/", process, status=401), "no registry"
        gc_metrics = f"http://{own.gc_metrics_listen}/metrics"
        assert _answers_200(gc_metrics, process), "the garbage collector never answered"
        token = fetch_token(own.registry_url, "admin", password, "registry:catalog:*")
        bearer = {"Authorization": f"Bearer {token}"}
        assert _answers_200(f"{own.registry_url}/v2/", process, headers=bearer), "no registry"
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{own.registry_url}/v2/", timeout=5)
        assert anonymous.value.code == 401
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        for pid in children:
            assert not _running(pid), f"service {pid} still runs after run-all stopped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _answers_200(
    url: str,
    process: subprocess.Popen[str],
    seconds: float = 60.0,
    headers: dict[str, str] | None = None,
    status: int = 200,
) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == status:
                    return True
        except urllib.error.HTTPError as refused:
            if refused.code == status:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
