"""The SDK and the CLI log in the way registry clients do, against the real stack with logins on.

The upload worker, the verifier, the query service and the registry (which serves /token) run
as processes of their own on topics and a bucket of this module's, with tests/authfiles.py's
users and policy. Tokens live TOKEN_TTL seconds and the worker allows a command GRACE seconds
past its token's expiry, so an upload that kept using its first token would be refused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import jwt
import pytest

from services.auth.keys import generate_key_pair, load_verifying_keys
from services.auth.tokens import TokenVerifier
from services.client import (
    LayerAccessDenied,
    LayerLoginFailed,
    LayerService,
)
from services.client.credentials import find_credentials, registry_host
from services.core.eventlog import read_partition, upload_records
from services.core.kafka import topic_partitions
from services.core.objectstore import ObjectStore
from services.core.principals import Principal
from services.core.records import Command, CommandRejected, RejectReason
from services.core.settings import Settings
from tests.authfiles import USERS, with_auth
from tests.conftest import (
    ServiceProcess,
    free_port,
    own_topics,
    registry_process,
    run_cli,
    settings_env,
    wait_for_query,
)
from tests.registry.clients import client_path

TOKEN_TTL = 6
GRACE = 2
HELPER = "layerlogtest"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def own_query(settings: Settings, folder: Path) -> Settings:
    port = free_port()
    return replace(
        settings,
        query_listen=f"127.0.0.1:{port}",
        query_url=f"http://127.0.0.1:{port}",
        index_path=str(folder / "index.sqlite"),
    )


async def start(services: list[ServiceProcess], settings: Settings) -> None:
    for service in services:
        service.start()
    await wait_for_query(settings, timeout=60)
    await wait_for_query(settings, timeout=60, url=settings.registry_url)


def stop(services: list[ServiceProcess]) -> None:
    for service in services:
        service.stop()
    for service in services:
        if service.log_path.exists():
            tail = service.log_path.read_text(errors="replace").splitlines()[-5:]
            print(f"--- {service.name} log tail:\n" + "\n".join(tail))


@pytest.fixture(scope="module")
async def stack(settings, tmp_path_factory) -> AsyncIterator[Settings]:
    """Settings of a running stack with logins on; clients add their login to them."""
    async with own_topics(settings, "sdk-auth") as own:
        secured = with_auth(
            replace(
                own_query(own, tmp_path_factory.mktemp("sdk-auth-query")),
                auth_token_ttl_seconds=TOKEN_TTL,
                auth_command_grace_seconds=GRACE,
            ),
            tmp_path_factory.mktemp("sdk-auth"),
        )
        registry = registry_process(secured, tmp_path_factory)
        # Every service gets the registry's URL: the query service's challenge names its realm.
        every = registry.settings
        logs = tmp_path_factory.mktemp("sdk-auth-logs")
        services = [
            ServiceProcess(name, every, logs) for name in ("upload-worker", "verifier", "query")
        ]
        services.append(registry)
        try:
            await start(services, every)
            yield every
        finally:
            stop(services)


@pytest.fixture(autouse=True)
def no_docker_login(tmp_path, monkeypatch) -> Path:
    """An empty docker config folder, so that this machine's own logins play no part."""
    folder = tmp_path / "docker-config"
    folder.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(folder))
    return folder


def alice(stack: Settings) -> Settings:
    return replace(stack, username="alice", password=USERS["alice"])


async def push(settings: Settings, name: str, data: bytes) -> str:
    """Pushes data through the SDK, reads it back; the upload id."""
    async with LayerService(settings, chunk_size=64 * 1024, finish_timeout=60) as service:
        upload = await service.upload(name)
        await upload.write(data)
        layer = await upload.finish(len(data), sha256(data))
        assert layer.size == len(data)
        assert await service.exists(name, sha256(data))
        fetched = await service.fetch(name, sha256(data))
        async with fetched:
            assert await fetched.read() == data
        return upload.uuid


def verifier_of(stack: Settings) -> TokenVerifier:
    keys = load_verifying_keys(stack.auth_keys_dir, stack.auth_issuer)
    return TokenVerifier(keys, stack.auth_service)


