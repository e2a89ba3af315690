"""Test layers: random tar archives, plain or gzip, built in memory."""

from __future__ import annotations

import gzip
import io
import random
import tarfile


def random_tar(seed: int, files: int = 8, max_size: int = 200_000, compress: bool = False) -> bytes:
    rng = random.Random(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        directory = tarfile.TarInfo("layer/")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        archive.addfile(directory)
        for number in range(files):
            data = rng.randbytes(rng.randint(0, max_size))
            info = tarfile.TarInfo(f"layer/file-{seed}-{number}.bin")
            info.size = len(data)
            info.mtime = 1_700_000_000 + number
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def uneven_pieces(data: bytes, seed: int, smallest: int = 1, largest: int = 300_000) -> list[bytes]:
    rng = random.Random(seed)
    pieces, position = [], 0
    while position < len(data):
        size = rng.randint(smallest, largest)
        pieces.append(data[position : position + size])
        position += size
    return pieces


def random_gzip_layer(seed: int, size: int) -> bytes:
    """A gzip tar of about `size` bytes: a few files of half-random, half-repetitive content,
    so that gzip works but does not shrink it much."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        remaining, number = size, 0
        while remaining > 0:
            length = min(remaining, rng.randint(1, 4) << 20)
            noise = rng.randbytes(length // 2)
            data = (noise + noise[: length - len(noise)])[:length]
            info = tarfile.TarInfo(f"usr/lib/blob-{seed}-{number}")
            info.size = len(data)
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
            remaining -= length
            number += 1
    return gzip.compress(buffer.getvalue(), compresslevel=1, mtime=0)
