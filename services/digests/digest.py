"""Layer digests: parsing digest strings and computing them over a blob in one streaming pass.

A layer is named either by an OCI content digest (``sha256:<hex>``, also sha384/sha512), which
covers the blob's bytes exactly as stored, or by a TarSum (``tarsum.v1+sha256:<hex>``), which
covers the files inside the decompressed tar and is independent of compression and of entry
order. :class:`StreamingVerifier` computes any mix of them from one pass over the blob, pushed
in chunks of any size, keeping memory bounded whatever the blob's size or compression ratio.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from services.digests.tarstream import (
    TarError,
    TarLimitError,
    TarParser,
    TarTruncatedError,
    TarUndefinedError,
)
from services.digests.tarsum import CIPHERS, VERSIONS, TarSum, TarSumSpec, TarSumUndefinedError


class DigestError(ValueError):
    """Base of every error this module raises."""


class InvalidDigest(DigestError):
    """A digest string or algorithm name is malformed or names an unknown algorithm."""


class TarSumVersionUnsupported(DigestError):
    """A well-formed TarSum label whose version (e.g. ``tarsum.v9``) is not implemented."""


class MalformedLayer(DigestError):
    """The blob is not a valid (compressed) tar archive, so no TarSum exists for it."""


class InvalidTarHeader(MalformedLayer):
    """A tar header or extended header record is invalid (bad checksum, garbage, bad field)."""


class TruncatedLayer(MalformedLayer):
    """The blob ends inside a tar entry or inside a compressed stream."""


class CorruptCompression(MalformedLayer):
    """The gzip or zstd stream does not decompress."""


class UnsupportedCompression(MalformedLayer):
    """The blob is compressed with a format this verifier does not read (xz, bzip2)."""


class TarSumUndefined(MalformedLayer):
    """The archive reads, but the reference TarSum fails on it, so it has no TarSum.

    docker's implementation copies every header through Go's tar.Writer and errors when the
    writer refuses one (e.g. a regular file whose name ends in '/'); a verifier that produced a
    digest here would accept layers no other registry accepts.
    """


class LayerLimitExceeded(MalformedLayer):
    """A record is larger than the verifier agrees to buffer (e.g. a PAX header over 1 MiB)."""


RAW_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}
TARSUM_CIPHERS: dict[str, int] = {
    "md5": 32,
    "sha1": 40,
    "sha224": 56,
    "sha256": 64,
    "sha384": 96,
    "sha512": 128,
}
assert set(TARSUM_CIPHERS) == set(CIPHERS)

# A TarSum label is "tarsum" or "tarsum.<version>", then "+<cipher>"; any version word is
# well-formed, and only the known ones are implemented.
_TARSUM_VERSION = re.compile(r"tarsum(?:\.[a-z0-9]+)?")
_LOWER_HEX = re.compile(r"[0-9a-f]*")


def _check_algorithm(algorithm: str) -> tuple[int, bool]:
    """(hex length, implemented) for an algorithm name; raises InvalidDigest if malformed."""
    if not isinstance(algorithm, str):
        raise InvalidDigest(f"algorithm must be a string, not {type(algorithm).__name__}")
    if algorithm in RAW_ALGORITHMS:
        return RAW_ALGORITHMS[algorithm], True
    version, plus, cipher = algorithm.partition("+")
    if not plus:
        if algorithm.startswith("tarsum"):
            raise InvalidDigest(f"TarSum label {algorithm!r} lacks '+<cipher>'")
        known = ", ".join(RAW_ALGORITHMS)
        raise InvalidDigest(
            f"unsupported digest algorithm {algorithm!r} (expected one of {known} "
            "or a TarSum label such as tarsum.v1+sha256)"
        )
    if not _TARSUM_VERSION.fullmatch(version):
        raise InvalidDigest(f"{version!r} is not a TarSum version label (tarsum[.VERSION])")
    if cipher not in TARSUM_CIPHERS:
        known = ", ".join(TARSUM_CIPHERS)
        raise InvalidDigest(f"unsupported TarSum cipher {cipher!r} (expected one of {known})")
    return TARSUM_CIPHERS[cipher], version in VERSIONS


def _unsupported_version(algorithm: str) -> TarSumVersionUnsupported:
    version = algorithm.partition("+")[0]
    return TarSumVersionUnsupported(
        f"TarSum version {version!r} is not supported (supported: {', '.join(VERSIONS)})"
    )


def _check_hex(algorithm: str, hex_: str, length: int) -> None:
    if not isinstance(hex_, str):
        raise InvalidDigest(f"digest hex must be a string, not {type(hex_).__name__}")
    if len(hex_) != length:
        raise InvalidDigest(
            f"{algorithm} digest must have {length} hex characters, got {len(hex_)}"
        )
    if not _LOWER_HEX.fullmatch(hex_):
        bad = next(c for c in hex_ if c not in "0123456789abcdef")
        if bad in "ABCDEF":
            raise InvalidDigest(f"{algorithm} digest hex must be lowercase, found {bad!r}")
        raise InvalidDigest(f"{algorithm} digest contains the non-hex character {bad!r}")


@dataclass(frozen=True)
class Digest:
    """A validated digest; ``str(d)`` is the canonical ``algorithm:hex`` form."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        length, implemented = _check_algorithm(self.algorithm)
        _check_hex(self.algorithm, self.hex, length)
        if not implemented:
            raise _unsupported_version(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def is_tarsum(self) -> bool:
        return self.algorithm not in RAW_ALGORITHMS


def parse_digest(s: str) -> Digest:
    """Parse ``ALG:HEX``; raises InvalidDigest, or TarSumVersionUnsupported for e.g. tarsum.v9."""
    if not isinstance(s, str):
        raise InvalidDigest(f"digest must be a string, not {type(s).__name__}")
    algorithm, colon, hex_ = s.partition(":")
    if not colon:
        raise InvalidDigest(f"digest {s[:80]!r} has no ':' between algorithm and hex")
    if not algorithm:
        raise InvalidDigest(f"digest {s[:80]!r} has an empty algorithm")
    return Digest(algorithm, hex_)


def parse_algorithm(algorithm: str) -> str:
    """Validate an algorithm name as the verifier takes it; returns it unchanged."""
    _, implemented = _check_algorithm(algorithm)
    if not implemented:
        raise _unsupported_version(algorithm)
    return algorithm


# -- decompression ------------------------------------------------------------------------

_SNIFF = 10  # enough for every magic below
_GZIP_MAGIC = b"\x1f\x8b\x08"  # ID1 ID2 and CM=deflate, as docker's DetectCompression
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BZIP2 = re.compile(rb"BZh[1-9]1AY&SY")
# One decompress call returns at most this much, whatever the compression ratio.
_GZIP_OUTPUT = 1 << 20
# zstd blocks decode to at most 128 KiB each; this many blocks per call bounds its output.
_ZSTD_BLOCKS_PER_CALL = 8


class _Plain:
    def __init__(self, parser: TarParser) -> None:
        self._parser = parser

    def feed(self, data: bytes | memoryview) -> None:
        self._parser.feed(data)

    def close(self) -> None:
        pass


class _Gzip:
    """RFC 1952 members back to back, decompressed with a bounded output per call."""

    def __init__(self, parser: TarParser) -> None:
        self._parser = parser
        self._inflater = zlib.decompressobj(31)
        self._member_done = False
        self._member_started = False
        self._members = 0

    def feed(self, data: bytes | memoryview) -> None:
        parser = self._parser
        pending: Any = data
        while True:
            if self._member_done:
                if not pending:
                    return
                self._inflater = zlib.decompressobj(31)
                self._member_done = False
            inflater = self._inflater
            if pending:
                self._member_started = True
            try:
                out = inflater.decompress(pending, _GZIP_OUTPUT)
            except zlib.error as error:
                raise CorruptCompression(
                    f"gzip member {self._members + 1} is corrupt: {error}"
                ) from None
            if out:
                parser.feed(out)  # a no-op once the archive has ended
            if inflater.eof:
                self._members += 1
                self._member_done = True
                self._member_started = False
                pending = inflater.unused_data
                continue
            pending = inflater.unconsumed_tail
            # A full output buffer may leave decoded bytes inside zlib even with no input left.
            if not pending and len(out) < _GZIP_OUTPUT:
                return

    def close(self) -> None:
        if self._member_started and not self._member_done:
            raise TruncatedLayer(f"gzip stream ends inside member {self._members + 1}")


# zstd frame walker states
_Z_MAGIC = 0
_Z_DESCRIPTOR = 1
_Z_SKIP_SIZE = 2
_Z_BLOCK_HEADER = 3
_Z_OPAQUE = 4


class _Zstd:
    """zstd frames (RFC 8878), walked here so each decompress call completes few blocks.

    python-zstandard's incremental decompressor returns all output for the input it is given
    and a block of a few bytes can expand to 128 KiB, so feeding it arbitrary chunks could
    produce gigabytes at once. Tracking the frame structure also tells a truncated stream
    apart from a complete one, which the library does not report.
    """

    def __init__(self, parser: TarParser) -> None:
        self._parser = parser
        self._decoder = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
        self._state = _Z_MAGIC
        self._head = bytearray()
        self._opaque = 0  # bytes left in a block body, frame header tail, checksum or skip
        self._after = _Z_MAGIC  # state once the opaque bytes are consumed
        self._checksum = False
        self._last_block = False
        self._frames = 0

    def _collect(self, view: memoryview, pos: int, total: int, size: int) -> tuple[int, bool]:
        take = min(size - len(self._head), total - pos)
        self._head += view[pos : pos + take]
        return pos + take, len(self._head) == size

    def feed(self, data: bytes | memoryview) -> None:
        view = data
        total = len(view)
        pos = start = blocks = 0
        while pos < total:
            state = self._state
            if state == _Z_OPAQUE:
                take = min(self._opaque, total - pos)
                pos += take
                self._opaque -= take
                if self._opaque:
                    continue
                self._state = self._after
                if self._after == _Z_BLOCK_HEADER or self._after == _Z_MAGIC:
                    blocks += 1
                if blocks >= _ZSTD_BLOCKS_PER_CALL:
                    self._decode(view[start:pos])
                    start, blocks = pos, 0
                continue
            if state == _Z_MAGIC:
                pos, complete = self._collect(view, pos, total, 4)
                if complete:
                    self._on_magic(bytes(self._head))
            elif state == _Z_DESCRIPTOR:
                pos, complete = self._collect(view, pos, total, 1)
                if complete:
                    self._on_descriptor(self._head[0])
            elif state == _Z_SKIP_SIZE:
                pos, complete = self._collect(view, pos, total, 4)
                if complete:
                    self._opaque = int.from_bytes(self._head, "little")
                    self._after = _Z_MAGIC
                    self._state = _Z_OPAQUE
                    self._head.clear()
                    self._frames += 1
            else:  # _Z_BLOCK_HEADER
                pos, complete = self._collect(view, pos, total, 3)
                if complete:
                    self._on_block_header(int.from_bytes(self._head, "little"))
        if start < total:
            self._decode(view[start:total])

    def _on_magic(self, magic: bytes) -> None:
        self._head.clear()
        if magic == _ZSTD_MAGIC:
            self._state = _Z_DESCRIPTOR
        elif magic[1:] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50:
            self._state = _Z_SKIP_SIZE  # skippable frame: 4-byte size, then opaque bytes
        else:
            raise CorruptCompression(
                f"zstd stream: expected a frame after frame {self._frames}, found {magic!r}"
            )

    def _on_descriptor(self, descriptor: int) -> None:
        self._head.clear()
        single_segment = bool(descriptor & 0x20)
        content_size = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
        dictionary = (0, 1, 2, 4)[descriptor & 3]
        self._checksum = bool(descriptor & 0x04)
        self._opaque = (0 if single_segment else 1) + dictionary + content_size
        self._after = _Z_BLOCK_HEADER
        self._state = _Z_OPAQUE if self._opaque else _Z_BLOCK_HEADER

    def _on_block_header(self, header: int) -> None:
        self._head.clear()
        last = bool(header & 1)
        kind = (header >> 1) & 3
        size = header >> 3
        if kind == 3:
            raise CorruptCompression("zstd stream: reserved block type")
        self._opaque = 1 if kind == 1 else size  # an RLE block stores its one byte
        if last:
            self._frames += 1
            # The checksum rides along with the last block's bytes.
            self._opaque += 4 if self._checksum else 0
            self._after = _Z_MAGIC
        else:
            self._after = _Z_BLOCK_HEADER
        self._state = _Z_OPAQUE
        if not self._opaque:
            self._state = self._after

    def _decode(self, data: memoryview) -> None:
        if not data:
            return
        try:
            out = self._decoder.decompress(data)
        except zstandard.ZstdError as error:
            raise CorruptCompression(f"zstd stream is corrupt: {error}") from None
        if out:
            self._parser.feed(out)

    def close(self) -> None:
        if self._state != _Z_MAGIC or self._head or self._frames == 0:
            raise TruncatedLayer("zstd stream ends inside a frame")


# -- verifier -------------------------------------------------------------------------------


def _tar_error(error: TarError) -> MalformedLayer:
    if isinstance(error, TarSumUndefinedError):
        return TarSumUndefined(str(error))
    if isinstance(error, TarUndefinedError):
        return TarSumUndefined(f"the reference TarSum is not deterministic here: {error}")
    if isinstance(error, TarTruncatedError):
        return TruncatedLayer(f"tar stream truncated: {error}")
    if isinstance(error, TarLimitError):
        return LayerLimitExceeded(f"tar record too large: {error}")
    return InvalidTarHeader(f"not a valid tar archive: {error}")


class StreamingVerifier:
    """Computes the requested digests of one blob, fed in chunks of any size.

    Raw digests (sha256/sha384/sha512) hash the bytes as given. TarSums decompress the blob
    (gzip, zstd or none, chosen by its magic bytes) and parse the tar as it streams. The tar
    ends at its end-of-archive marker, and bytes after it are not part of the TarSum (the
    reference stops reading there too); a compressed blob must still decompress cleanly to
    its end (every gzip member's CRC, every zstd frame), since otherwise whether a corrupt
    trailer was noticed would depend on how the blob happened to be chunked. Nothing is
    retained from a chunk after :meth:`update` returns except small partial headers
    (copied), so callers may reuse their buffers.
    """

    def __init__(self, algorithms: Iterable[str], extra_payload: bytes | None = None) -> None:
        names = list(dict.fromkeys(parse_algorithm(a) for a in algorithms))
        if not names:
            raise ValueError("StreamingVerifier needs at least one algorithm")
        self._names = names
        self._raw = [(name, hashlib.new(name)) for name in names if name in RAW_ALGORITHMS]
        specs = [TarSumSpec(*name.split("+", 1)) for name in names if name not in RAW_ALGORITHMS]
        self._extra = None if extra_payload is None else bytes(extra_payload)
        self._tarsum = TarSum(specs) if specs else None
        self._parser = TarParser(self._tarsum) if self._tarsum is not None else None
        self._decoder: _Plain | _Gzip | _Zstd | None = None
        self._sniffed = bytearray()
        self._error: MalformedLayer | None = None
        self._result: dict[str, Digest] | None = None
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._result is not None:
            raise ValueError("update() after finish()")
        if self._error is not None:
            raise self._error
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._size += len(view)
        for _, hasher in self._raw:
            hasher.update(view)
        if self._parser is None or not view:
            return
        try:
            if self._decoder is None:
                self._sniff(view)
            else:
                # bytes go through as they are: the tar parser slices headers out of bytes
                # much faster than out of a memoryview.
                self._decoder.feed(data if type(data) is bytes else view)
        except TarError as error:
            self._error = _tar_error(error)
            raise self._error from None
        except MalformedLayer as error:
            self._error = error
            raise

    def _sniff(self, view: memoryview) -> None:
        # The format is decided on the first bytes; until there are enough, keep a copy.
        take = _SNIFF - len(self._sniffed)
        self._sniffed += view[:take]
        if len(self._sniffed) < _SNIFF:
            return
        head = bytes(self._sniffed)
        self._sniffed = bytearray()
        self._start_decoder(head)
        assert self._decoder is not None
        self._decoder.feed(memoryview(head))
        if take < len(view) and not self._parser_done():
            self._decoder.feed(view[take:])

    def _parser_done(self) -> bool:
        return self._parser is not None and self._parser.done

    def _start_decoder(self, head: bytes) -> None:
        assert self._parser is not None
        if head.startswith(_GZIP_MAGIC):
            self._decoder = _Gzip(self._parser)
        elif head.startswith(_ZSTD_MAGIC) or (head[1:4] == b"\x2a\x4d\x18" and head[0] >> 4 == 5):
            # A zstd stream may open with a skippable frame (magic 0x184D2A5?).
            self._decoder = _Zstd(self._parser)
        elif head.startswith(_XZ_MAGIC):
            raise UnsupportedCompression("xz-compressed layers are not supported")
        elif _BZIP2.match(head):
            raise UnsupportedCompression("bzip2-compressed layers are not supported")
        else:
            self._decoder = _Plain(self._parser)

    def finish(self) -> dict[str, Digest]:
        """Return every requested digest, keyed by algorithm name; raises MalformedLayer."""
        if self._result is not None:
            return dict(self._result)
        if self._error is not None:
            raise self._error
        results: dict[str, Digest] = {}
        for name, hasher in self._raw:
            results[name] = Digest(name, hasher.hexdigest())
        if self._tarsum is not None:
            assert self._parser is not None
            try:
                if self._decoder is None:
                    # Shorter than the sniff window: decide on what there is.
                    head = bytes(self._sniffed)
                    self._sniffed = bytearray()
                    self._start_decoder(head)
                    assert self._decoder is not None
                    self._decoder.feed(memoryview(head))
                # The compressed stream must be whole even past the archive's end: whether a
                # bad trailer was noticed must not depend on how the blob was chunked.
                self._decoder.close()
                if not self._parser.done:
                    self._parser.close()
            except TarError as error:
                self._error = _tar_error(error)
                raise self._error from None
            except MalformedLayer as error:
                self._error = error
                raise
            sums = self._tarsum.digests(self._extra)
            for label, hex_ in sums.items():
                results[label] = Digest(label, hex_)
        self._result = {name: results[name] for name in self._names}
        return dict(self._result)


def compute_digests(
    stream: BinaryIO,
    algorithms: Iterable[str],
    extra_payload: bytes | None = None,
    chunk_size: int = 1 << 20,
) -> dict[str, Digest]:
    """Read ``stream`` to its end and return the requested digests (see StreamingVerifier)."""
    verifier = StreamingVerifier(algorithms, extra_payload)
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        buffer = bytearray(chunk_size)
        view = memoryview(buffer)
        while True:
            count = readinto(view)
            if not count:
                break
            verifier.update(view[:count])
    else:
        while True:
            chunk = stream.read(chunk_size)
            if not chunk:
                break
            verifier.update(chunk)
    return verifier.finish()
