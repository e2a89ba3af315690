"""Logins and rights against the real registry (issue 13): hostile tokens, the dedup leak, mounts,
commands straight onto Kafka, the clients' logins, and who did what in the history.

The registry, the upload worker, the verifier and the query service run with logins on
(tests/authfiles.py: users admin, alice, carol and their policy).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.auth.keys import load_signing_key, thumbprint
from services.core import kafka
from services.core.codec import CODEC
from services.core.objectstore import ObjectStore
from services.core.principals import Principal
from services.core.records import (
    CommandRejected,
    PutManifest,
    RepositoryCommandRejected,
    StartUpload,
)
from services.core.settings import Settings
from tests.authfiles import USERS, fetch_token
from tests.conftest import registry_process, run_cli
from tests.registry.clients import Clients
from tests.registry.conftest import Registry, wait_for_registry

ALICE = ("alice", USERS["alice"])
ADMIN = ("admin", USERS["admin"])


def token(registry: Registry, who: tuple[str, str] | None, *scopes: str) -> str:
    user, password = who if who else (None, None)
    return fetch_token(registry.url, user, password, *scopes)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture()
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def signed(settings: Settings, **claims: object) -> str:
    """A token signed with the registry's own key, with claims a test chooses."""
    key = load_signing_key(settings.auth_keys_dir)
    now = int(time.time())
    body = {
        "iss": settings.auth_issuer,
        "sub": "alice",
        "aud": settings.auth_service,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "access": [{"type": "repository", "name": "alice/app", "actions": ["pull", "push"]}],
    }
    body.update(claims)
    return jwt.encode(body, key.key, algorithm=key.algorithm, headers={"kid": key.kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, object], claims: dict[str, object], sign) -> str:  # type: ignore[no-untyped-def]
    """A JWT put together by hand, for the forms PyJWT refuses to make."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return head + "." + _b64(sign(head.encode()))


def alice_claims(settings: Settings) -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": settings.auth_issuer,
        "sub": "alice",
        "aud": settings.auth_service,
        "iat": now,
        "exp": now + 300,
        "access": [{"type": "repository", "name": "alice/app", "actions": ["pull", "push"]}],
    }


def hostile_tokens(settings: Settings) -> dict[str, str]:
    ours = load_signing_key(settings.auth_keys_dir)
    attacker = ed25519.Ed25519PrivateKey.generate()
    attacker_kid = thumbprint(attacker.public_key())
    raw_public = attacker.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw_public)}
    public_pem = next(Path(settings.auth_keys_dir).glob("*.pub")).read_bytes()
    claims = alice_claims(settings)
    now = int(time.time())
    return {
        "expired": signed(settings, exp=now - 60, iat=now - 400, nbf=now - 400),
        "not yet valid": signed(settings, nbf=now + 3600),
        "wrong aud": signed(settings, aud="another-registry"),
        "wrong iss": signed(settings, iss="https://evil.example"),
        "alg none": raw_token(
            {"alg": "none", "kid": ours.kid, "typ": "JWT"}, claims, lambda _: b""
        ),
        "HS256 with the public key as secret": raw_token(
            {"alg": "HS256", "kid": ours.kid, "typ": "JWT"},
            claims,
            lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
        ),
        "unknown kid": jwt.encode(
            claims, attacker, algorithm="EdDSA", headers={"kid": attacker_kid}
        ),
        "JWK embedded in the header": jwt.encode(
            claims, attacker, algorithm="EdDSA", headers={"kid": ours.kid, "jwk": jwk}
        ),
        "JWK embedded, its own kid": jwt.encode(
            claims, attacker, algorithm="EdDSA", headers={"kid": attacker_kid, "jwk": jwk}
        ),
        "not a JWT": "not-a-token",
    }


def assert_refused(status: int, body: dict[str, object], wanted: set[int]) -> None:
    assert status in wanted, (status, body)
    errors = body["errors"]
    assert isinstance(errors, list) and errors[0]["code"] in ("UNAUTHORIZED", "DENIED")


async def test_an_anonymous_request_gets_the_bearer_challenge(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{registry.url}/v2/alice/app/manifests/latest") as response:
        body = await response.json()
        challenge = response.headers["WWW-Authenticate"]
    assert response.status == 401
    assert challenge == (
        f'Bearer realm="{registry.url}/token",service="layerlog",scope="repository:alice/app:pull"'
    )
    assert body["errors"][0]["code"] == "UNAUTHORIZED"
    async with http.get(f"{registry.url}/v2/") as response:
        assert response.status == 401
        assert "scope=" not in response.headers["WWW-Authenticate"]


async def test_every_hostile_token_is_refused_with_the_spec_s_body(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    settings = registry.services["registry"].settings
    url = f"{registry.url}/v2/alice/app/tags/list"
    # The same request with a good token is served: the refusals below are the tokens' doing.
    async with http.get(url, headers=bearer(signed(settings))) as response:
        assert response.status in (200, 404), await response.text()
    for name, value in hostile_tokens(settings).items():
        async with http.get(url, headers=bearer(value)) as response:
            body = await response.json()
            assert response.status == 401, (name, response.status, body)
            assert body["errors"][0]["code"] == "UNAUTHORIZED", name
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"], name


async def test_scopes_reach_no_further_than_the_policy(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    # A token for one repository, used on another: the policy would allow it, so the client is
    # told to get a token for that scope (401); alice may not push to readonly/*: 403.
    for_app = token(registry, ALICE, "repository:alice/app:pull,push")
    async with http.get(
        f"{registry.url}/v2/alice/other/tags/list", headers=bearer(for_app)
    ) as response:
        assert response.status == 401
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    # Asking for more than the policy gives gets only what it gives (Harbor's CVE-2019-16919).
    asked = token(registry, ALICE, "repository:readonly/x:pull,push,delete")
    claims = jwt.decode(asked, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": "readonly/x", "actions": ["pull"]}]
    async with http.post(
        f"{registry.url}/v2/readonly/x/blobs/uploads/", headers=bearer(asked)
    ) as response:
        assert_refused(response.status, await response.json(), {403})
    # Nothing for a repository the policy does not name at all.
    nothing = token(registry, ALICE, "repository:secret/x:pull")
    assert jwt.decode(nothing, options={"verify_signature": False})["access"] == []


async def push_blob(
    http: aiohttp.ClientSession, registry: Registry, repository: str, data: bytes
) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    admin = token(registry, ADMIN, f"repository:{repository}:pull,push")
    async with http.post(
        f"{registry.url}/v2/{repository}/blobs/uploads/?digest={digest}",
        data=data,
        headers={**bearer(admin), "Content-Type": "application/octet-stream"},
    ) as response:
        assert response.status == 201, await response.text()
    return digest


async def test_a_deduplicated_blob_is_read_only_through_a_repository_the_caller_may_pull(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    shared = os.urandom(4096)
    digest = await push_blob(http, registry, "alice/dedup", shared)
    assert await push_blob(http, registry, "secret/dedup", shared) == digest
    only_secret = await push_blob(http, registry, "secret/only", os.urandom(4096))
    alice = token(
        registry,
        ALICE,
        "repository:alice/dedup:pull,push",
        "repository:secret/dedup:pull",
        "repository:secret/only:pull",
    )
    async with http.head(
        f"{registry.url}/v2/alice/dedup/blobs/{digest}", headers=bearer(alice)
    ) as response:
        assert response.status == 200  # her own repository links it
    for method in ("HEAD", "GET"):
        async with http.request(
            method, f"{registry.url}/v2/secret/dedup/blobs/{digest}", headers=bearer(alice)
        ) as response:
            assert response.status == 403, method
    # A mount from a repository she may not pull is refused outright.
    async with http.post(
        f"{registry.url}/v2/alice/dedup/blobs/uploads/?mount={only_secret}&from=secret/only",
        headers=bearer(alice),
    ) as response:
        assert_refused(response.status, await response.json(), {403})
    # Automatic content discovery (no from) finds nothing she may read: an upload, not a mount.
    async with http.post(
        f"{registry.url}/v2/alice/dedup/blobs/uploads/?mount={only_secret}",
        headers=bearer(alice),
    ) as response:
        assert response.status == 202
    async with http.head(
        f"{registry.url}/v2/alice/dedup/blobs/{only_secret}", headers=bearer(alice)
    ) as response:
        assert response.status == 404


async def test_a_mount_needs_pull_on_from_and_push_on_the_target(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    # carol may pull shared/locked but alice may not; both may push to shared/*.
    digest = await push_blob(http, registry, "shared/locked", os.urandom(2048))
    carol = token(
        registry,
        ("carol", USERS["carol"]),
        "repository:shared/target:pull,push",
        "repository:shared/locked:pull",
    )
    async with http.post(
        f"{registry.url}/v2/shared/target/blobs/uploads/?mount={digest}&from=shared/locked",
        headers=bearer(carol),
    ) as response:
        assert response.status == 201, await response.text()
    alice = token(
        registry, ALICE, "repository:shared/other:pull,push", "repository:shared/locked:pull"
    )
    async with http.post(
        f"{registry.url}/v2/shared/other/blobs/uploads/?mount={digest}&from=shared/locked",
        headers=bearer(alice),
    ) as response:
        assert_refused(response.status, await response.json(), {403})


async def test_a_wrong_password_gets_401_and_guessing_gets_429(
    registry: Registry,
    http: aiohttp.ClientSession,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A registry process of its own: its failed-login counts lock out only this test.
    own = registry_process(registry.services["registry"].settings, tmp_path_factory).start()
    try:
        url = own.settings.registry_url
        await wait_for_registry(own, url, 90)
        wrong = {"Authorization": aiohttp.encode_basic_auth("alice", "not-her-password")}
        statuses = []
        for _ in range(own.settings.auth_login_failures + 2):
            async with http.get(f"{url}/token?service=layerlog", headers=wrong) as response:
                statuses.append(response.status)
                body = await response.json()
                assert body["errors"][0]["code"] in ("UNAUTHORIZED", "TOOMANYREQUESTS")
        failures = own.settings.auth_login_failures
        assert statuses[:failures] == [401] * failures
        assert statuses[failures:] == [429, 429]
        right = {"Authorization": aiohttp.encode_basic_auth(*ALICE)}
        async with http.get(f"{url}/token?service=layerlog", headers=right) as response:
            assert response.status == 429  # locked for the window, even with the right password
            assert int(response.headers["Retry-After"]) > 0
        # An unknown user is refused the same way (bcrypt runs against a decoy hash).
        async with http.get(
            f"{url}/token", headers={"Authorization": aiohttp.encode_basic_auth("nobody", "x")}
        ) as response:
            assert response.status in (401, 429)
    finally:
        own.stop()


async def events_for(settings: Settings, command_ids: set[str], timeout: float = 60) -> dict:
    """Each command's first event on the events topic, by command id."""
    consumer = kafka.consumer(
        settings, Principal.AUDITOR, [settings.events_topic], None, auto_offset_reset="earliest"
    )
    await consumer.start()
    found: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while set(found) < command_ids and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    event = CODEC.decode(record.value)
                    if event.caused_by in command_ids:
                        found.setdefault(event.caused_by, event)
    finally:
        await consumer.stop()
    return found