async def assert_done_by(stack: Settings, upload_id: str, subject: str) -> list[Command]:
    """Every command of the upload carries subject and a token that verifies as theirs, and
    every event names them as its actor; the commands."""
    commands = [r.record for r in await upload_records(stack, stack.commands_topic, upload_id)]
    assert commands
    verifier = verifier_of(stack)
    for command in commands:
        assert command.subject == subject
        assert command.token is not None
        assert verifier.verify(command.token, grace=3600).subject == subject
    events = [r.record for r in await upload_records(stack, stack.events_topic, upload_id)]
    assert "LayerCommitted" in [type(e).__name__ for e in events]
    assert {e.actor for e in events} == {subject}
    return commands


async def commands_naming(stack: Settings, repository: str) -> list[Command]:
    """Every command on the commands topic for the repository (none should be, when refused)."""
    found = []
    for partition in await topic_partitions(stack, Principal.AUDITOR, stack.commands_topic):
        async for logged in read_partition(stack, stack.commands_topic, partition):
            if getattr(logged.record, "repository", None) == repository:
                found.append(logged.record)
    return found


def write_helper(folder: Path, host: str, username: str, password: str) -> Path:
    """docker-credential-layerlogtest: the login for host, 'not found' for any other; it notes
    each host it is asked about in asked.log."""
    folder.mkdir(parents=True, exist_ok=True)
    answer = json.dumps({"ServerURL": host, "Username": username, "Secret": password})
    script = folder / f"docker-credential-{HELPER}"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || exit 2\n'
        "host=$(cat)\n"
        f'echo "$host" >> "{folder}/asked.log"\n'
        f'if [ "$host" = "{host}" ]; then\n'
        f"  echo '{answer}'\n"
        "else\n"
        "  echo 'credentials not found in native keychain'; exit 1\n"
        "fi\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def docker_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config))


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# Where the login comes from


@pytest.mark.parametrize(
    "source", ["password", "password-file", "config-auths", "cred-helper", "creds-store"]
)
async def test_alice_pushes_and_fetches_with_each_source_of_her_login(
    stack, source, no_docker_login, tmp_path, monkeypatch
):
    host = registry_host(stack)
    client = stack
    if source == "password":
        client = alice(stack)
    elif source == "password-file":
        secret = tmp_path / "password"
        secret.write_text(USERS["alice"] + "\n")
        client = replace(stack, username="alice", password_file=str(secret))
    elif source == "config-auths":
        docker_config(no_docker_login, {"auths": {host: {"auth": basic("alice", USERS["alice"])}}})
    else:
        bin_dir = tmp_path / "bin"
        write_helper(bin_dir, host, "alice", USERS["alice"])
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        key = "credHelpers" if source == "cred-helper" else "credsStore"
        # A wrong auths entry too: the helper comes first, as with docker.
        docker_config(
            no_docker_login,
            {
                key: {host: HELPER} if key == "credHelpers" else HELPER,
                "auths": {host: {"auth": basic("alice", "not-her-password")}},
            },
        )
    name = unique(f"alice/{source}")
    data = os.urandom(150_000)
    upload_id = await push(client, name, data)
    await assert_done_by(stack, upload_id, "alice")
    if source.startswith("cred"):
        assert (tmp_path / "bin" / "asked.log").read_text().split() == [host]


async def test_crane_auth_login_logs_the_sdk_in(stack, no_docker_login):
    """What a registry client writes into config.json is what the SDK reads."""
    host = registry_host(stack)
    env = {**os.environ, "DOCKER_CONFIG": str(no_docker_login)}
    argv = [client_path("crane"), "auth", "login", host, "-u", "alice", "--password-stdin"]
    done = await asyncio.to_thread(
        subprocess.run, argv, input=USERS["alice"].encode(), env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    name = unique("alice/crane-login")
    data = os.urandom(20_000)
    await assert_done_by(stack, await push(stack, name, data), "alice")


async def test_a_helper_with_nothing_for_the_host_falls_through_to_auths(
    stack, no_docker_login, tmp_path, monkeypatch
):
    bin_dir = tmp_path / "bin"
    write_helper(bin_dir, "elsewhere.example:5000", "carol", USERS["carol"])
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    host = registry_host(stack)
    # Older docker versions wrote keys with a scheme and a path.
    docker_config(
        no_docker_login,
        {"credsStore": HELPER, "auths": {f"http://{host}/v1/": {"auth": basic("alice", "pw")}}},
    )
    found = await find_credentials(stack)
    assert found is not None and (found.username, found.password) == ("alice", "pw")
    assert str(no_docker_login) in found.source
    assert (bin_dir / "asked.log").read_text().split() == [host]


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ("{not json", "is not valid JSON"),
        ({"credsStore": "layerlog-absent-helper"}, "docker-credential-layerlog-absent-helper"),
        ({"auths": {"HOST": {"auth": "%%%"}}}, "not base64 of user:password"),
        ({"auths": {"HOST": {"identitytoken": "abc"}}}, "identity token"),
    ],
)
async def test_a_login_that_cannot_be_read_is_a_clear_error(
    stack, no_docker_login, config, complaint
):
    text = config if isinstance(config, str) else json.dumps(config)
    (no_docker_login / "config.json").write_text(text.replace("HOST", registry_host(stack)))
    with pytest.raises(LayerLoginFailed, match=complaint):
        await find_credentials(stack)


