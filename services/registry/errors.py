"""The registry's refusals as HTTP answers: the spec's error body (services.oci.errors)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.core.waits import RETRY_AFTER_SECONDS, WaitLimit, refusal_message
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


def too_many_waiting(limit: int) -> OciError:
    return OciError(
        429,
        ErrorCode.TOOMANYREQUESTS,
        refusal_message(limit),
        {"max_waiting_requests": limit},
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def waiting(limit: WaitLimit, handler: Handler) -> Handler:
    """The handler, run only while it holds one of the process's wait slots (else 429).

    The slot is taken when the request arrives, before a byte of its body is read or a command
    is sent, and held until it answers. A refused request has therefore changed nothing, and
    sending it again is all its client needs to do. Taking the slot later, just before the wait,
    would refuse requests whose commands are on the log already: a retried POST would start a
    second upload and leave the first to expire, and a retried PATCH would meet 416 for the
    chunks its first attempt sent. The cost is that a PATCH holds a slot while its body streams,
    not only while it waits for the chunks to be staged.
    """

    @functools.wraps(handler)
    async def capped(request: web.Request) -> web.StreamResponse:
        if not limit.try_take():
            raise too_many_waiting(limit.limit)
        try:
            return await handler(request)
        finally:
            limit.give()

    return capped


def answering(handler: Handler) -> Handler:
    """The handler, with an OciError raised anywhere inside it answered as the spec says."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OciError as refusal:
            return oci_response(refusal)

    return answer
