"""Tokens from the registry's token endpoint, as registry clients get them: GET the realm
(Settings.token_realm) with HTTP Basic, `service` and `scope=repository:NAME:pull,push`.

One token per repository, kept until shortly before its `expires_in` runs out, so that every
command and request takes one with time left: a long upload outlives many tokens. A token the
query service answers 401 to is forgotten and fetched again. The login itself (credentials.py)
is looked up once per LayerService.

The SDK reads a token's claims without verifying them, only to learn who it is for (`sub`, which
commands carry as their subject) and what it grants (to refuse a push it cannot make before
sending any bytes). Trust is not the SDK's to give: the upload worker and the query service
verify every token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from services.auth.scopes import REPOSITORY, Action
from services.client.credentials import Credentials, find_credentials
from services.client.errors import LayerError, LayerLoginFailed
from services.core.records import ANONYMOUS
from services.core.settings import Settings

# Every token asks for both: a user who may only pull gets a token for pull (the endpoint
# grants what the policy allows), and one token serves a repository's reads and writes.
WANTED_ACTIONS = f"{Action.PULL},{Action.PUSH}"
# Distribution's token spec: a token answered without expires_in lasts 60 seconds.
DEFAULT_EXPIRES_IN = 60
# A token is renewed when a quarter of its life, at most this much, is left: enough for a
# request or a command to reach the service while it still holds.
MAX_RENEWAL_MARGIN_SECONDS = 30.0


class TokenServerUnavailable(LayerError):
    """The token endpoint cannot be reached or fails (5xx): worth trying again later."""


@dataclass(frozen=True)
class RepositoryToken:
    value: str = field(repr=False)
    subject: str
    actions: frozenset[str]  # what the token's access claim names for the repository
    renew_at: float  # time.monotonic(): from here on, a new one is fetched
    expires_at: float  # time.monotonic(): the services refuse it from here on

    @property
    def anonymous(self) -> bool:
        return self.subject == ANONYMOUS

    def allows(self, action: str) -> bool:
        return action in self.actions or Action.ALL in self.actions


def read_claims(value: str, name: str) -> tuple[str, frozenset[str]]:
    """(sub, the actions on repository name) of a token, read without verifying it."""
    try:
        claims: dict[str, Any] = jwt.decode(
            value,
            options={"verify_signature": False, "verify_exp": False, "verify_aud": False},
        )
    except jwt.InvalidTokenError as bad:
        raise LayerLoginFailed(
            f"the token endpoint answered with a token that is not a JWT: {bad}"
        ) from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise LayerLoginFailed("the token endpoint answered with a token that names no subject")
    actions: set[str] = set()
    entries = claims.get("access")
    for entry in entries if isinstance(entries, list) else []:
        if (
            isinstance(entry, dict)
            and entry.get("type") == REPOSITORY
            and entry.get("name") == name
            and isinstance(entry.get("actions"), list)
        ):
            actions.update(a for a in entry["actions"] if isinstance(a, str))
    return subject, frozenset(actions)


def basic_authorization(credentials: Credentials) -> str:
    """The HTTP Basic header, UTF-8 as the token endpoint reads it."""
    if ":" in credentials.username:
        raise LayerLoginFailed(
            f"the user name from {credentials.source} has a ':', which HTTP Basic cannot carry"
        )
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def scope_of(name: str) -> str:
    return f"{REPOSITORY}:{name}:{WANTED_ACTIONS}"


class Tokens:
    """The SDK's token cache, per repository, over one aiohttp session of its own."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self.realm = settings.token_realm
        self._credentials: Credentials | None = None
        self._credentials_found = False
        self._credentials_lock = asyncio.Lock()
        self._cache: dict[str, RepositoryToken] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def credentials(self) -> Credentials | None:
        async with self._credentials_lock:
            if not self._credentials_found:
                self._credentials = await find_credentials(self.settings)
                self._credentials_found = True
            return self._credentials

    async def for_repository(self, name: str) -> RepositoryToken:
        """A token for name with time left; fetched when the cached one is due for renewal."""
        cached = self._cache.get(name)
        if cached is not None and time.monotonic() < cached.renew_at:
            return cached
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            cached = self._cache.get(name)  # fetched while this call waited for the lock
            if cached is not None and time.monotonic() < cached.renew_at:
                return cached
            try:
                token = await self._fetch(name)
            except (aiohttp.ClientError, TimeoutError, TokenServerUnavailable):
                # The registry restarts, say: a token that still holds is better than failing
                # an upload that has minutes of bytes behind it.
                if cached is not None and time.monotonic() < cached.expires_at - 1:
                    return cached
                raise
            self._cache[name] = token
            return token

    def forget(self, name: str, token: RepositoryToken) -> None:
        """The token was refused: the next call fetches a new one (unless one already was)."""
        if self._cache.get(name) is token:
            del self._cache[name]

    async def _fetch(self, name: str) -> RepositoryToken:
        credentials = await self.credentials()
        headers = {}
        if credentials is not None:
            headers["Authorization"] = basic_authorization(credentials)
        asked = time.monotonic()
        params = {"service": self.settings.auth_service, "scope": scope_of(name)}
        async with self.session.get(self.realm, params=params, headers=headers) as response:
            text = await response.text(errors="replace")
            if response.status != 200:
                raise self._refused(response, text, credentials)
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise LayerLoginFailed(f"the token endpoint {self.realm} answered without a token")
        value = body.get("token") or body.get("access_token")
        if not isinstance(value, str) or not value:
            raise LayerLoginFailed(f"the token endpoint {self.realm} answered without a token")
        expires_in = body.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            expires_in = DEFAULT_EXPIRES_IN
        lifetime = max(1.0, float(expires_in))
        subject, actions = read_claims(value, name)
        return RepositoryToken(
            value=value,
            subject=subject,
            actions=actions,
            # From when it was asked for, not when it arrived: the margin covers the trip.
            renew_at=asked + lifetime - min(MAX_RENEWAL_MARGIN_SECONDS, lifetime / 4),
            expires_at=asked + lifetime,
        )

    def _refused(
        self, response: aiohttp.ClientResponse, text: str, credentials: Credentials | None
    ) -> LayerError:
        said = _message(text)
        who = "an anonymous login" if credentials is None else f"{credentials.username!r}"
        where = "" if credentials is None else f" (from {credentials.source})"
        if response.status == 401:
            return LayerLoginFailed(
                f"the registry's token endpoint {self.realm} refused the login as {who}{where}: "
                f"{said or 'wrong user name or password'}"
            )
        if response.status == 429:
            wait = response.headers.get("Retry-After", "a while")
            return LayerLoginFailed(
                f"the token endpoint {self.realm} refuses logins as {who} for now: "
                f"{said or 'too many failed logins'} (retry after {wait}s)"
            )
        if response.status == 404:
            return LayerLoginFailed(
                f"{self.realm} serves no tokens (404): logins are on here (LAYERLOG_AUTH) but "
                "not on the registry, or LAYERLOG_REGISTRY_URL / LAYERLOG_AUTH_REALM points "
                "elsewhere"
            )
        if response.status >= 500:
            return TokenServerUnavailable(
                f"the token endpoint {self.realm} answered {response.status}: {said}"
            )
        return LayerLoginFailed(
            f"the token endpoint {self.realm} answered {response.status}: {said or text[:200]}"
        )


def _message(text: str) -> str:
    """The message of an error body, in the registry's JSON or the OCI spec's form."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("message"), str):
        return body["message"][:300]
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("message", ""))[:300]
    return ""