async def test_commands_straight_onto_kafka_need_a_token_that_covers_them(
    registry: Registry,
) -> None:
    settings = registry.services["upload-worker"].settings
    ours = signed(settings)  # alice, pull+push on alice/app
    attacker = ed25519.Ed25519PrivateKey.generate()
    forged = jwt.encode(
        alice_claims(settings),
        attacker,
        algorithm="EdDSA",
        headers={"kid": load_signing_key(settings.auth_keys_dir).kid},
    )
    long_expired = signed(settings, exp=int(time.time()) - settings.auth_command_grace_seconds - 60)
    cases = {
        "no token": StartUpload(upload_id=str(uuid.uuid4()), repository="alice/app"),
        "forged": StartUpload(
            upload_id=str(uuid.uuid4()), repository="alice/app", subject="alice", token=forged
        ),
        "foreign repository": StartUpload(
            upload_id=str(uuid.uuid4()), repository="secret/x", subject="alice", token=ours
        ),
        "another's name": StartUpload(
            upload_id=str(uuid.uuid4()), repository="alice/app", subject="admin", token=ours
        ),
        "expired past the grace": StartUpload(
            upload_id=str(uuid.uuid4()),
            repository="alice/app",
            subject="alice",
            token=long_expired,
        ),
        "manifest without a token": PutManifest(
            repository="alice/app",
            reference="v1",
            digest="sha256:" + "0" * 64,
            media_type="application/vnd.oci.image.manifest.v1+json",
            body=b"{}",
        ),
    }
    good = StartUpload(
        upload_id=str(uuid.uuid4()), repository="alice/app", subject="alice", token=ours
    )
    # The client principal may write commands: only the tokens inside decide.
    producer = kafka.producer(settings, Principal.CLIENT)
    await producer.start()
    try:
        for command in [*cases.values(), good]:
            key = getattr(command, "upload_id", command.repository)
            await producer.send_and_wait(
                settings.commands_topic, CODEC.encode(command), key=key.encode()
            )
    finally:
        await producer.stop()
    ids = {c.command_id for c in cases.values()} | {good.command_id}
    found = await events_for(settings, ids)
    for name, command in cases.items():
        event = found.get(command.command_id)
        assert isinstance(event, CommandRejected | RepositoryCommandRejected), (name, event)
        assert event.reason == "UNAUTHORIZED", (name, event.detail)
        assert event.actor is None, name  # a refused authority names nobody
    assert type(found[good.command_id]).__name__ == "UploadStarted"
    assert found[good.command_id].actor == "alice"
    store = ObjectStore(settings)
    for name, command in cases.items():
        if isinstance(command, StartUpload):
            assert await store.list_keys(f"upload-state/{command.upload_id}") == [], name
            assert await store.list_keys(f"uploads/{command.upload_id}/") == [], name


