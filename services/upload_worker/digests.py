"""The sha256 of each open upload's bytes, taken as the worker stages its chunks.

The verifier used to read every layer back from S3 to hash it, a second trip of all its bytes
through S3 and Python. The worker holds each chunk in hand already, and hashes it for the
ChunkAppended: one more hash of the same bytes, in the same thread call, gives the whole layer's.
The UploadFinished carries it (content_sha256), and a sha256-addressed layer is then judged
without reading it back.

Only the bytes this worker staged itself, in order, count: a digest is kept in memory only, it
follows the upload's offset, and anything out of line (a chunk at another offset than the digest's
end, a batch applied again after a failure, a partition taken over) drops it. The UploadFinished
then says nothing (None), and the verifier reads the staged bytes as before.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# Hashing less than this on the event loop costs less than a trip to a thread and back.
INLINE_BYTES = 1 << 16
# Open uploads followed at once; past it the oldest is dropped (its verifier reads it back).
MAX_UPLOADS = 100_000


@dataclass(frozen=True)
class Running:
    """The sha256 of an upload's bytes [0, end)."""

    end: int
    partition: int
    hasher: Any  # hashlib's sha256 object (its class is not public)


class RunningDigests:
    def __init__(self, max_uploads: int = MAX_UPLOADS) -> None:
        self.max_uploads = max_uploads
        self._uploads: OrderedDict[str, Running] = OrderedDict()

    async def hash_chunk(
        self, upload_id: str, partition: int, offset: int, data: bytes
    ) -> tuple[str, Running | None]:
        """(the chunk's sha256, the upload's digest with the chunk added, or None when the chunk
        does not continue it). Nothing changes until `advance` says the chunk was staged."""
        current = self._uploads.get(upload_id)
        if offset == 0:
            base = hashlib.sha256()
        elif current is not None and current.end == offset:
            base = current.hasher
        else:
            base = None

        def hash_both() -> tuple[str, Running | None]:
            chunk = hashlib.sha256(data).hexdigest()
            if base is None:
                return chunk, None
            running = base.copy()  # the digest so far stays as it was if staging fails
            running.update(data)
            return chunk, Running(offset + len(data), partition, running)

        if len(data) < INLINE_BYTES:
            return hash_both()
        return await asyncio.to_thread(hash_both)  # hashlib releases the GIL on big buffers

    def advance(self, upload_id: str, running: Running | None) -> None:
        """The chunk was staged: the upload's digest is now `running` (None: no digest)."""
        if running is None:
            self._uploads.pop(upload_id, None)
            return
        self._uploads[upload_id] = running
        self._uploads.move_to_end(upload_id)
        while len(self._uploads) > self.max_uploads:
            self._uploads.popitem(last=False)

    def digest(self, upload_id: str, size: int) -> str | None:
        """The hex sha256 of the upload's bytes if this worker hashed all `size` of them."""
        current = self._uploads.get(upload_id)
        if current is None or current.end != size:
            return None
        return str(current.hasher.hexdigest())

    def drop(self, upload_ids: set[str] | list[str]) -> None:
        for upload_id in upload_ids:
            self._uploads.pop(upload_id, None)

    def drop_partitions(self, partitions: set[int]) -> None:
        for upload_id in [u for u, r in self._uploads.items() if r.partition in partitions]:
            del self._uploads[upload_id]
