"""Logins and rights over HTTP: the Bearer challenge, the token endpoint and the gate every
registry and query request passes, in the spirit of Distribution's token auth.

A request without a token is served only where the policy lets anyone in (its `anonymous`
entries); otherwise it gets 401 and a challenge naming the scope it needs. A token that is valid
but does not cover the request gets 401 with error="insufficient_scope" when the policy would
grant the scope (the client asks for a new token), and 403 DENIED when it would not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web
from multidict import MultiDict, MultiDictProxy
from prometheus_client import Counter

from services.auth.keys import KeyInvalid, load_signing_key, load_verifying_keys
from services.auth.passwords import Htpasswd
from services.auth.policy import ANONYMOUS, Policy, PolicyRules
from services.auth.scopes import (
    CATALOG_ACCESS,
    REGISTRY,
    REPOSITORY,
    Access,
    Action,
    Grant,
    ScopeInvalid,
    parse_scopes,
    repository,
)
from services.auth.tokens import TokenIssuer, TokenRejected, TokenVerifier
from services.core.settings import Settings
from services.oci.errors import ErrorCode, error_body

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOGIN_FAILURES = Counter(
    "layerlog_auth_login_failures_total", "Logins refused at the token endpoint", ["reason"]
)
REFUSALS = Counter(
    "layerlog_auth_refusals_total", "Requests refused by the gate", ["status", "reason"]
)
# A login that succeeded is not checked with bcrypt again for this long (see _Logins).
LOGIN_CACHE_SECONDS = 60.0
FAILURE_WINDOW_SECONDS = 60.0
# Verified tokens kept; past this many (live ones), the cache starts over.
VERIFIED_CACHE = 10_000
_OPEN_ROUTES = frozenset({"healthz", "readyz", "metrics", "token"})


@dataclass(frozen=True)
class Caller:
    """Who made the request and what they may do: the grant, and the policy for listings."""

    grant: Grant
    policy: PolicyRules

    @property
    def subject(self) -> str:
        return self.grant.subject

    @property
    def anonymous(self) -> bool:
        return self.grant.subject == ANONYMOUS

    def may_list(self, name: str) -> bool:
        """Whether the catalog shows this repository to the caller."""
        subject = None if self.anonymous else self.subject
        return Action.PULL in self.policy.actions(subject, name)


CALLER = web.RequestKey("caller", Caller)


def caller_of(request: web.Request) -> Caller | None:
    """The request's caller; None when auth is off."""
    return request.get(CALLER)


def required_access(request: web.Request) -> tuple[Access, ...] | None:
    """What the request needs: None for an open route, () for any logged-in caller."""
    route = request.match_info.route.name
    if route in _OPEN_ROUTES:
        return None
    name = request.match_info.get("name", "")
    method = request.method
    if route == "catalog":
        return (CATALOG_ACCESS,)
    if route in ("blob", "manifest", "tags", "referrers") and method in ("GET", "HEAD"):
        return (repository(name, Action.PULL),)
    if route in ("registry-blob", "registry-manifest") and method == "DELETE":
        return (repository(name, Action.DELETE),)
    if route == "registry-manifest" and method == "PUT":
        return (repository(name, Action.PUSH),)
    if route == "registry-upload":
        return (repository(name, Action.PUSH),)
    if route == "registry-upload-start":
        needed = [repository(name, Action.PUSH)]
        source = request.query.get("from")
        if "mount" in request.query and source:
            # Mounting reads the source: pull there too (Harbor's CVE-2019-16919 was a scope
            # that reached further than the caller's rights).
            needed.append(repository(source, Action.PULL))
        return tuple(needed)
    # /v2/ itself, the query service's upload routes (which check the upload's repository
    # themselves), and anything unmatched: a caller who logged in.
    return ()


class RateLimiter:
    """A token bucket per key: `rate` a second, bursts of twice that."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = 2 * rate
        self.buckets: dict[str, tuple[float, float]] = {}

    def wait(self, key: str, now: float | None = None) -> float:
        """0 when the request may go now (and is counted), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, stamp = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[key] = (tokens - 1, now)
        if len(self.buckets) > 100_000:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        refill = self.burst / self.rate
        self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < refill}


