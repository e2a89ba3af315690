"""The registry's refusals as HTTP answers: the spec's error body (services.oci.errors)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.oci.errors import ErrorCode, OciError


def oci_response(error: OciError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def unavailable(message: str) -> OciError:
    return OciError(503, ErrorCode.UNAVAILABLE, message, headers={"Retry-After": "1"})


def worker_failed(what: str) -> OciError:
    """The upload worker failed on the command (a bug, in its log and the dead letters): a 500
    the client may retry, carrying nothing of the failure's own text."""
    return OciError(
        500,
        ErrorCode.UNKNOWN,
        f"{what} failed inside Layerlog; the upload worker logged it and kept the command in "
        "its dead letters",
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answering(handler: Handler) -> Handler:
    """The handler, with an OciError raised anywhere inside it answered as the spec says."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OciError as refusal:
            return oci_response(refusal)

    return answer
