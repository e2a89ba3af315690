"""Signing keys and the keys trusted to verify tokens, each known by its kid.

A token's header names a kid; the key is looked up among the configured ones and its algorithm
is the key's own, never the header's. A key or a key URL inside a token's header (jwk, jku, x5c,
x5u) is never used: Distribution's CVE-2025-24976 was a key taken from the token itself.

Layerlog's own keys live in LAYERLOG_AUTH_KEYS_DIR as NAME.key (private, PKCS#8 PEM) and
NAME.pub (public). The newest NAME.key, in name order, signs; every NAME.pub verifies. To rotate:
`layerlog auth rotate-key` adds a newer pair; drop the old .pub once its tokens have expired.
Other issuers' public keys (a Harbor or docker_auth token server) are listed in
LAYERLOG_AUTH_ISSUERS_FILE.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from services.auth.errors import AuthSetupError


class KeyInvalid(AuthSetupError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(value: int, size: int | None = None) -> bytes:
    return value.to_bytes(size or (value.bit_length() + 7) // 8, "big")


def algorithm_of(key: PublicKeyTypes) -> str:
    """The one JWS algorithm a key verifies: from the key's type, never from a token."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if key.curve.name in by_curve:
            return by_curve[key.curve.name]
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return "RS256"
    raise KeyInvalid(
        "a token key is Ed25519, EC P-256/384/521 or RSA of 2048 bits or more, "
        f"got {type(key).__name__}"
    )


def thumbprint(key: PublicKeyTypes) -> str:
    """The key's RFC 7638 JWK thumbprint: its default kid."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        members = {"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)}
    elif isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
        members = {
            "crv": crv,
            "kty": "EC",
            "x": _b64(_int_bytes(numbers.x, size)),
            "y": _b64(_int_bytes(numbers.y, size)),
        }
    elif isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        members = {"e": _b64(_int_bytes(numbers.e)), "kty": "RSA", "n": _b64(_int_bytes(numbers.n))}
    else:
        raise KeyInvalid(f"no thumbprint for a {type(key).__name__}")
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class VerifyingKey:
    kid: str
    key: PublicKeyTypes
    algorithm: str
    issuer: str  # the iss a token signed by this key must carry


@dataclass(frozen=True)
class SigningKey:
    kid: str
    key: PrivateKeyTypes
    algorithm: str


def _load_public(path: Path) -> PublicKeyTypes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KeyInvalid(f"cannot read the public key {path}: {error.strerror}") from None
    try:
        if b"CERTIFICATE" in data:
            from cryptography import x509

            return x509.load_pem_x509_certificate(data).public_key()
        return serialization.load_pem_public_key(data)
    except ValueError as bad:
        raise KeyInvalid(f"{path} is not a PEM public key or certificate: {bad}") from None


def load_signing_key(keys_dir: str | Path) -> SigningKey:
    """The newest NAME.key in keys_dir."""
    candidates = sorted(Path(keys_dir).glob("*.key"))
    if not candidates:
        raise KeyInvalid(f"no signing key (NAME.key) in {keys_dir}; `layerlog auth init` makes one")
    path = candidates[-1]
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as bad:
        raise KeyInvalid(f"{path} is not an unencrypted PEM private key: {bad}") from None
    public = private.public_key()
    return SigningKey(thumbprint(public), private, algorithm_of(public))


def load_verifying_keys(
    keys_dir: str | Path, issuer: str, issuers_file: str | None = None
) -> dict[str, VerifyingKey]:
    """Every trusted key by kid: Layerlog's own NAME.pub files, and the issuers file's keys."""
    found: dict[str, VerifyingKey] = {}

    def add(kid: str, key: PublicKeyTypes, iss: str, where: Path | str) -> None:
        if kid in found:
            raise KeyInvalid(f"{where}: kid {kid!r} is taken by another trusted key")
        found[kid] = VerifyingKey(kid, key, algorithm_of(key), iss)

    for path in sorted(Path(keys_dir).glob("*.pub")):
        key = _load_public(path)
        add(thumbprint(key), key, issuer, path)
    if issuers_file:
        try:
            data = tomllib.loads(Path(issuers_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as bad:
            raise KeyInvalid(f"LAYERLOG_AUTH_ISSUERS_FILE {issuers_file}: {bad}") from None
        for number, entry in enumerate(data.get("issuer", []), 1):
            if not isinstance(entry, dict) or not {"name", "public_key"} <= set(entry):
                raise KeyInvalid(
                    f"{issuers_file}: [[issuer]] {number} needs name (the iss) and public_key"
                )
            key = _load_public(Path(entry["public_key"]))
            add(str(entry.get("kid") or thumbprint(key)), key, str(entry["name"]), issuers_file)
    return found


def generate_key_pair(keys_dir: str | Path) -> Path:
    """A new Ed25519 pair, named by the time so it sorts after every older one."""
    directory = Path(keys_dir)
    directory.mkdir(parents=True, exist_ok=True)
    name = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(directory / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    (directory / f"{name}.pub").write_bytes(public)
    return directory / f"{name}.key"