class FailureLimiter:
    """Counts failed logins per key in a sliding window; past the limit the key must wait."""

    def __init__(self, limit: int, window: float = FAILURE_WINDOW_SECONDS) -> None:
        self.limit = limit
        self.window = window
        self.failures: dict[str, deque[float]] = {}

    def wait(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        recent = self._recent(key, now)
        if recent is None or len(recent) < self.limit:
            return 0.0
        # Until fewer than `limit` remain: attempts checked together can fail past the limit.
        return recent[len(recent) - self.limit] + self.window - now

    def failed(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.failures.setdefault(key, deque()).append(now)
        self._recent(key, now)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        recent = self.failures.get(key)
        if recent is None:
            return None
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if not recent:
            del self.failures[key]
            return None
        return recent


class _OneAtATime:
    """Login checks one at a time per key (a user, a client address). A check reads the failures
    so far, and the bcrypt that may add one takes a quarter second: without this, guesses sent
    all at once would all pass the check before the first of them had failed. A guess that
    waits its turn behind a lock-out is refused at once, so a queue of them drains quickly."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, keys: tuple[str, ...]) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            # Callers always pass the keys in one order (user, then address): no deadlock.
            for key in keys:
                await stack.enter_async_context(self._one(key))
            yield

    @asynccontextmanager
    async def _one(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _Logins:
    """bcrypt once per minute per login, not once per token: a client fetching a token for each
    repository it touches would otherwise spend a quarter second of CPU on every request. The
    cache holds a keyed hash of the credentials, under a key that lives only in this process."""

    def __init__(self, htpasswd: Htpasswd) -> None:
        self.htpasswd = htpasswd
        self.key = os.urandom(32)
        self.verified: dict[bytes, float] = {}

    async def verify(self, user: str, password: str) -> bool:
        mark = hmac.new(self.key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        now = time.monotonic()
        if self.verified.get(mark, 0.0) > now:
            return True
        if not await asyncio.to_thread(self.htpasswd.verify, user, password):
            return False
        if len(self.verified) > 10_000:
            self.verified = {k: v for k, v in self.verified.items() if v > now}
        self.verified[mark] = now + LOGIN_CACHE_SECONDS
        return True


def _json_error(
    status: int, code: ErrorCode, message: str, detail: object = None, **headers: str
) -> web.Response:
    body = {"error": str(code), "message": message, **error_body(code, message, detail)}
    headers = {"Docker-Distribution-API-Version": "registry/2.0", **headers}
    return web.json_response(body, status=status, headers=headers)


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _client_address(request: web.Request) -> str:
    return request.remote or "unknown"


class Gate:
    """The aiohttp middleware every request passes, and (on the registry) the token endpoint."""

    def __init__(self, settings: Settings, *, issues_tokens: bool) -> None:
        self.settings = settings
        self.policy = Policy(settings.auth_policy_file)
        keys = load_verifying_keys(
            settings.auth_keys_dir, settings.auth_issuer, settings.auth_issuers_file or None
        )
        if not keys:
            raise KeyInvalid(
                f"LAYERLOG_AUTH is on but {settings.auth_keys_dir} (LAYERLOG_AUTH_KEYS_DIR) holds "
                "no public key (NAME.pub) to check tokens with; run `layerlog auth init`"
            )
        self.verifier = TokenVerifier(keys, settings.auth_service)
        self.issuer: TokenIssuer | None = None
        if issues_tokens:
            self.issuer = TokenIssuer(
                load_signing_key(settings.auth_keys_dir),
                settings.auth_issuer,
                settings.auth_service,
                settings.auth_token_ttl_seconds,
            )
        self.policy.current()  # a broken policy or htpasswd file stops the service here
        htpasswd = Htpasswd(settings.auth_htpasswd_file)
        htpasswd.users()
        self.logins = _Logins(htpasswd)
        self.verified: dict[str, Grant] = {}
        self.rates = RateLimiter(settings.auth_rate_limit)
        self.failures = FailureLimiter(
            settings.auth_login_failures, settings.auth_login_window_seconds
        )
        self.login_turns = _OneAtATime()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        if self.issuer is not None:
            token = router.add_resource("/token", name="token")
            token.add_route("GET", self.token)
            token.add_route("POST", self.token)

    # The gate

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        needed = required_access(request)
        if needed is None:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        token = _bearer(header)
        # A stat() of the file, and a parse only when it changed: cheaper than a thread hop.
        policy = self.policy.current()
        if token is None:
            grant = self._anonymous(policy, needed)
            if grant is None:
                return self._challenge(needed, "no token", "authentication required")
        else:
            try:
                grant = self._verified(token)
            except TokenRejected as rejected:
                return self._challenge(needed, rejected.problem, rejected.message, "invalid_token")
            missing = [a for a in needed if not grant.allows(a)]
            if missing:
                return self._insufficient(grant, policy, needed, missing)
        key = f"ip:{_client_address(request)}" if grant.subject == ANONYMOUS else grant.subject
        wait = self.rates.wait(key)
        if wait > 0:
            REFUSALS.labels("429", "rate").inc()
            return _json_error(
                429,
                ErrorCode.TOOMANYREQUESTS,
                f"more than {self.settings.auth_rate_limit} requests a second from {grant.subject}",
                **{"Retry-After": str(max(1, math.ceil(wait)))},
            )
        request[CALLER] = Caller(grant, policy)
        return await handler(request)

    def _verified(self, token: str) -> Grant:
        """The token's grant; a client sends the same token with many requests, so a verified
        one is kept until it expires rather than checked (an Ed25519 verify) each time."""
        now = time.time()
        known = self.verified.get(token)
        if known is not None and known.expires is not None and now < known.expires:
            return known
        grant = self.verifier.verify(token, at=now)
        if len(self.verified) >= VERIFIED_CACHE:
            self.verified = {t: g for t, g in self.verified.items() if (g.expires or 0) > now}
            if len(self.verified) >= VERIFIED_CACHE:
                self.verified.clear()
        self.verified[token] = grant
        return grant

    def _anonymous(self, policy: PolicyRules, needed: tuple[Access, ...]) -> Grant | None:
        """A grant for a caller without a token, if the policy lets anyone do all of `needed`."""
        if not needed:
            return None  # /v2/ and the like: the spec's 401 tells clients to log in
        access = []
        for entry in needed:
            if entry.type != REPOSITORY:
                return None
            if not entry.actions <= policy.actions(None, entry.name):
                return None
            access.append(entry)
        token = None
        if self.issuer is not None:
            # Commands carry a token the upload worker verifies: an anonymous push (where the
            # policy allows one) gets one of its own, for exactly what it may do.
            token = self.issuer.issue(ANONYMOUS, access).token
        return Grant(ANONYMOUS, tuple(access), token=token, issuer=self.settings.auth_issuer)

    def _challenge(
        self,
        needed: tuple[Access, ...],
        reason: str,
        message: str,
        error: str | None = None,
        status: int = 401,
    ) -> web.Response:
        REFUSALS.labels(str(status), str(reason)).inc()
        parts = [f'realm="{self.settings.token_realm}"', f'service="{self.settings.auth_service}"']
        if needed:
            parts.append(f'scope="{" ".join(a.scope() for a in needed)}"')
        if error:
            parts.append(f'error="{error}"')
        detail = [a.claim() for a in needed]
        return _json_error(
            status,
            ErrorCode.UNAUTHORIZED,
            message,
            detail,
            **{"WWW-Authenticate": "Bearer " + ",".join(parts)},
        )

    def _insufficient(
        self,
        grant: Grant,
        policy: PolicyRules,
        needed: tuple[Access, ...],
        missing: list[Access],
    ) -> web.Response:
        subject = None if grant.subject == ANONYMOUS else grant.subject
        if all(self._policy_allows(policy, subject, a) for a in missing):
            return self._challenge(
                needed,
                "insufficient_scope",
                "the token does not cover this request; get one for the scope",
                "insufficient_scope",
            )
        REFUSALS.labels("403", "denied").inc()
        what = "; ".join(f"{'+'.join(sorted(a.actions))} {a.type} {a.name}" for a in missing)
        return _json_error(
            403,
            ErrorCode.DENIED,
            f"{grant.subject} may not {what}",
            [a.claim() for a in missing],
        )

    @staticmethod
    def _policy_allows(policy: PolicyRules, subject: str | None, access: Access) -> bool:
        if access.type == REGISTRY:
            return subject is not None
        return access.actions <= policy.actions(subject, access.name)

    # GET or POST /token

    async def token(self, request: web.Request) -> web.Response:
        assert self.issuer is not None
        form: MultiDictProxy[str | bytes | web.FileField] = (
            await request.post() if request.method == "POST" else MultiDictProxy(MultiDict())
        )
        params = {**request.query, **{k: str(v) for k, v in form.items()}}
        service = params.get("service")
        if service is not None and service != self.settings.auth_service:
            return _json_error(
                400,
                ErrorCode.DENIED,
                f"this token server serves {self.settings.auth_service!r}, not {service[:100]!r}",
            )
        credentials = _basic_credentials(request.headers.get("Authorization", ""))
        if request.method == "POST" and params.get("grant_type") == "password":
            credentials = (params.get("username", ""), params.get("password", ""))
        elif request.method == "POST" and params.get("grant_type") not in (None, "password"):
            return _json_error(
                400, ErrorCode.UNSUPPORTED, "grant_type must be password (no refresh tokens)"
            )
        subject: str | None = None
        if credentials is not None:
            subject = await self._login(request, *credentials)
            if isinstance(subject, web.Response):
                return subject
        scopes = request.query.getall("scope", []) + form.getall("scope", [])
        try:
            wanted = parse_scopes([str(s) for s in scopes])
        except ScopeInvalid as bad:
            return _json_error(400, ErrorCode.DENIED, str(bad))
        policy = await asyncio.to_thread(self.policy.current)
        granted = [g for g in (_grantable(policy, subject, a) for a in wanted) if g is not None]
        issued = self.issuer.issue(subject or ANONYMOUS, granted)
        moment = datetime.fromtimestamp(issued.issued_at, UTC).isoformat().replace("+00:00", "Z")
        return web.json_response(
            {
                "token": issued.token,
                "access_token": issued.token,
                "expires_in": issued.expires_in,
                "issued_at": moment,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _login(self, request: web.Request, user: str, password: str) -> str | web.Response:
        address = _client_address(request)
        keys = (f"user:{user[:128]}", f"ip:{address}")
        async with self.login_turns.hold(keys):
            return await self._login_turn(keys, address, user, password)

    async def _login_turn(
        self, keys: tuple[str, ...], address: str, user: str, password: str
    ) -> str | web.Response:
        wait = max(self.failures.wait(key) for key in keys)
        if wait > 0:
            LOGIN_FAILURES.labels("rate_limited").inc()
            log.warning("login as %r from %s refused: too many failures", user[:128], address)
            return _json_error(
                429,
                ErrorCode.TOOMANYREQUESTS,
                "too many failed logins; wait before trying again",
                **{"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if await self.logins.verify(user, password):
            return user
        for key in keys:
            self.failures.failed(key)
        LOGIN_FAILURES.labels("bad_credentials").inc()
        log.warning("login as %r from %s refused: wrong user or password", user[:128], address)
        return _json_error(
            401,
            ErrorCode.UNAUTHORIZED,
            "wrong user name or password",
            **{"WWW-Authenticate": f'Basic realm="{self.settings.auth_service}"'},
        )


def _grantable(policy: PolicyRules, subject: str | None, wanted: Access) -> Access | None:
    """The part of `wanted` the policy gives subject (None: anonymous); None if nothing."""
    if wanted.type == REGISTRY and wanted.name == CATALOG_ACCESS.name:
        # Any user who logged in may list; the catalog shows only what they may pull.
        return CATALOG_ACCESS if subject is not None else None
    if wanted.type != REPOSITORY:
        return None
    allowed = policy.actions(subject, wanted.name)
    actions = allowed if Action.ALL in wanted.actions else wanted.actions & allowed
    return Access(REPOSITORY, wanted.name, frozenset(actions)) if actions else None
