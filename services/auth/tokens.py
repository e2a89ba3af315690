"""Short-lived JWTs in Distribution's token format: `sub`, `aud` (the service), `iss`, `exp`,
`nbf`, `iat`, `jti`, and `access`: [{"type", "name", "actions"}].

Verification trusts nothing in the token to choose how it is checked: the kid picks one of the
configured keys, that key fixes the algorithm and the issuer, and times are judged against a
clock the caller passes (the broker's log-append time, for a command replayed after a crash).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jwt

from services.auth.keys import SigningKey, VerifyingKey
from services.auth.scopes import Access, Grant

# Clock skew allowed between the issuer and this process for nbf and iat.
LEEWAY_SECONDS = 30
# A header that carries or points at a key: the key must come from configuration.
_KEY_HEADERS = frozenset({"jwk", "jku", "x5c", "x5u"})
MAX_TOKEN_BYTES = 16 * 1024


class TokenProblem(StrEnum):
    MALFORMED = "MALFORMED"
    EMBEDDED_KEY = "EMBEDDED_KEY"
    NO_KEY_ID = "NO_KEY_ID"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    WRONG_ALGORITHM = "WRONG_ALGORITHM"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    WRONG_AUDIENCE = "WRONG_AUDIENCE"
    WRONG_ISSUER = "WRONG_ISSUER"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    MISSING_CLAIM = "MISSING_CLAIM"
    BAD_ACCESS = "BAD_ACCESS"


class TokenRejected(Exception):
    def __init__(self, problem: TokenProblem, message: str) -> None:
        super().__init__(f"{problem}: {message}")
        self.problem = problem
        self.message = message


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: float


class TokenIssuer:
    def __init__(self, key: SigningKey, issuer: str, audience: str, ttl_seconds: int) -> None:
        self.key = key
        self.issuer = issuer
        self.audience = audience
        self.ttl_seconds = ttl_seconds

    def issue(self, subject: str, access: list[Access], now: float | None = None) -> IssuedToken:
        moment = int(time.time() if now is None else now)
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "iat": moment,
            "nbf": moment,
            "exp": moment + self.ttl_seconds,
            "jti": uuid.uuid4().hex,
            "access": [entry.claim() for entry in access],
        }
        token = jwt.encode(
            claims, self.key.key, algorithm=self.key.algorithm, headers={"kid": self.key.kid}
        )
        return IssuedToken(token, self.ttl_seconds, moment)


class TokenVerifier:
    def __init__(self, keys: dict[str, VerifyingKey], audience: str) -> None:
        self.keys = keys
        self.audience = audience

    def verify(self, token: str, at: float | None = None, grace: float = 0.0) -> Grant:
        """The token's grant, if it is valid at `at` (now by default); else TokenRejected.

        `grace` extends the expiry: a command that a request with a valid token began may
        reach the log a little after the token ran out.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRejected(TokenProblem.MALFORMED, "the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as bad:
            raise TokenRejected(TokenProblem.MALFORMED, f"not a JWT: {bad}") from None
        carried = _KEY_HEADERS & set(header)
        if carried:
            raise TokenRejected(
                TokenProblem.EMBEDDED_KEY,
                f"the token's header carries a key ({', '.join(sorted(carried))}); "
                "keys come only from this registry's configuration",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected(TokenProblem.NO_KEY_ID, "the token's header names no kid")
        key = self.keys.get(kid)
        if key is None:
            raise TokenRejected(TokenProblem.UNKNOWN_KEY, f"no trusted key has kid {kid[:80]!r}")
        if header.get("alg") != key.algorithm:
            raise TokenRejected(
                TokenProblem.WRONG_ALGORITHM,
                f"key {kid[:80]} signs with {key.algorithm}, the token says "
                f"{str(header.get('alg'))[:20]!r}",
            )
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=key.issuer,
                # Times are checked below, against the caller's clock, not PyJWT's.
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["sub", "aud", "iss", "exp"],
                },
            )
        except jwt.InvalidAudienceError:
            raise TokenRejected(
                TokenProblem.WRONG_AUDIENCE, "the token is not for this service"
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenRejected(
                TokenProblem.WRONG_ISSUER, f"key {kid[:80]} belongs to issuer {key.issuer!r}"
            ) from None
        except jwt.MissingRequiredClaimError as missing:
            raise TokenRejected(TokenProblem.MISSING_CLAIM, str(missing)) from None
        except jwt.InvalidSignatureError:
            raise TokenRejected(
                TokenProblem.BAD_SIGNATURE, "the signature does not verify"
            ) from None
        except jwt.InvalidTokenError as bad:
            raise TokenRejected(TokenProblem.MALFORMED, str(bad)) from None
        _check_times(claims, time.time() if at is None else at, grace)
        return Grant(
            subject=_subject(claims),
            access=_access(claims.get("access", [])),
            token=token,
            issuer=key.issuer,
            expires=_number(claims, "exp"),
        )


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejected(TokenProblem.MALFORMED, f"{name} is not a number")
    return float(value)


def _check_times(claims: dict[str, Any], at: float, grace: float) -> None:
    expires = _number(claims, "exp")
    assert expires is not None  # required above
    if at >= expires + grace:
        raise TokenRejected(TokenProblem.EXPIRED, f"the token expired at {int(expires)}")
    not_before = _number(claims, "nbf")
    if not_before is not None and at + LEEWAY_SECONDS < not_before:
        raise TokenRejected(TokenProblem.NOT_YET_VALID, f"the token is valid from {not_before}")
    issued = _number(claims, "iat")
    if issued is not None and at + LEEWAY_SECONDS < issued:
        raise TokenRejected(TokenProblem.NOT_YET_VALID, "the token was issued in the future")


def _subject(claims: dict[str, Any]) -> str:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise TokenRejected(TokenProblem.MISSING_CLAIM, "the token names no subject")
    return subject


def _access(entries: object) -> tuple[Access, ...]:
    if not isinstance(entries, list):
        raise TokenRejected(TokenProblem.BAD_ACCESS, "access is not a list")
    found = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise TokenRejected(TokenProblem.BAD_ACCESS, "an access entry is not an object")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if not isinstance(kind, str) or not isinstance(name, str) or not isinstance(actions, list):
            raise TokenRejected(TokenProblem.BAD_ACCESS, "an access entry lacks type/name/actions")
        found.append(Access(kind, name, frozenset(a for a in actions if isinstance(a, str))))
    return tuple(found)
