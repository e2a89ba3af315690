"""Where a Layer's bytes come from: the query service's response, or S3 after a redirect.

With LAYERLOG_BLOB_REDIRECT the query service answers a layer GET with 307 to a presigned S3
URL. The SDK reads that URL with urllib3 in a thread of its own rather than with aiohttp:
aiohttp's streaming reads peaked at ~1.1-1.6 GB/s here against ~2.5 GB/s for urllib3 on the
same object (256 MiB, 1 MiB reads), and the point of the redirect is to read at the storage's
speed. Measured the same way, one thread hop per 1 MiB read gave ~1.4-1.8 GB/s, a thread
reading 4 MiB blocks ahead ~1.7-2.4 GB/s.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Protocol

import aiohttp
import urllib3

from services.client.errors import LayerError, LayerUnknown

REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Storage answers worth asking the query service again for (a fresh URL) after a pause.
_RETRY_STATUSES = frozenset({403, 500, 502, 503, 504})


class Unavailable(Exception):
    """The query service or storage cannot serve the bytes right now: worth retrying."""


class Body(Protocol):
    async def read(self, n: int) -> bytes:
        """n bytes, or fewer if the response ended early."""
        ...

    def close(self) -> None: ...


class ServiceBody:
    """Bytes streamed by the query service."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def read(self, n: int) -> bytes:
        try:
            return await self.response.content.readexactly(n)
        except asyncio.IncompleteReadError as cut_short:
            return cut_short.partial

    def close(self) -> None:
        self.response.release()


class StorageBody:
    """Bytes read straight from S3 through a presigned URL, by a thread a few blocks ahead of
    the reader: handing every read to a thread and back cost more than reading the bytes."""

    FIRST_BLOCK = 256 << 10  # after a seek the reader may want a few bytes only
    BLOCK = 4 << 20
    AHEAD = 4  # blocks read and not yet taken: at most 16 MiB per open layer
    # A reader that takes nothing for this long (a Layer left open) no longer holds a thread,
    # a connection and the blocks; reading again reopens.
    IDLE_SECONDS = 300.0

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self.response = response
        self.loop = asyncio.get_running_loop()
        self.blocks: asyncio.Queue[bytes | Exception] = asyncio.Queue()
        self.room = threading.Semaphore(self.AHEAD)
        self.stopping = threading.Event()
        # Whoever ends the response holds this: the pump when it stops, or close() while the
        # pump may still be reading from it.
        self.lock = threading.Lock()
        self.pump_done = False
        self.ended = False  # the reader took the pump's last item
        self.current = b""
        self.used = 0
        threading.Thread(target=self._pump, name="layerlog-layer-read", daemon=True).start()

    def _pump(self) -> None:
        whole = False
        size = self.FIRST_BLOCK
        try:
            while not self.stopping.is_set():
                if not self.room.acquire(timeout=self.IDLE_SECONDS):
                    self._hand_over(Unavailable("the layer was not read for a while"))
                    return
                if self.stopping.is_set():
                    return
                try:
                    block = self.response.read(size)
                except Exception as error:  # handed to the reader, which reopens or gives up
                    self._hand_over(error)
                    return
                size = min(size * 2, self.BLOCK)
                if not self._hand_over(block) or not block:
                    whole = not block
                    return
        finally:
            with self.lock:
                self.pump_done = True
                if whole:
                    self.response.release_conn()  # read to the end: the connection is reusable
                else:
                    # Closed, not returned to the pool: a connection with unread bytes would
                    # hand them to the next request.
                    self.response.close()

    def _hand_over(self, item: bytes | Exception) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.blocks.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is closed: nobody is reading any more
            return False

    async def read(self, n: int) -> bytes:
        pieces: list[bytes] = []
        got = 0
        while got < n:
            if self.used == len(self.current):
                if self.ended:
                    break
                item = await self.blocks.get()
                self.room.release()
                if isinstance(item, Exception) or not item:
                    self.ended = True
                    if isinstance(item, Exception) and not pieces:
                        raise item
                    break  # what arrived is returned; the reader reopens from there
                self.current, self.used = item, 0
            piece = self.current[self.used : self.used + n - got]
            self.used += len(piece)
            pieces.append(piece)
            got += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        self.stopping.set()
        self.room.release()  # wakes a pump waiting for room, which then sees it must stop
        with self.lock:
            if not self.pump_done:
                # Ends a read the pump is blocked in; the pump then closes the response.
                try:
                    self.response.shutdown()
                except (RuntimeError, ValueError, OSError):
                    pass  # urllib3 read it to the end and gave the connection back already


async def open_storage(pool: urllib3.PoolManager, url: str, position: int, what: str) -> Body:
    def request() -> urllib3.BaseHTTPResponse:
        return pool.request(
            "GET",
            url,
            headers={"Range": f"bytes={position}-"},
            preload_content=False,
            redirect=False,
            retries=False,
        )

    response = await asyncio.to_thread(request)
    # A 200 answers a ranged request only from the start: later bytes must come as a 206.
    if response.status == 206 or (response.status == 200 and position == 0):
        return StorageBody(response)
    detail = (await asyncio.to_thread(response.read, 300)).decode("utf-8", "replace")
    response.close()
    response.release_conn()
    if response.status == 404:
        raise LayerUnknown(f"storage has no bytes for {what}")
    if response.status == 200:
        raise LayerError(f"storage ignored the Range header reading {what} from byte {position}")
    if response.status in _RETRY_STATUSES:
        raise Unavailable(f"storage answered {response.status}: {detail}")
    raise LayerError(f"storage answered {response.status} for {what}: {detail}")
