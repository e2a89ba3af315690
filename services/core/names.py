"""Validation of the identifiers clients send: repository names and upload ids."""

from __future__ import annotations

import re
import uuid

MAX_REPOSITORY_LENGTH = 255
# The distribution grammar: lowercase alphanumeric components joined by '.', '_', '__' or runs
# of '-', separated by '/'.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


class InvalidName(ValueError):
    """A repository name or upload id that does not follow the rules; the message says which."""


def check_repository(name: str) -> str:
    if not name:
        raise InvalidName("repository name is empty")
    if len(name) > MAX_REPOSITORY_LENGTH:
        raise InvalidName(
            f"repository name is {len(name)} characters; at most {MAX_REPOSITORY_LENGTH} allowed"
        )
    if not _REPOSITORY.fullmatch(name):
        raise InvalidName(
            f"repository name {name!r} must be lowercase components of [a-z0-9] joined by "
            "'.', '_', '__' or '-', separated by '/'"
        )
    return name


def check_upload_id(upload_id: str) -> str:
    try:
        canonical = str(uuid.UUID(upload_id))
    except (ValueError, TypeError, AttributeError):
        raise InvalidName(f"upload id {upload_id!r} is not a UUID") from None
    if canonical != upload_id:
        raise InvalidName(f"upload id {upload_id!r} must be a lowercase hyphenated UUID")
    return upload_id
