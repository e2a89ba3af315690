"""Tags and digests as the OCI distribution spec writes them.

A manifest reference is a tag or a digest. Registry digests are narrower than the SDK's: the
spec registers sha256 and sha512 (lowercase hex of 64 and 128 characters); TarSum labels and
other hashes stay SDK-only, so an OCI client never stores what another OCI client cannot name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

MAX_TAG_LENGTH = 128
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# algorithm-component ([+._-] separated), ':', then the encoded part (the spec's grammar).
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_LOWER_HEX = re.compile(r"[0-9a-f]+")


class InvalidReference(ValueError):
    """A tag or digest outside the grammar; the message says why."""


class UnsupportedDigest(InvalidReference):
    """A digest in the grammar whose algorithm the registry does not offer (not sha256/sha512)."""


@dataclass(frozen=True)
class OciDigest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def matches(self, data: bytes) -> bool:
        return hashlib.new(self.algorithm, data).hexdigest() == self.hex


def is_digest(reference: str) -> bool:
    """True when the reference is shaped like a digest (it has a ':', which no tag can)."""
    return ":" in reference


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise InvalidReference(
            f"tag {tag[:150]!r} must be 1 to {MAX_TAG_LENGTH} characters of [A-Za-z0-9_.-], "
            "not starting with '.' or '-'"
        )
    return tag


def parse_oci_digest(text: str) -> OciDigest:
    """A sha256 or sha512 digest; raises InvalidReference or UnsupportedDigest."""
    if not _DIGEST.fullmatch(text):
        raise InvalidReference(f"digest {text[:150]!r} is not ALGORITHM:ENCODED")
    algorithm, _, encoded = text.partition(":")
    length = HEX_LENGTHS.get(algorithm)
    if length is None:
        raise UnsupportedDigest(
            f"digest algorithm {algorithm[:40]!r} is not supported (sha256 or sha512)"
        )
    if len(encoded) != length or not _LOWER_HEX.fullmatch(encoded):
        raise InvalidReference(
            f"{algorithm} digest must be {length} lowercase hex characters, got {encoded[:150]!r}"
        )
    return OciDigest(algorithm, encoded)


def digest_of(data: bytes, algorithm: str = "sha256") -> OciDigest:
    if algorithm not in HEX_LENGTHS:
        raise UnsupportedDigest(f"digest algorithm {algorithm!r} is not supported")
    return OciDigest(algorithm, hashlib.new(algorithm, data).hexdigest())