async def test_no_login_anywhere_is_anonymous(stack):
    assert await find_credentials(stack) is None
    assert await find_credentials(alice(stack)) is not None


# What the SDK may and may not do


async def test_a_wrong_password_fails_clearly_and_sends_nothing(stack):
    name = unique("alice/wrong")
    wrong = replace(stack, username="alice", password="not-alices-password")
    async with LayerService(wrong, finish_timeout=30) as service:
        with pytest.raises(LayerLoginFailed, match="refused the login as 'alice'") as failed:
            await service.upload(name)
    assert "wrong user name or password" in str(failed.value)
    assert "LAYERLOG_PASSWORD" in str(failed.value)  # where the login came from
    assert await commands_naming(stack, name) == []


async def test_a_repository_the_policy_closes_to_pushes_is_refused_before_any_byte(stack):
    name = unique("readonly/x")
    async with LayerService(alice(stack), finish_timeout=30) as service:
        with pytest.raises(LayerAccessDenied, match=f"alice may not push {name}") as denied:
            await service.upload(name)
        assert "pull" in str(denied.value)  # what the policy does give her there
        # She may pull there: the same repository answers a read.
        assert await service.exists(name, sha256(b"nothing")) is False
    assert await commands_naming(stack, name) == []


async def test_an_anonymous_push_is_refused_and_says_how_to_log_in(stack):
    name = unique("alice/anonymous")
    async with LayerService(stack, finish_timeout=30) as service:
        with pytest.raises(LayerAccessDenied, match="anonymous") as denied:
            await service.upload(name)
        assert "LAYERLOG_USERNAME" in str(denied.value)
        assert f"docker login {registry_host(stack)}" in str(denied.value)
        # Reads go as far as the anonymous policy: library/* is public, alice/* is not.
        assert await service.exists(unique("library/public"), sha256(b"x")) is False
        with pytest.raises(LayerAccessDenied, match="anonymous"):
            await service.exists(name, sha256(b"x"))
    assert await commands_naming(stack, name) == []


async def test_a_policy_that_opens_a_repository_takes_effect_without_a_new_service(stack):
    """Tokens cached before the policy changed are exchanged: the query service's 401
    (insufficient_scope) for a read, the token's missing push for a write."""
    name = unique("opened/x")
    policy = Path(stack.auth_policy_file)
    before = await asyncio.to_thread(policy.read_text)
    async with LayerService(alice(stack), finish_timeout=30) as service:
        with pytest.raises(LayerAccessDenied, match=f"alice may not pull {name}"):
            await service.exists(name, sha256(b"x"))
        try:
            opened = '\n[repositories."opened/*"]\nalice = '
            await asyncio.to_thread(policy.write_text, before + opened + '["pull"]\n')
            assert await service.exists(name, sha256(b"x")) is False
            with pytest.raises(LayerAccessDenied, match=f"alice may not push {name}"):
                await service.upload(name)
            await asyncio.to_thread(policy.write_text, before + opened + '["pull", "push"]\n')
            upload = await service.upload(name)
            data = os.urandom(10_000)
            await upload.write(data)
            await upload.finish(len(data), sha256(data))
        finally:
            await asyncio.to_thread(policy.write_text, before)
    await assert_done_by(stack, upload.uuid, "alice")


async def test_logins_off_here_but_on_at_the_query_service_says_so(stack):
    async with LayerService(replace(stack, auth=False), finish_timeout=30) as service:
        with pytest.raises(LayerLoginFailed, match="LAYERLOG_AUTH=off"):
            await service.exists(unique("alice/off"), sha256(b"x"))


