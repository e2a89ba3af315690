"""Test data: a gzip layer like a real one, and distinct blobs, built once and reused.

The bytes must differ from run to run: the verifier stores one copy per digest, so uploading
bytes it has seen before takes its deduplication path, which is not the path being measured.
A run-specific suffix (an extra gzip member, which gunzip and tar readers accept) or prefix
gives each upload its own digest without rebuilding hundreds of megabytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

from bench.stack import OUT

MIB = 1 << 20


def gzip_layer(size: int, seed: int = 1) -> bytes:
    """A gzip'd tar of about `size` bytes, of files that are half random and half repeated, so
    gzip has some work but the result stays close to `size` (like most image layers, which hold
    compressed or binary files). Cached in bench/out/ because building it takes seconds."""
    cache = OUT / f"layer-{size}-{seed}.tar.gz"
    if cache.exists():
        return cache.read_bytes()
    rng = random.Random(seed)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        remaining, number = size, 0
        while remaining > 0:
            length = min(remaining, rng.randint(1, 4) * MIB)
            noise = rng.randbytes(length // 2 + 1)
            body = (noise + noise)[:length]
            info = tarfile.TarInfo(f"usr/lib/bench/blob-{seed}-{number}")
            info.size = length
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(body))
            remaining -= length
            number += 1
    layer = gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(".partial")
    temporary.write_bytes(layer)
    temporary.replace(cache)
    return layer


def unique_suffix(label: str) -> bytes:
    """A tiny gzip member naming this upload: appended to a gzip layer it changes the digest."""
    return gzip.compress(f"{label}:{os.urandom(8).hex()}".encode(), mtime=0)


def blob_pool(size: int) -> bytes:
    # os.urandom: random.randbytes builds one integer of the whole size, too big past ~256 MiB.
    return os.urandom(size)


def distinct_blob(pool: bytes, index: int, size: int) -> bytes:
    """`size` bytes from the pool with a random prefix: distinct from every earlier upload."""
    start = (index * size) % max(1, len(pool) - size + 1)
    return os.urandom(16) + pool[start + 16 : start + size]


def sha256_digest(*pieces: bytes | memoryview) -> str:
    hasher = hashlib.sha256()
    for piece in pieces:
        hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


class PatternStream:
    """`size` bytes generated block by block (for a 2 GiB layer that must not sit in memory):
    a pool of random bytes, reused with a different 16-byte prefix on every block."""

    def __init__(
        self, size: int, block: int = 8 * MIB, pool: int = 64 * MIB, seed: int = 3
    ) -> None:
        self.size = size
        self.block = block
        self.pool = random.Random(seed).randbytes(max(pool, 2 * block))
        self.nonce = os.urandom(8)

    def blocks(self) -> Iterator[bytes]:
        position, number = 0, 0
        while position < self.size:
            length = min(self.block, self.size - position)
            start = (number * self.block) % (len(self.pool) - self.block + 1)
            head = self.nonce + number.to_bytes(8, "little")
            yield (head + self.pool[start + len(head) : start + length])[:length]
            position += length
            number += 1

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for block in self.blocks():
            hasher.update(block)
        return "sha256:" + hasher.hexdigest()


class BlockReader(io.RawIOBase):
    """A file-like view of a PatternStream, for minio's put_object (which reads it)."""

    def __init__(self, stream: PatternStream) -> None:
        self._blocks = stream.blocks()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        while size < 0 or len(self._pending) < size:
            block = next(self._blocks, None)
            if block is None:
                break
            self._pending += block
        if size < 0:
            out, self._pending = self._pending, b""
        else:
            out, self._pending = self._pending[:size], self._pending[size:]
        return out


def layer_path(size: int, seed: int = 1) -> Path:
    return OUT / f"layer-{size}-{seed}.tar.gz"
