"""The reference's ``tar.Writer.WriteHeader``, reduced to "does it return an error".

pkg/tarsum writes every header it reads back out with Go's ``tar.Writer`` and fails when
``WriteHeader`` refuses it, so an archive whose entry Go cannot write has no TarSum at all.
:func:`writer_rejection` makes that same decision from a parsed :class:`TarEntry`.
"""

from __future__ import annotations

from services.digests.tarstream import (
    GO_GNU,
    GO_PAX,
    GO_USTAR,
    GO_ZERO_TIME_UNIX,
    MAX_SPECIAL_FILE,
    TYPE_BLOCK,
    TYPE_CHAR,
    TYPE_FIFO,
    TYPE_GNU_SPARSE,
    TYPE_LINK,
    TYPE_REG,
    TYPE_SYMLINK,
    TYPE_XGLOBAL,
    TarEntry,
)

VERSION_V0 = "tarsum"

_NO_TRAILING_SLASH = frozenset({TYPE_REG, TYPE_CHAR, TYPE_BLOCK, TYPE_FIFO, TYPE_GNU_SPARSE})
_HEADER_ONLY = frozenset({TYPE_LINK, TYPE_SYMLINK, TYPE_CHAR, TYPE_BLOCK, ord("5"), TYPE_FIFO})
_BASIC_KEYS = frozenset(
    {
        b"path",
        b"linkpath",
        b"size",
        b"uid",
        b"gid",
        b"uname",
        b"gname",
        b"mtime",
        b"atime",
        b"ctime",
    }
)
_PAX_STRING_KEYS = frozenset({b"path", b"linkpath", b"uname", b"gname"})


_BASE256_8 = 1 << 56


def _go_ascii(value: bytes) -> bool:
    """Go's isASCII: no byte >= 0x80 (invalid UTF-8 decodes to U+FFFD) and no NUL."""
    return value.isascii() and 0 not in value


def _fits_base256(width: int, value: int) -> bool:
    bits = (width - 1) * 8
    return width >= 9 or -(1 << bits) <= value < (1 << bits)


def _fits_octal(width: int, value: int) -> bool:
    return value >= 0 and (width >= 22 or value < 1 << ((width - 1) * 3))


def _split_ustar_ok(name: bytes) -> bool:
    """Whether Go's splitUSTARPath finds a prefix/suffix split."""
    length = len(name)
    if length <= 100 or not _go_ascii(name):
        return False
    if length > 156:
        length = 156
    elif name[length - 1] == 0x2F:
        length -= 1
    cut = name.rfind(b"/", 0, length)
    suffix = len(name) - cut - 1
    return not (cut <= 0 or suffix > 100 or suffix == 0 or cut > 155)


def _pax_time_text(seconds: int, nanos: int) -> bytes:
    """Go's formatPAXTime."""
    if not nanos:
        return b"%d" % seconds
    sign = b""
    if seconds < 0:
        sign, seconds, nanos = b"-", -(seconds + 1), 1_000_000_000 - nanos
    return (b"%s%d.%09d" % (sign, seconds, nanos)).rstrip(b"0")


def _pax_record_length(key: bytes, value: bytes) -> int:
    """len(formatPAXRecord(key, value))."""
    size = len(key) + len(value) + 3
    size += len(str(size))
    text = len(str(size)) + 1 + len(key) + 1 + len(value) + 1
    return text if text != size else size


def _valid_pax_record(key: bytes, value: bytes) -> bool:
    if not key or b"=" in key:
        return False
    if key in _PAX_STRING_KEYS:
        return 0 not in value
    return 0 not in key


def writer_rejection(entry: TarEntry) -> str | None:
    """Why Go's tar.Writer.WriteHeader refuses the header the reader returned, or None.

    The reference TarSum copies every entry through a tar.Writer and fails when it refuses one;
    this is a port of WriteHeader's checks (allowedFormats and the writers' own limits).
    """
    typeflag = entry.typeflag
    if typeflag in _NO_TRAILING_SLASH and entry.name.endswith(b"/"):
        return "filename may not have trailing slash"
    if entry.format == GO_USTAR:
        # Read from one plain USTAR block (ASCII, NUL-terminated octal fields): the writer
        # can always put it back the same way.
        return None
    if entry.format == GO_GNU:
        # GNU headers carry no PAX records, their strings come from NUL-terminated fields and
        # 12-byte numbers always fit; only the 8-byte fields can overflow GNU's base-256.
        if all(
            -_BASE256_8 <= value < _BASE256_8
            for value in (entry.mode, entry.uid, entry.gid, entry.devmajor, entry.devminor)
        ):
            return None
    return _full_writer_check(entry)