async def test_a_long_upload_outlives_its_tokens(stack):
    name = unique("alice/long")
    pieces = [os.urandom(40_000) for _ in range(8)]
    data = b"".join(pieces)
    started = time.monotonic()
    async with LayerService(alice(stack), chunk_size=40_000, finish_timeout=60) as service:
        upload = await service.upload(name)
        for piece in pieces:
            await upload.write(piece)
            await upload.flush()
            await asyncio.sleep(2)
        layer = await upload.finish(len(data), sha256(data))
        async with layer:
            assert await layer.read() == data
    # Past two tokens' lifetimes and their grace: a command with the first token is refused.
    assert time.monotonic() - started > 2 * TOKEN_TTL + GRACE
    commands = await assert_done_by(stack, upload.uuid, "alice")
    tokens = {jwt.decode(c.token, options={"verify_signature": False})["jti"] for c in commands}
    assert len(tokens) >= 3
    events = [r.record for r in await upload_records(stack, stack.events_topic, upload.uuid)]
    assert not [e for e in events if isinstance(e, CommandRejected)]


async def test_the_workers_unauthorized_rejection_is_access_denied(stack, tmp_path_factory):
    """A worker that does not trust the registry's signing key (a rotation it has not seen)
    refuses the SDK's commands; finish() raises LayerAccessDenied with the worker's reason, and
    nothing is staged."""
    async with own_topics(stack, "sdk-distrust") as own:
        mini = own_query(own, tmp_path_factory.mktemp("sdk-distrust-query"))
        other_keys = tmp_path_factory.mktemp("sdk-distrust-keys")
        generate_key_pair(other_keys)
        logs = tmp_path_factory.mktemp("sdk-distrust-logs")
        services = [
            ServiceProcess("upload-worker", replace(mini, auth_keys_dir=str(other_keys)), logs),
            ServiceProcess("query", mini, logs),
        ]
        try:
            await start(services, mini)
            name = unique("alice/distrusted")
            data = os.urandom(70_000)
            async with LayerService(alice(mini), finish_timeout=60) as service:
                upload = await service.upload(name)
                await upload.write(data)
                with pytest.raises(LayerAccessDenied, match="UNAUTHORIZED") as denied:
                    await upload.finish(len(data), sha256(data))
            assert "no trusted key" in str(denied.value)
            events = [r.record for r in await upload_records(mini, mini.events_topic, upload.uuid)]
            assert events and all(
                isinstance(e, CommandRejected) and e.reason == RejectReason.UNAUTHORIZED
                for e in events
            )
            store = ObjectStore(mini)
            assert await store.list_keys(f"uploads/{upload.uuid}/") == []
            assert await store.list_keys(f"upload-state/{upload.uuid}") == []
            staging = await store.multipart_uploads("uploads/")
            assert not [u for u in staging if upload.uuid in u.key]
        finally:
            stop(services)


# The CLI


async def test_the_cli_pushes_and_pulls_with_layerlog_username_and_password(
    stack, tmp_path, monkeypatch, capsys
):
    for variable, value in settings_env(alice(stack)).items():
        if variable.startswith("LAYERLOG_"):
            monkeypatch.setenv(variable, value)
    data = os.urandom(90_000)
    layer = tmp_path / "layer.bin"
    layer.write_bytes(data)
    name = unique("alice/cli")
    status, out, err = await run_cli(capsys, "push", "-q", "--repo", name, str(layer))
    assert (status, out.strip()) == (0, sha256(data)), err
    copy = tmp_path / "copy.bin"
    status, _, err = await run_cli(
        capsys, "pull", "-q", "--repo", name, sha256(data), "-o", str(copy)
    )
    assert status == 0, err
    assert copy.read_bytes() == data

    denied = unique("readonly/cli")
    status, _, err = await run_cli(capsys, "push", "-q", "--repo", denied, str(layer))
    assert status == 1
    assert f"LayerAccessDenied: alice may not push {denied}" in err

    monkeypatch.setenv("LAYERLOG_PASSWORD", "not-alices-password")
    status, _, err = await run_cli(capsys, "push", "-q", "--repo", name, str(layer))
    assert status == 2
    assert "LayerLoginFailed" in err and "wrong user name or password" in err
