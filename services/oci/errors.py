"""The distribution spec's errors: its codes, and the body every refusal carries.

`{"errors": [{"code", "message", "detail"}]}`. The read side and the write side raise OciError
from their checks; their HTTP layer turns it into a response. Never a 500 for bad input.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_BLOB_UNKNOWN = "MANIFEST_BLOB_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    SIZE_INVALID = "SIZE_INVALID"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    # Not in the spec's table: Distribution's, for a bad ?n= and for a backend outage (503,
    # which clients retry), and for what has no code at all (a 500).
    PAGINATION_NUMBER_INVALID = "PAGINATION_NUMBER_INVALID"
    UNAVAILABLE = "UNAVAILABLE"
    UNKNOWN = "UNKNOWN"


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    # str: an ErrorCode, or one of the SDK's own codes the query service answers with too.
    return {"errors": [{"code": str(code), "message": message, "detail": detail or {}}]}


class OciError(Exception):
    """A refusal with the spec's body: raised by a check, answered by the HTTP layer."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.detail)