def _full_writer_check(entry: TarEntry) -> str | None:
    allowed = GO_USTAR | GO_PAX | GO_GNU
    pax: dict[bytes, bytes] = {}
    prefer_pax = False
    records = entry.pax or {}
    mtime: tuple[int, int] | None = (entry.mtime, entry.mtime_nsec)
    atime, ctime = entry.atime, entry.ctime
    if entry.format == 0:
        # WriteHeader rounds ModTime and drops the other times when no format is known.
        seconds, nanos = entry.mtime, entry.mtime_nsec
        mtime = (seconds + 1, 0) if nanos >= 500_000_000 else (seconds, 0)
        atime = ctime = None
    if typeflag_is_global := entry.typeflag == TYPE_XGLOBAL:
        mtime = None  # the Header Go returns for a global record has the zero time

    def strings(value: bytes, width: int, key: bytes) -> None:
        nonlocal allowed
        too_long = len(value) > width
        if 0 in value or (too_long and key not in (b"path", b"linkpath")):
            allowed &= ~GO_GNU
        if not _go_ascii(value) or too_long:
            if key != b"path" or not _split_ustar_ok(value):
                allowed &= ~GO_USTAR
            pax[key] = value
        if records.get(key) == value:
            pax[key] = value

    def numbers(value: int, width: int, key: bytes | None) -> None:
        nonlocal allowed
        if not _fits_base256(width, value):
            allowed &= ~GO_GNU
        if not _fits_octal(width, value):
            allowed &= ~GO_USTAR
            if key is None:
                allowed &= ~GO_PAX
            else:
                pax[key] = b"%d" % value
        if key is not None and records.get(key) == b"%d" % value:
            pax[key] = records[key]

    def times(value: tuple[int, int] | None, key: bytes) -> None:
        nonlocal allowed, prefer_pax
        if value is None or value == (GO_ZERO_TIME_UNIX, 0):
            return  # the zero Time is always fine
        seconds, nanos = value
        is_mtime = key == b"mtime"
        fits = _fits_octal(12, seconds)
        if not is_mtime or not fits:
            allowed &= ~GO_USTAR
        if not is_mtime or not fits or nanos:
            prefer_pax = True
            pax[key] = _pax_time_text(seconds, nanos)
        if records.get(key) == _pax_time_text(seconds, nanos):
            pax[key] = records[key]

    if typeflag_is_global:
        name, linkname, uname, gname = entry.name, b"", b"", b""
        numeric = (0, 0, 0, 0, 0, 0)
    else:
        name, linkname, uname, gname = entry.name, entry.linkname, entry.uname, entry.gname
        numeric = (entry.mode, entry.uid, entry.gid, entry.size, entry.devmajor, entry.devminor)
    strings(name, 100, b"path")
    strings(linkname, 100, b"linkpath")
    strings(uname, 32, b"uname")
    strings(gname, 32, b"gname")
    mode, uid, gid, size, devmajor, devminor = numeric
    numbers(mode, 8, None)
    numbers(uid, 8, b"uid")
    numbers(gid, 8, b"gid")
    numbers(size, 12, b"size")
    numbers(devmajor, 8, None)
    numbers(devminor, 8, None)
    times(mtime, b"mtime")
    times(atime, b"atime")
    times(ctime, b"ctime")

    if typeflag_is_global:
        allowed &= GO_PAX
    if entry.typeflag not in _HEADER_ONLY and size < 0:
        return "negative size on header-only type"
    xattrs = {k: v for k, v in records.items() if k.startswith(b"SCHILY.xattr.") and v}
    if xattrs:
        pax.update(xattrs)
        allowed &= GO_PAX
    if records:
        for key, value in records.items():
            if key in pax:
                continue
            if typeflag_is_global or (key not in _BASIC_KEYS and not key.startswith(b"GNU.sparse")):
                pax[key] = value
        allowed &= GO_PAX
    for key, value in pax.items():
        if not _valid_pax_record(key, value):
            return f"invalid PAX record {key[:40]!r}"
    wanted = entry.format
    if wanted:
        if wanted & GO_PAX and not prefer_pax:
            wanted |= GO_USTAR
        allowed &= wanted
    if not allowed:
        return "no tar format can encode this header as read"
    if not allowed & GO_USTAR and allowed & GO_PAX:
        if sum(_pax_record_length(k, v) for k, v in pax.items()) > MAX_SPECIAL_FILE:
            return "PAX records would exceed 1 MiB"
    return None
