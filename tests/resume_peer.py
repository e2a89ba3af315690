"""One side of the cross-process resume test, run as `python -m tests.resume_peer ROLE`.

writer: for each line "REPOSITORY SIZES" on stdin (SIZES comma-separated), starts an upload,
writes pieces of those sizes, flushes, and prints {"uuid", "offset"}: what Kafka acknowledged.
resumer: for each upload id on stdin, resumes it at once and prints {"uuid", "offset"} or
{"uuid", "error"} (the exception's class name).
Settings come from LAYERLOG_* (the test session's topics and query service).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from services.client import LayerError, LayerService


async def _lines() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    return reader


def _say(message: dict[str, object]) -> None:
    print(json.dumps(message), flush=True)


async def writer(service: LayerService, line: str) -> None:
    repository, _, sizes = line.partition(" ")
    upload = await service.upload(repository)
    for size in (int(s) for s in sizes.split(",") if s):
        await upload.write(os.urandom(size))
    await upload.flush()
    _say({"uuid": upload.uuid, "offset": upload.offset})


async def resumer(service: LayerService, line: str) -> None:
    try:
        upload = await service.resume(line)
    except LayerError as error:
        _say({"uuid": line, "error": type(error).__name__, "message": str(error)})
        return
    _say({"uuid": upload.uuid, "offset": upload.offset})


async def main(role: str) -> None:
    act = {"writer": writer, "resumer": resumer}[role]
    reader = await _lines()
    async with LayerService(chunk_size=64 * 1024, finish_timeout=30) as service:
        _say({"ready": role})
        while line := (await reader.readline()).decode().strip():
            await act(service, line)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
