"""The SDK's login, found where registry clients look for one.

In order:
1. LAYERLOG_USERNAME with LAYERLOG_PASSWORD or LAYERLOG_PASSWORD_FILE (Settings fields);
2. a docker config.json ($DOCKER_CONFIG/config.json, else ~/.docker/config.json), for the
   registry's host (the HOST:PORT of LAYERLOG_REGISTRY_URL):
   - `credHelpers[host]`, else `credsStore`: the program `docker-credential-NAME get`, which
     reads the host on stdin and writes {"Username": ..., "Secret": ...};
   - `auths[host]`: `auth` (base64 of user:password), or `username` and `password`;
3. none: anonymous.

A helper that has nothing for the host falls through to `auths`, as docker does. A config.json
that cannot be parsed, or a helper that fails, is an error (LayerLoginFailed) rather than a
silent fall to anonymous, which would only fail later and less clearly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from services.client.errors import LayerLoginFailed
from services.core.settings import Settings

HELPER_TIMEOUT_SECONDS = 30.0
# What docker's credential helpers print when they hold nothing for the server.
_NOT_FOUND = "credentials not found"
# A helper's Username for an identity (refresh) token rather than a password.
_IDENTITY_TOKEN = "<token>"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str  # where they were found, for messages: never the password itself


def registry_host(settings: Settings) -> str:
    """HOST:PORT of the registry, the key docker's config.json files logins under."""
    return urlsplit(settings.registry_url).netloc


def docker_config_path(env: Mapping[str, str]) -> Path:
    folder = env.get("DOCKER_CONFIG")
    if folder:
        return Path(folder) / "config.json"
    return Path(env.get("HOME") or Path.home()) / ".docker" / "config.json"


def _hostname(key: str) -> str:
    """A config.json key as docker compares it: without a scheme and without a path."""
    for scheme in ("http://", "https://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    return key.split("/", 1)[0]


def _entry(table: object, host: str) -> Any:
    """The table's value for host: under the host itself, else under a key that names it with
    a scheme or a path (`https://host/v1/`, as older docker versions wrote them)."""
    if not isinstance(table, dict):
        return None
    if host in table:
        return table[host]
    for key, value in table.items():
        if isinstance(key, str) and _hostname(key) == host:
            return value
    return None


async def find_credentials(
    settings: Settings, env: Mapping[str, str] | None = None
) -> Credentials | None:
    """The login to use for the registry's token endpoint; None for anonymous."""
    env = os.environ if env is None else env
    if settings.username:
        if settings.password:
            return Credentials(settings.username, settings.password, "LAYERLOG_PASSWORD")
        password = await _read_password_file(settings.password_file)
        return Credentials(settings.username, password, "LAYERLOG_PASSWORD_FILE")
    path = docker_config_path(env)
    config = await asyncio.to_thread(_read_config, path)
    if config is None:
        return None
    host = registry_host(settings)
    helper = _entry(config.get("credHelpers"), host) or config.get("credsStore")
    if helper:
        if not isinstance(helper, str):
            raise LayerLoginFailed(f"{path}: a credential helper's name is a string")
        found = await run_helper(helper, host)
        if found is not None:
            return found
    auth = _entry(config.get("auths"), host)
    if auth is None:
        return None
    return _from_auths(auth, host, path)


async def _read_password_file(path: str) -> str:
    try:
        text = await asyncio.to_thread(Path(path).read_text)
    except OSError as error:
        raise LayerLoginFailed(
            f"cannot read LAYERLOG_PASSWORD_FILE {path}: {error.strerror or error}"
        ) from None
    password = text.rstrip("\r\n")  # a file written by `echo` ends in a newline
    if not password:
        raise LayerLoginFailed(f"LAYERLOG_PASSWORD_FILE {path} is empty")
    return password


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise LayerLoginFailed(f"cannot read {path}: {error.strerror or error}") from None
    try:
        config = json.loads(text)
    except ValueError as bad:
        raise LayerLoginFailed(f"{path} is not valid JSON: {bad}") from None
    if not isinstance(config, dict):
        raise LayerLoginFailed(f"{path} is not a JSON object")
    return config


def _from_auths(auth: object, host: str, path: Path) -> Credentials | None:
    where = f"{path} (auths {host})"
    if not isinstance(auth, dict):
        raise LayerLoginFailed(f"{where}: the entry is not an object")
    encoded = auth.get("auth")
    if encoded:
        try:
            decoded = base64.b64decode(str(encoded), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise LayerLoginFailed(f"{where}: auth is not base64 of user:password") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise LayerLoginFailed(f"{where}: auth is not base64 of user:password")
        return Credentials(username, password, where)
    username, password = auth.get("username"), auth.get("password")
    if isinstance(username, str) and isinstance(password, str) and username:
        return Credentials(username, password, where)
    if auth.get("identitytoken"):
        raise LayerLoginFailed(
            f"{where} holds an identity token, which Layerlog's token endpoint does not take; "
            "log in with a password (docker login -u USER) or set LAYERLOG_USERNAME"
        )
    return None  # an empty entry: docker treats it as no login too


async def run_helper(name: str, host: str) -> Credentials | None:
    """`docker-credential-NAME get` for host: its login, or None when it has none."""
    program = f"docker-credential-{name}"
    try:
        process = await asyncio.create_subprocess_exec(
            program,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        raise LayerLoginFailed(
            f"the credential helper {program} (docker config.json) cannot be run: "
            f"{error.strerror or error}"
        ) from None
    try:
        out, err = await asyncio.wait_for(
            # As docker writes it: the server, no newline.
            process.communicate(host.encode()),
            HELPER_TIMEOUT_SECONDS,
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise LayerLoginFailed(
            f"the credential helper {program} did not answer within {HELPER_TIMEOUT_SECONDS:.0f}s"
        ) from None
    said = (out or err).decode("utf-8", "replace").strip()
    if process.returncode != 0:
        if _NOT_FOUND in said.lower():
            return None
        raise LayerLoginFailed(
            f"the credential helper {program} failed (exit status {process.returncode}): "
            f"{said[:300]}"
        )
    try:
        answer = json.loads(out)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise LayerLoginFailed(f"the credential helper {program} did not answer with JSON")
    username, secret = answer.get("Username"), answer.get("Secret")
    if not isinstance(username, str) or not isinstance(secret, str) or not username:
        raise LayerLoginFailed(f"the credential helper {program} gave no Username and Secret")
    if username == _IDENTITY_TOKEN:
        raise LayerLoginFailed(
            f"the credential helper {program} holds an identity token for {host}, which "
            "Layerlog's token endpoint does not take; log in with a password"
        )
    return Credentials(username, secret, program)
