"""Byte-level tar builder for tests: every field is what the test says, nothing is normalised.

Python's tarfile cannot write many of the archives the TarSum tests need (bad checksums,
base-256 fields, a V7 '\\0' typeflag with a trailing slash, stray sizes on links, PAX records
with NUL or non-UTF-8 bytes, GNU sparse headers), so this writes the 512-byte blocks directly.
It shares no code with the parser under test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLOCK = 512
END = bytes(2 * BLOCK)

USTAR = (b"ustar\x00", b"00")
GNU = (b"ustar ", b" \x00")
V7 = (b"\x00" * 6, b"\x00\x00")


def octal(value: int, width: int) -> bytes:
    """Zero-padded octal digits and a NUL, the way GNU tar and Go write numeric fields."""
    digits = format(value, "o").encode().rjust(width - 1, b"0")
    if len(digits) > width - 1:
        raise ValueError(f"{value} does not fit {width} bytes of octal")
    return digits + b"\x00"


def base256(value: int, width: int) -> bytes:
    """GNU binary numeric field: two's complement with the top bit of the first byte set."""
    raw = bytearray((value % (1 << (8 * width))).to_bytes(width, "big"))
    raw[0] |= 0x80
    return bytes(raw)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


@dataclass
class Header:
    name: bytes = b"file"
    mode: int | bytes = 0o644
    uid: int | bytes = 0
    gid: int | bytes = 0
    size: int | bytes = 0
    mtime: int | bytes = 0
    typeflag: bytes = b"0"
    linkname: bytes = b""
    magic: tuple[bytes, bytes] = USTAR
    uname: bytes = b""
    gname: bytes = b""
    devmajor: int | bytes = 0
    devminor: int | bytes = 0
    prefix: bytes = b""  # USTAR prefix, or the raw atime/ctime area for GNU
    tail: bytes = b""  # bytes 500..512 (STAR trailer and the like)
    checksum: str | bytes = "unsigned"  # "unsigned", "signed", or a raw 8-byte field
    extra: dict[int, bytes] = field(default_factory=dict)  # raw bytes at offsets, last word

    def encode(self) -> bytes:
        def num(value: int | bytes, width: int) -> bytes:
            return value if isinstance(value, bytes) else octal(value, width)

        def text(value: bytes, width: int) -> bytes:
            if len(value) > width:
                raise ValueError(f"{value!r} longer than {width}")
            return value.ljust(width, b"\x00")

        block = bytearray(BLOCK)
        block[0:100] = text(self.name, 100)
        block[100:108] = num(self.mode, 8)
        block[108:116] = num(self.uid, 8)
        block[116:124] = num(self.gid, 8)
        block[124:136] = num(self.size, 12)
        block[136:148] = num(self.mtime, 12)
        block[156:157] = self.typeflag
        block[157:257] = text(self.linkname, 100)
        block[257:263], block[263:265] = self.magic
        block[265:297] = text(self.uname, 32)
        block[297:329] = text(self.gname, 32)
        block[329:337] = num(self.devmajor, 8)
        block[337:345] = num(self.devminor, 8)
        block[345:500] = text(self.prefix, 155)
        block[500:512] = text(self.tail, 12)
        for offset, raw in self.extra.items():
            block[offset : offset + len(raw)] = raw
        if isinstance(self.checksum, bytes):
            block[148:156] = self.checksum
        else:
            block[148:156] = b" " * 8
            if self.checksum == "signed":
                total = sum(b - 256 if b > 127 else b for b in block)
            else:
                total = sum(block)
            block[148:156] = format(total % (1 << 18), "06o").encode() + b"\x00 "
        return bytes(block)


def entry(header: Header, body: bytes = b"") -> bytes:
    return header.encode() + pad(body)


def pax_record(key: bytes, value: bytes) -> bytes:
    """One ``"%d %s=%s\\n"`` record whose length counts its own digits."""
    rest = b" " + key + b"=" + value + b"\n"
    length = len(rest) + 1
    while len(str(length)) + len(rest) != length:
        length += 1
    return str(length).encode() + rest


def pax(
    records: list[tuple[bytes, bytes]], typeflag: bytes = b"x", name: bytes = b"PaxHeader"
) -> bytes:
    body = b"".join(pax_record(k, v) for k, v in records)
    return entry(Header(name=name, typeflag=typeflag, size=len(body)), body)


def gnu_long(typeflag: bytes, value: bytes) -> bytes:
    body = value + b"\x00"
    return entry(Header(name=b"././@LongLink", typeflag=typeflag, size=len(body), magic=GNU), body)
