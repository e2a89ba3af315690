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