def test_each_client_logs_in_then_pushes_and_pulls(registry: Registry, tmp_path: Path) -> None:
    from tests.registry.test_clients import image_layout

    user, password = ALICE
    clients = Clients(registry.host, tmp_path / "clients")
    layout, manifest = image_layout(tmp_path / "image", seed=90)
    # Before any login: refused.
    refused = clients.crane(
        "push", str(layout.path), clients.ref("alice/login", "v1"), expect_ok=False
    )
    # Anonymous gets a token for nothing (the policy gives anonymous nothing in alice/*): 403.
    assert refused.returncode != 0 and b"403 Forbidden" in refused.stderr

    # docker: no engine runs here, so the CLI logs in on its own (it falls back to a client-side
    # login when the daemon cannot be reached) and writes DOCKER_CONFIG/config.json.
    docker = run_docker(clients, ["login", registry.host, "-u", user, "--password-stdin"], password)
    assert docker.returncode == 0, docker.stderr
    assert registry.host in json.loads((clients.docker_config / "config.json").read_text())["auths"]
    clients.crane("push", str(layout.path), clients.ref("alice/login", "v1"))

    # crane's own login, then oras's, regctl's and skopeo's.
    (clients.docker_config / "config.json").unlink()
    clients.crane("auth", "login", registry.host, "-u", user, "-p", password)
    assert clients.crane("digest", clients.ref("alice/login", "v1")).stdout.decode().strip() == (
        manifest.digest
    )
    (clients.docker_config / "config.json").unlink()
    clients.oras("login", registry.host, "-u", user, "-p", password)
    tags = clients.oras("repo", "tags", clients.ref("alice/login")).stdout.decode().split()
    assert tags == ["v1"]
    clients.regctl("registry", "login", registry.host, "-u", user, "-p", password)
    assert (
        clients.regctl("image", "digest", clients.ref("alice/login", "v1")).stdout.decode().strip()
        == manifest.digest
    )
    (clients.docker_config / "config.json").unlink()
    copied = clients.skopeo(
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        f"--src-creds={user}:{password}",
        f"--dest-creds={user}:{password}",
        f"docker://{clients.ref('alice/login', 'v1')}",
        f"docker://{clients.ref('alice/login-copy', 'v1')}",
    )
    assert copied.returncode == 0
    clients.crane("auth", "login", registry.host, "-u", user, "-p", password)
    assert clients.crane(
        "digest", clients.ref("alice/login-copy", "v1")
    ).stdout.decode().strip() == (manifest.digest)
    # Logged in, but not allowed: alice may only pull readonly/*.
    denied = clients.crane(
        "push", str(layout.path), clients.ref("readonly/x", "v1"), expect_ok=False
    )
    assert denied.returncode != 0 and b"DENIED" in denied.stderr


