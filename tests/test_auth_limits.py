"""Bounded logins on the real stack: the per-principal request rate and failed logins at /token.

The limiters live in each registry process, so every test here starts a registry of its own:
a principal it locks out is locked out of that process only, never out of another test's.
"""

from __future__ import annotations

import asyncio
import json
from base64 import b64encode
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.core.settings import Settings
from tests.authfiles import USERS, with_auth
from tests.conftest import ServiceProcess, registry_process, wait_for_query
from tests.limit_checks import metric, too_many


@asynccontextmanager
async def registry_with_auth(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, **overrides: Any
) -> AsyncIterator[ServiceProcess]:
    """A registry process with logins on and the given settings; stopped by its pid after."""
    own = replace(with_auth(settings, tmp_path_factory.mktemp("auth")), **overrides)
    registry = registry_process(own, tmp_path_factory).start()
    try:
        await wait_for_query(registry.settings, url=registry.settings.registry_url)
        yield registry
    finally:
        registry.stop()


async def token_of(http: aiohttp.ClientSession, user: str, password: str) -> aiohttp.ClientResponse:
    """GET /token with Basic credentials; the response, its body already read."""
    async with http.get(
        "/token",
        params={"service": "layerlog", "scope": f"repository:{user}/limits:pull"},
        headers={"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()},
    ) as response:
        await response.read()
        return response


async def bearer(http: aiohttp.ClientSession, user: str) -> dict[str, str]:
    response = await token_of(http, user, USERS[user])
    assert response.status == 200, await response.text()
    return {"Authorization": f"Bearer {(await response.json())['token']}"}


async def test_a_principal_past_its_rate_gets_429_and_others_are_served(settings, tmp_path_factory):
    async with registry_with_auth(settings, tmp_path_factory, auth_rate_limit=5) as registry:
        async with aiohttp.ClientSession(base_url=registry.settings.registry_url) as http:
            alice, carol = await bearer(http, "alice"), await bearer(http, "carol")

            async def base(headers: dict[str, str]) -> tuple[int, str, str | None]:
                async with http.get("/v2/", headers=headers) as response:
                    return (
                        response.status,
                        await response.text(),
                        response.headers.get("Retry-After"),
                    )

            answers = await asyncio.gather(*(base(alice) for _ in range(40)))
            statuses = [status for status, _, _ in answers]
            # A burst of twice the rate goes (10), plus what refills while the 40 are answered.
            assert 10 <= statuses.count(200) < 40
            assert set(statuses) == {200, 429}
            _, text, retry_after = next(a for a in answers if a[0] == 429)
            body = json.loads(text)
            assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
            assert "alice" in body["errors"][0]["message"]
            assert retry_after is not None and int(retry_after) >= 1
            refused = statuses.count(429)
            assert await metric(http, "layerlog_auth_refusals_total", status="429") == refused

            # Carol has a bucket of her own: alice's burst took nothing from it.
            carol_statuses = [
                s for s, _, _ in await asyncio.gather(*(base(carol) for _ in range(5)))
            ]
            assert carol_statuses == [200] * 5

            await asyncio.sleep(int(retry_after))
            assert (await base(alice))[0] == 200


async def test_failed_logins_are_logged_counted_and_then_refused_until_the_window_passes(
    settings, tmp_path_factory
):
    async with registry_with_auth(
        settings, tmp_path_factory, auth_login_failures=3, auth_login_window_seconds=4
    ) as registry:
        async with aiohttp.ClientSession(base_url=registry.settings.registry_url) as http:
            for _ in range(3):
                response = await token_of(http, "alice", "not-her-password")
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Basic ")
                assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
            # The right password now: still refused, the user has had their tries.
            retry_after, _ = await too_many(await token_of(http, "alice", USERS["alice"]))
            assert retry_after <= 4
            failures = "layerlog_auth_login_failures_total"
            assert await metric(http, failures, reason="bad_credentials") == 3
            assert await metric(http, failures, reason="rate_limited") == 1

            await asyncio.sleep(retry_after)
            response = await token_of(http, "alice", USERS["alice"])
            assert response.status == 200 and (await response.json())["token"]

    warnings = [
        line
        for line in map(json.loads, _log_lines(registry.log_path))
        if line["level"] == "WARNING" and line["logger"] == "services.auth.http"
    ]
    wrong = [w for w in warnings if "wrong user or password" in w["message"]]
    assert len(wrong) == 3
    assert all("'alice'" in w["message"] and "127.0.0.1" in w["message"] for w in wrong)
    assert any("too many failures" in w["message"] for w in warnings)


async def test_guesses_sent_all_at_once_get_no_more_tries_than_guesses_sent_one_by_one(
    settings, tmp_path_factory
):
    """Each guess is checked against the limit before its password is: were the checks made
    before any of the guesses' bcrypt ended, twenty concurrent guesses would all be tried."""
    async with registry_with_auth(settings, tmp_path_factory, auth_login_failures=3) as registry:
        async with aiohttp.ClientSession(base_url=registry.settings.registry_url) as http:
            guesses = await asyncio.gather(
                *(token_of(http, "alice", f"guess-{n}") for n in range(20))
            )
            statuses = sorted(response.status for response in guesses)
            assert statuses == [401] * 3 + [429] * 17
            failures = "layerlog_auth_login_failures_total"
            assert await metric(http, failures, reason="bad_credentials") == 3


def _log_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("{")]