def run_docker(clients: Clients, args: list[str], stdin: str):  # type: ignore[no-untyped-def]
    import shutil
    import subprocess

    docker = shutil.which("docker")
    if docker is None:
        pytest.fail("the docker CLI is missing (apt package docker.io or docker-ce-cli)")
    return subprocess.run(
        [docker, *args],
        input=stdin.encode(),
        capture_output=True,
        timeout=60,
        env=clients.env | {"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
        check=False,
    )


async def test_history_names_who_pushed_and_who_moved_the_tag(
    registry: Registry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.conftest import settings_env
    from tests.registry.test_clients import image_layout

    clients = Clients(registry.host, tmp_path / "clients")
    first, _ = image_layout(tmp_path / "first", seed=95)
    second, _ = image_layout(tmp_path / "second", seed=96)
    clients.log_in(*ALICE)
    clients.crane("push", str(first.path), clients.ref("alice/history", "latest"))
    clients.log_in(*ADMIN)
    clients.crane("push", str(second.path), clients.ref("alice/history", "latest"))
    clients.crane(
        "delete",
        clients.ref(
            "alice/history",
            clients.crane("digest", clients.ref("alice/history", "latest")).stdout.decode().strip(),
        ),
    )

    for name, value in settings_env(registry.services["query"].settings).items():
        if name.startswith("LAYERLOG_"):
            monkeypatch.setenv(name, value)
    status, out, _ = await run_cli(
        capsys, "history", "--repo", "alice/history", "--tag", "latest", "--json"
    )
    assert status == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    actors = [(line.get("event"), line.get("actor")) for line in lines if line.get("actor")]
    assert any(actor == "alice" for _, actor in actors), lines
    assert any(actor == "admin" for _, actor in actors), lines
    assert "eyJ" not in out  # no token is ever printed
