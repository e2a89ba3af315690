"""A push-based tar reader that reports entries exactly as Go's archive/tar reports them.

TarSum is defined over the header values Go's ``archive/tar`` Reader returns, so this parser
follows that reader rather than POSIX or Python's ``tarfile``: names keep their trailing slash
and ``./`` prefix, a V7 ``'\\0'`` typeflag becomes ``'0'`` or ``'5'``, header-only types (links,
devices, directories, FIFOs) have no body whatever their size field says, PAX global headers
are entries of their own, and the end of input at a block boundary (or inside the padding after
a body) ends the archive even without the two zero blocks. All strings stay ``bytes`` because
Go strings are byte strings; nothing here decodes UTF-8.

The caller pushes bytes of any size with :meth:`TarParser.feed` and calls
:meth:`TarParser.close` at end of input. Entries go to a :class:`TarSink`. Memory is bounded:
a partial header block, one special record (PAX, GNU long name/link; at most
``max_special`` bytes) and one sparse map (at most ``max_sparse_map`` bytes) are the only
things buffered; bodies are handed to the sink as slices of the pushed buffers.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Protocol
from zlib import adler32

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

# Go's archive/tar refuses PAX records and GNU long names/links longer than this.
MAX_SPECIAL_FILE = 1 << 20
# Go (>= 1.22) caps the GNU 1.0 sparse map text and the old-GNU sparse header plus its
# extension blocks at the same size (errSparseTooLong).
MAX_SPARSE_MAP = 1 << 20
# Our own cap, where Go has none: the zero bytes sparse holes expand to across one archive.
# Go would hash any amount; we refuse rather than spend unbounded time on a few header bytes.
MAX_SPARSE_HOLES = 64 << 30

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64 = (1 << 64) - 1

# Typeflags, as byte values.
TYPE_REG = ord("0")
TYPE_REGA = 0
TYPE_LINK = ord("1")
TYPE_SYMLINK = ord("2")
TYPE_CHAR = ord("3")
TYPE_BLOCK = ord("4")
TYPE_DIR = ord("5")
TYPE_FIFO = ord("6")
TYPE_XHEADER = ord("x")
TYPE_XGLOBAL = ord("g")
TYPE_GNU_LONGNAME = ord("L")
TYPE_GNU_LONGLINK = ord("K")
TYPE_GNU_SPARSE = ord("S")

# Go's isHeaderOnlyType: these never have a data section, even when the size field is non-zero.
_HEADER_ONLY = frozenset({TYPE_LINK, TYPE_SYMLINK, TYPE_CHAR, TYPE_BLOCK, TYPE_DIR, TYPE_FIFO})
_META = frozenset({TYPE_XHEADER, TYPE_XGLOBAL, TYPE_GNU_LONGNAME, TYPE_GNU_LONGLINK})

# Header kinds as Go's block.getFormat guesses them from the magic.
FORMAT_V7 = 1
FORMAT_USTAR = 2  # Go: FormatUSTAR | FormatPAX
FORMAT_GNU = 3
FORMAT_STAR = 4

# Go's tar.Format bits, as the reader narrows them into Header.Format (0 is FormatUnknown).
GO_USTAR = 2
GO_PAX = 4
GO_GNU = 8
_GO_ANY = GO_USTAR | GO_PAX | GO_GNU

# A global header carries no time, so Go reports the zero time.Time; its Unix() is this.
GO_ZERO_TIME_UNIX = -62135596800

_HIGH_BYTES = bytes(range(0x80, 0x100))
_DECIMAL = re.compile(rb"[+-]?[0-9]+")
_OCTAL_DIGITS = b"01234567"

_PAX_PATH = b"path"
_PAX_LINKPATH = b"linkpath"
_PAX_UNAME = b"uname"
_PAX_GNAME = b"gname"
_PAX_UID = b"uid"
_PAX_GID = b"gid"
_PAX_SIZE = b"size"
_PAX_MTIME = b"mtime"
_PAX_ATIME = b"atime"
_PAX_CTIME = b"ctime"
_PAX_XATTR = b"SCHILY.xattr."
_SPARSE_OFFSET = b"GNU.sparse.offset"
_SPARSE_NUMBYTES = b"GNU.sparse.numbytes"
_SPARSE_MAP_KEY = b"GNU.sparse.map"
_SPARSE_NUMBLOCKS = b"GNU.sparse.numblocks"
_SPARSE_NAME = b"GNU.sparse.name"
_SPARSE_MAJOR = b"GNU.sparse.major"
_SPARSE_MINOR = b"GNU.sparse.minor"
_SPARSE_SIZE = b"GNU.sparse.size"
_SPARSE_REALSIZE = b"GNU.sparse.realsize"


class TarError(ValueError):
    """The byte stream is not a tar archive Go's archive/tar would read."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (tar offset {offset})")


class TarHeaderError(TarError):
    """A header block or extended record is invalid (Go's ErrHeader)."""


class TarTruncatedError(TarError):
    """The stream ended inside a header, body or extended record (Go's ErrUnexpectedEOF)."""


class TarLimitError(TarError):
    """A record is larger than the parser agrees to buffer."""


class TarUndefinedError(TarError):
    """The reference reader's result depends on Go's random map order here, so none is defined."""


@dataclass(slots=True)
class TarEntry:
    """One entry as Go's ``tar.Reader.Next`` returns it (the fields TarSum reads)."""

    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    typeflag: int
    linkname: bytes
    uname: bytes
    gname: bytes
    devmajor: int
    devminor: int
    # Go's hdr.PAXRecords: the records of the 'x' (or 'g') header that applied, or None.
    pax: dict[bytes, bytes] | None = None
    offset: int = 0
    # The rest is what Go's tar.Writer looks at when the reference re-encodes the header.
    format: int = 0  # Go's Header.Format bits
    mtime_nsec: int = 0  # sub-second part of a PAX mtime
    atime: tuple[int, int] | None = None  # (unix seconds, nanoseconds); None is Go's zero Time
    ctime: tuple[int, int] | None = None
    # Set on a global header whose xattrs Go applies in random order (see _global_entry).
    xattrs_unknown: bool = False

    def xattrs(self) -> list[tuple[bytes, bytes]]:
        """SCHILY.xattr records as (name, value), sorted by name the way Go's sort.Slice does.

        Keys are unique (they come from a map), so the unstable Go sort has only one result.
        Records with an empty value count: TarSum v1 reads PAXRecords, where mergePAX keeps them.
        """
        if not self.pax:
            return []
        cut = len(_PAX_XATTR)
        found = [(k[cut:], v) for k, v in self.pax.items() if k.startswith(_PAX_XATTR)]
        found.sort()
        return found


class TarSink(Protocol):
    def begin_entry(self, entry: TarEntry) -> None: ...

    def entry_data(self, data: memoryview) -> None: ...

    def end_entry(self) -> None: ...


def to_int64(value: int) -> int:
    """Wrap like a Go int64 conversion."""
    value &= _UINT64
    return value - (1 << 64) if value > _INT64_MAX else value


def cstr(field: bytes) -> bytes:
    """Go's parser.parseString: up to the first NUL, or the whole field."""
    end = field.find(0)
    return field if end < 0 else field[:end]


def go_parse_int(text: bytes) -> int | None:
    """strconv.ParseInt(text, 10, 64); None where Go returns an error.

    Python's int() also accepts underscores, whitespace and non-ASCII digits, so the syntax is
    checked first.
    """
    if not _DECIMAL.fullmatch(text):
        return None
    value = int(text)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def parse_octal(field: bytes) -> int:
    """Go's parser.parseOctal; raises TarHeaderError where Go sets ErrHeader."""
    text = field.strip(b" \x00")
    if not text:
        return 0
    text = cstr(text)
    if text.translate(None, _OCTAL_DIGITS):
        raise TarHeaderError(f"invalid octal field {bytes(field)!r}")
    value = int(text, 8)
    if value > _UINT64:
        raise TarHeaderError(f"octal field {bytes(field)!r} overflows 64 bits")
    return to_int64(value)


def parse_numeric(field: bytes) -> int:
    """Go's parser.parseNumeric: base-256 when the top bit is set, octal otherwise."""
    if field and field[0] & 0x80:
        # Two's complement, big-endian, with the marker bit excluded; Go rejects anything that
        # does not fit an int64 (it checks the top byte before every shift).
        negative = bool(field[0] & 0x40)
        raw = bytearray(field)
        if negative:
            for i in range(len(raw)):
                raw[i] ^= 0xFF
        raw[0] &= 0x7F
        value = int.from_bytes(raw, "big")
        if (value >> 8) >> 56 or value >> 63:
            raise TarHeaderError(f"base-256 field {bytes(field)!r} overflows int64")
        return ~value if negative else value
    return parse_octal(field)


def parse_pax_time(text: bytes) -> tuple[int, int]:
    """Go's parsePAXTime as (Time.Unix(), Time.Nanosecond()): seconds round toward -inf."""
    secs_text, _, frac = text.partition(b".")
    secs = go_parse_int(secs_text)
    if secs is None:
        raise TarHeaderError(f"invalid PAX time {text!r}")
    if not frac:
        return secs, 0
    if frac.translate(None, b"0123456789"):
        raise TarHeaderError(f"invalid PAX time {text!r}")
    nanos = int((frac + b"000000000")[:9])
    if secs_text.startswith(b"-") and nanos:
        # time.Unix(secs, -nanos) normalises the negative nanoseconds by borrowing a second.
        return to_int64(secs - 1), 1_000_000_000 - nanos
    return secs, nanos


def parse_pax_records(data: bytes) -> dict[bytes, bytes]:
    """Go's parsePAX: ``"%d %s=%s\\n"`` records, GNU sparse 0.0 pairs folded into a map."""
    records: dict[bytes, bytes] = {}
    sparse: list[bytes] = []
    rest = data
    while rest:
        space = rest.find(b" ")
        if space < 0:
            raise TarHeaderError("PAX record without a length")
        length = go_parse_int(rest[:space])
        if length is None or length < 5 or length > len(rest):
            raise TarHeaderError(f"invalid PAX record length {rest[:space][:32]!r}")
        length -= space + 1
        if length <= 0:
            raise TarHeaderError("PAX record length shorter than its own digits")
        body = rest[space + 1 :]
        record, newline, rest = body[: length - 1], body[length - 1 : length], body[length:]
        if newline != b"\n":
            raise TarHeaderError("PAX record does not end with a newline where its length says")
        key, eq, value = record.partition(b"=")
        if not eq:
            raise TarHeaderError(f"PAX record without '=': {record[:64]!r}")
        if not key:
            raise TarHeaderError("PAX record with an empty key")
        if key in (_PAX_PATH, _PAX_LINKPATH, _PAX_UNAME, _PAX_GNAME):
            if 0 in value:
                raise TarHeaderError(f"PAX {key.decode()} contains NUL")
        elif 0 in key:
            raise TarHeaderError("PAX key contains NUL")
        if key == _SPARSE_OFFSET or key == _SPARSE_NUMBYTES:
            expect = _SPARSE_OFFSET if len(sparse) % 2 == 0 else _SPARSE_NUMBYTES
            if key != expect or b"," in value:
                raise TarHeaderError("GNU sparse 0.0 records out of order")
            sparse.append(value)
        else:
            records[key] = value
    if sparse:
        records[_SPARSE_MAP_KEY] = b",".join(sparse)
    return records


# Raw numeric field -> value. Layers repeat the same modes, ids and times thousands of times.
_NUMERIC: dict[bytes, int] = {}


def _num(field: bytes) -> int:
    value = _NUMERIC.get(field)
    if value is None:
        value = parse_numeric(field)
        if len(_NUMERIC) > 8192:
            _NUMERIC.clear()
        _NUMERIC[field] = value
    return value


_LAYOUT = struct.Struct("100s8s8s8s12s12s8sB100s6s2s32s32s8s8s155s12s")


def read_header(blk: bytes) -> tuple[TarEntry, int]:
    """Go's getFormat and readHeader for one block: (entry, header kind). Raises TarHeaderError.

    This runs once per entry, so it unpacks the block in one call and inlines the cache
    lookups that ``_num`` would do.
    """
    (
        name,
        f_mode,
        f_uid,
        f_gid,
        f_size,
        f_mtime,
        f_chksum,
        typeflag,
        linkname,
        magic,
        version,
        uname,
        gname,
        f_major,
        f_minor,
        area,
        tail,
    ) = _LAYOUT.unpack(blk)
    # Checksums and sizes differ from file to file, so they are parsed directly: plain octal
    # digits go straight to int(); anything else takes Go's full rules.
    digits = f_chksum.strip(b" \x00")
    if digits and not digits.translate(None, _OCTAL_DIGITS):
        stored = int(digits, 8)
    else:
        try:
            stored = parse_octal(f_chksum)  # Go reads this field as octal, never base-256
        except TarHeaderError:
            raise TarHeaderError("invalid header checksum field (not a tar header)") from None
    # adler32's low half is 1 + (sum of bytes) mod 65521, exact for runs of <= 256 bytes, so
    # three C calls give the byte sum with the checksum field counted as eight spaces.
    unsigned = (
        (adler32(blk[:256]) & 0xFFFF)
        + (adler32(blk[256:]) & 0xFFFF)
        - (adler32(f_chksum) & 0xFFFF)
        + 255
    )
    if stored != unsigned:
        high = (
            504 - len(blk.translate(None, _HIGH_BYTES)) + len(f_chksum.translate(None, _HIGH_BYTES))
        )
        if stored != unsigned - 256 * high:
            raise TarHeaderError("header checksum mismatch (not a tar header)")
    if magic == b"ustar\x00":
        kind = FORMAT_STAR if tail[8:] == b"tar\x00" else FORMAT_USTAR
    elif magic == b"ustar " and version == b" \x00":
        kind = FORMAT_GNU
    else:
        kind = FORMAT_V7

    cache = _NUMERIC
    mode = cache.get(f_mode)
    if mode is None:
        mode = _num(f_mode)
    uid = cache.get(f_uid)
    if uid is None:
        uid = _num(f_uid)
    gid = cache.get(f_gid)
    if gid is None:
        gid = _num(f_gid)
    digits = f_size.strip(b" \x00")
    if digits and not digits.translate(None, _OCTAL_DIGITS):
        size = int(digits, 8)
    else:
        size = parse_numeric(f_size)
    mtime = cache.get(f_mtime)
    if mtime is None:
        mtime = _num(f_mtime)
    name = name.partition(b"\x00")[0]
    linkname = linkname.partition(b"\x00")[0]
    if kind == FORMAT_V7:
        # Go leaves uname, gname and the device numbers empty, and Header.Format unknown.
        entry = TarEntry(name, mode, uid, gid, size, mtime, typeflag, linkname, b"", b"", 0, 0)
        return entry, kind
    major = cache.get(f_major)
    if major is None:
        major = _num(f_major)
    minor = cache.get(f_minor)
    if minor is None:
        minor = _num(f_minor)
    entry = TarEntry(
        name,
        mode,
        uid,
        gid,
        size,
        mtime,
        typeflag,
        linkname,
        uname.partition(b"\x00")[0],
        gname.partition(b"\x00")[0],
        major,
        minor,
    )
    if kind == FORMAT_USTAR:
        prefix = area.partition(b"\x00")[0]
        # Go only calls the header USTAR/PAX when the block is ASCII and every numeric
        # field it parsed ends in NUL.
        if blk.isascii() and not (
            f_size[11]
            or f_mode[7]
            or f_uid[7]
            or f_gid[7]
            or f_mtime[11]
            or f_major[7]
            or f_minor[7]
        ):
            entry.format = GO_USTAR | GO_PAX
    elif kind == FORMAT_STAR:
        prefix = area[:131].partition(b"\x00")[0]
        entry.atime = (_num(area[131:143]), 0)
        entry.ctime = (_num(area[143:155]), 0)
    else:
        prefix = b""
        entry.format = GO_GNU
        # Before Go 1.8 the writer put a USTAR prefix where GNU keeps atime/ctime; Go reads
        # those fields skeptically and falls back to the prefix when they do not parse.
        try:
            if area[0]:
                entry.atime = (_num(area[:12]), 0)
            if area[12]:
                entry.ctime = (_num(area[12:24]), 0)
        except TarHeaderError:
            entry.atime = entry.ctime = None
            entry.format = 0
            candidate = area.partition(b"\x00")[0]
            if candidate.isascii():
                prefix = candidate
    if prefix:
        entry.name = prefix + b"/" + name
    return entry, kind


def _merge_pax(entry: TarEntry, records: dict[bytes, bytes]) -> None:
    """Go's mergePAX for a file entry. Any bad value fails the entry, whatever the map order."""
    for key, value in records.items():
        if not value:
            continue  # Go keeps the USTAR value when the record is empty
        if key == _PAX_PATH:
            entry.name = value
        elif key == _PAX_LINKPATH:
            entry.linkname = value
        elif key == _PAX_UNAME:
            entry.uname = value
        elif key == _PAX_GNAME:
            entry.gname = value
        elif key == _PAX_UID or key == _PAX_GID or key == _PAX_SIZE:
            number = go_parse_int(value)
            if number is None:
                raise TarHeaderError(f"invalid PAX {key.decode()} {value[:32]!r}")
            if key == _PAX_UID:
                entry.uid = number
            elif key == _PAX_GID:
                entry.gid = number
            else:
                entry.size = number
        elif key == _PAX_MTIME:
            entry.mtime, entry.mtime_nsec = parse_pax_time(value)
        elif key == _PAX_ATIME:
            entry.atime = parse_pax_time(value)
        elif key == _PAX_CTIME:
            entry.ctime = parse_pax_time(value)
    entry.pax = records


def _pax_value_fails(key: bytes, value: bytes) -> bool:
    if not value:
        return False
    try:
        if key in (_PAX_UID, _PAX_GID, _PAX_SIZE):
            return go_parse_int(value) is None
        if key in (_PAX_MTIME, _PAX_ATIME, _PAX_CTIME):
            parse_pax_time(value)
    except TarHeaderError:
        return True
    return False


def _global_entry(entry: TarEntry, records: dict[bytes, bytes], go_format: int) -> TarEntry:
    """The Header Go returns for a 'g' record: only Name, Typeflag, Xattrs and PAXRecords.

    Go ignores mergePAX's error here, but mergePAX stops at the first bad value in random map
    order, leaving PAXRecords unset and the name and xattrs only partly applied. A path record
    then makes the entry's name (hashed by every version) a matter of chance; xattr records
    only make v1/dev undefined, which the entry flags for TarSum to refuse.
    """
    name = entry.name
    pax: dict[bytes, bytes] | None = records
    xattrs_unknown = False
    if any(_pax_value_fails(k, v) for k, v in records.items()):
        if records.get(_PAX_PATH, name) != name:
            raise TarUndefinedError(
                "PAX global header mixes an invalid value with a path record; "
                "Go's result depends on map iteration order",
                entry.offset,
            )
        pax = None
        xattrs_unknown = any(k.startswith(_PAX_XATTR) and v for k, v in records.items())
    elif records.get(_PAX_PATH):
        name = records[_PAX_PATH]
    return TarEntry(
        name=name,
        mode=0,
        uid=0,
        gid=0,
        size=0,
        mtime=GO_ZERO_TIME_UNIX,
        typeflag=TYPE_XGLOBAL,
        linkname=b"",
        uname=b"",
        gname=b"",
        devmajor=0,
        devminor=0,
        pax=pax,
        offset=entry.offset,
        format=go_format,
        xattrs_unknown=xattrs_unknown,
    )


def _validate_sparse(entries: list[tuple[int, int]], size: int) -> bool:
    """Go's validateSparseEntries."""
    if size < 0:
        return False
    prev_end = 0
    for offset, length in entries:
        if offset < 0 or length < 0:
            return False
        if offset > _INT64_MAX - length:
            return False
        if offset + length > size:
            return False
        if prev_end > offset:
            return False
        prev_end = offset + length
    return True


def _sparse_segments(entries: list[tuple[int, int]], size: int) -> list[tuple[bool, int]]:
    """The logical file as (is_hole, length) runs; holes read back as zeros."""
    segments: list[tuple[bool, int]] = []
    pos = 0
    for offset, length in entries:
        if length == 0:
            continue
        if offset > pos:
            segments.append((True, offset - pos))
        segments.append((False, length))
        pos = offset + length
    if size > pos:
        segments.append((True, size - pos))
    return segments


# Parser states.
_ST_HEADER = 0
_ST_ZERO2 = 1
_ST_BODY = 2
_ST_SPECIAL = 3
_ST_SKIP = 4
_ST_SPARSE_EXT = 5
_ST_SPARSE_MAP = 6
_ST_SPARSE_BODY = 7
_ST_DONE = 8

_ZEROS = memoryview(bytes(1 << 20))


class TarParser:
    """Incremental tar reader; see the module docstring for the rules it follows."""

    def __init__(
        self,
        sink: TarSink,
        *,
        max_special: int = MAX_SPECIAL_FILE,
        max_sparse_map: int = MAX_SPARSE_MAP,
        max_sparse_holes: int = MAX_SPARSE_HOLES,
    ) -> None:
        self._sink = sink
        self._max_special = max_special
        self._max_sparse_map = max_sparse_map
        self._holes_left = max_sparse_holes
        self._state = _ST_HEADER
        self._block = bytearray()  # partial header / sparse block
        self._remain = 0  # bytes left in the current body, special record or padding
        self._pad = 0  # padding after the current body
        self._special = bytearray()
        self._special_entry: TarEntry | None = None
        self._pax: dict[bytes, bytes] | None = None
        self._long_name = b""
        self._long_link = b""
        self._entry: TarEntry | None = None
        self._fmt = FORMAT_V7
        self._go_format = _GO_ANY  # Go's format guess, narrowed by every header of one entry
        self._sparse: list[tuple[int, int]] = []
        self._sparse_map = bytearray()
        self._segments: list[tuple[bool, int]] = []
        self._segment = 0
        self._remain_segment = 0
        self._sparse_bytes = 0
        self._base = 0  # stream offset of the first byte of the buffer being fed
        self.done = False  # the end-of-archive marker (or end of input) has been reached

    @property
    def offset(self) -> int:
        return self._base

    # -- input ---------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next bytes of the tar stream. Trailing bytes after the end are ignored."""
        if self.done:
            return
        view = data if isinstance(data, memoryview) else memoryview(data)
        # Slicing a bytes object copies a header block far faster than bytes(memoryview).
        raw = data if type(data) is bytes else None
        total = len(view)
        pos = 0
        sink = self._sink
        while pos < total:
            state = self._state
            if state == _ST_BODY:
                take = self._remain
                if take > total - pos:
                    take = total - pos
                sink.entry_data(view[pos : pos + take])
                pos += take
                self._remain -= take
                if not self._remain:
                    self._end_entry()
            elif state == _ST_HEADER or state == _ST_ZERO2:
                if self._block or total - pos < BLOCK:
                    need = BLOCK - len(self._block)
                    piece = view[pos : pos + need]
                    self._block += piece
                    pos += len(piece)
                    if len(self._block) < BLOCK:
                        break
                    blk = bytes(self._block)
                    self._block.clear()
                    at = self._base + pos - BLOCK
                else:
                    end = pos + BLOCK
                    blk = raw[pos:end] if raw is not None else bytes(view[pos:end])
                    at = self._base + pos
                    pos = end
                self._on_block(blk, at)
                if self.done:
                    break
            elif state == _ST_SKIP:
                take = self._remain if self._remain < total - pos else total - pos
                pos += take
                self._remain -= take
                if not self._remain:
                    self._state = _ST_HEADER
            elif state == _ST_SPECIAL:
                take = self._remain if self._remain < total - pos else total - pos
                self._special += view[pos : pos + take]
                pos += take
                self._remain -= take
                if not self._remain:
                    self._end_special()
            elif state == _ST_SPARSE_BODY:
                pos = self._feed_sparse(view, pos, total)
            elif state == _ST_SPARSE_EXT or state == _ST_SPARSE_MAP:
                need = BLOCK - len(self._block)
                piece = view[pos : pos + need]
                self._block += piece
                pos += len(piece)
                if len(self._block) == BLOCK:
                    blk = bytes(self._block)
                    self._block.clear()
                    if state == _ST_SPARSE_EXT:
                        self._on_sparse_ext(blk)
                    else:
                        self._on_sparse_map(blk)
            else:  # _ST_DONE
                break
        self._base += total

    def close(self) -> None:
        """Signal end of input; raises TarTruncatedError if it cut an entry short."""
        state = self._state
        if state == _ST_DONE:
            return
        if state in (_ST_HEADER, _ST_ZERO2):
            if self._block:
                raise TarTruncatedError(
                    f"stream ends inside a header block ({len(self._block)} of {BLOCK} bytes)",
                    self._base,
                )
        elif state != _ST_SKIP:
            # Go reports the end of input inside padding as the end of the archive, but inside
            # a body, an extended record or a sparse map as io.ErrUnexpectedEOF.
            raise TarTruncatedError(f"stream ends inside {self._describe()}", self._base)
        self._state = _ST_DONE
        self.done = True

    def _describe(self) -> str:
        if self._state == _ST_SPECIAL:
            return f"an extended header record ({self._remain} bytes missing)"
        if self._state in (_ST_SPARSE_EXT, _ST_SPARSE_MAP):
            return "a sparse file map"
        entry = self._entry
        name = entry.name[:200] if entry is not None else b"?"
        return f"the body of {name!r} ({self._remain} bytes missing)"

    # -- headers ---------------------------------------------------------------------------

    def _on_block(self, blk: bytes, at: int) -> None:
        if self._state == _ST_ZERO2:
            if blk == ZERO_BLOCK:
                self._state = _ST_DONE
                self.done = True
                return
            raise TarHeaderError("a zero block followed by a non-zero block", at)
        if blk == ZERO_BLOCK:
            self._state = _ST_ZERO2
            return
        try:
            entry, fmt = read_header(blk)
        except TarHeaderError as error:
            raise TarHeaderError(str(error), at) from None
        entry.offset = at
        typeflag = entry.typeflag
        self._go_format &= entry.format
        # Go's handleRegularFile runs on every header before anything else looks at it.
        body = 0 if typeflag in _HEADER_ONLY else entry.size
        if body < 0:
            raise TarHeaderError(f"negative size {entry.size}", at)
        if typeflag in _META:
            if body > self._max_special:
                raise TarLimitError(
                    f"extended header record of {body} bytes exceeds {self._max_special}", at
                )
            self._go_format &= (
                GO_GNU if typeflag in (TYPE_GNU_LONGNAME, TYPE_GNU_LONGLINK) else GO_PAX
            )
            self._special_entry = entry
            self._special.clear()
            self._pad = -body & (BLOCK - 1)
            if body:
                self._remain = body
                self._state = _ST_SPECIAL
            else:
                self._end_special()
            return
        self._fmt = fmt
        self._start_file(entry, blk)

    def _end_special(self) -> None:
        entry = self._special_entry
        assert entry is not None
        data = bytes(self._special)
        self._special.clear()
        typeflag = entry.typeflag
        if typeflag == TYPE_GNU_LONGNAME:
            self._long_name = cstr(data)
        elif typeflag == TYPE_GNU_LONGLINK:
            self._long_link = cstr(data)
        else:
            try:
                records = parse_pax_records(data)
            except TarHeaderError as error:
                raise TarHeaderError(str(error), entry.offset) from None
            if typeflag == TYPE_XHEADER:
                self._pax = records  # a later 'x' replaces the pending records, never merges
            else:
                # Go returns the global header as an entry of its own and forgets any pending
                # 'x' records and GNU long names (they were locals of that Next call).
                global_entry = _global_entry(entry, records, self._go_format)
                self._pax = None
                self._long_name = self._long_link = b""
                self._go_format = _GO_ANY
                self._entry = global_entry
                self._sink.begin_entry(global_entry)
                self._sink.end_entry()
        self._enter_skip(self._pad)

    def _enter_skip(self, count: int) -> None:
        if count:
            self._remain = count
            self._state = _ST_SKIP
        else:
            self._state = _ST_HEADER

    def _start_file(self, entry: TarEntry, blk: bytes) -> None:
        pax, self._pax = self._pax, None
        long_name, self._long_name = self._long_name, b""
        long_link, self._long_link = self._long_link, b""
        go_format, self._go_format = self._go_format, _GO_ANY
        if go_format & GO_USTAR and go_format & GO_PAX:
            go_format = GO_USTAR
        entry.format = go_format
        if pax is not None:
            try:
                _merge_pax(entry, pax)
            except TarHeaderError as error:
                raise TarHeaderError(str(error), entry.offset) from None
        if long_name:
            entry.name = long_name
        if long_link:
            entry.linkname = long_link
        if entry.typeflag == TYPE_REGA:
            entry.typeflag = TYPE_DIR if entry.name.endswith(b"/") else TYPE_REG
        # The PAX size may have changed the body length, so Go sets up the reader again.
        body = 0 if entry.typeflag in _HEADER_ONLY else entry.size
        if body < 0:
            raise TarHeaderError(f"negative size {entry.size}", entry.offset)
        self._entry = entry
        self._pad = -body & (BLOCK - 1)
        self._remain = body
        if entry.typeflag == TYPE_GNU_SPARSE:
            self._start_old_gnu_sparse(entry, blk)
            return
        if pax is not None and self._start_pax_sparse(entry, pax):
            return
        self._sink.begin_entry(entry)
        if body:
            self._state = _ST_BODY
        else:
            self._end_entry()

    def _end_entry(self) -> None:
        self._sink.end_entry()
        self._enter_skip(self._pad)

    # -- sparse files ----------------------------------------------------------------------

    def _start_old_gnu_sparse(self, entry: TarEntry, blk: bytes) -> None:
        if self._fmt != FORMAT_GNU:
            raise TarHeaderError("old GNU sparse entry in a non-GNU header", entry.offset)
        try:
            entry.size = _num(blk[483:495])
            more = self._collect_old_sparse(blk[386:483], 4)
        except TarHeaderError as error:
            raise TarHeaderError(str(error), entry.offset) from None
        if more:
            self._block.clear()
            self._sparse_bytes = 97  # the header's own sparse area, as Go counts it
            self._state = _ST_SPARSE_EXT
        else:
            self._begin_sparse_body()

    def _collect_old_sparse(self, area: bytes, count: int) -> bool:
        """Parse ``count`` 24-byte entries; returns the is-extended flag that follows them."""
        for i in range(count):
            item = area[i * 24 : i * 24 + 24]
            if item[0] == 0:
                break  # GNU and BSD tar stop at the first empty offset; so does Go
            self._sparse.append((_num(item[:12]), _num(item[12:24])))
        return area[count * 24] > 0

    def _on_sparse_ext(self, blk: bytes) -> None:
        entry = self._entry
        assert entry is not None
        self._sparse_bytes += BLOCK
        if self._sparse_bytes >= self._max_sparse_map:
            raise TarLimitError("old GNU sparse map exceeds the size limit", entry.offset)
        try:
            more = self._collect_old_sparse(blk, 21)
        except TarHeaderError as error:
            raise TarHeaderError(str(error), entry.offset) from None
        if not more:
            self._begin_sparse_body()

    def _start_pax_sparse(self, entry: TarEntry, pax: dict[bytes, bytes]) -> bool:
        """Go's readGNUSparsePAXHeaders; False when the entry is not a PAX sparse file."""
        major = pax.get(_SPARSE_MAJOR, b"")
        minor = pax.get(_SPARSE_MINOR, b"")
        if major == b"0" and minor in (b"0", b"1"):
            format_1x0 = False
        elif major == b"1" and minor == b"0":
            format_1x0 = True
        elif major or minor:
            return False  # unknown GNU sparse version: an ordinary file
        elif pax.get(_SPARSE_MAP_KEY):
            format_1x0 = False  # 0.0 and 0.1 carried no version records
        else:
            return False
        if pax.get(_SPARSE_NAME):
            entry.name = pax[_SPARSE_NAME]
        size_text = pax.get(_SPARSE_SIZE) or pax.get(_SPARSE_REALSIZE, b"")
        if size_text:
            size = go_parse_int(size_text)
            if size is None:
                raise TarHeaderError(f"invalid GNU sparse size {size_text[:32]!r}", entry.offset)
            entry.size = size
        if format_1x0:
            self._sparse_map.clear()
            self._block.clear()
            self._state = _ST_SPARSE_MAP
            self._check_map_room()
            return True
        count = go_parse_int(pax.get(_SPARSE_NUMBLOCKS, b""))
        if count is None or count < 0 or 2 * count > _INT64_MAX:
            raise TarHeaderError("invalid GNU.sparse.numblocks", entry.offset)
        fields = pax.get(_SPARSE_MAP_KEY, b"").split(b",")
        if fields == [b""]:
            fields = []
        if len(fields) != 2 * count:
            raise TarHeaderError("GNU.sparse.map does not match numblocks", entry.offset)
        for i in range(0, len(fields), 2):
            offset, length = go_parse_int(fields[i]), go_parse_int(fields[i + 1])
            if offset is None or length is None:
                raise TarHeaderError("invalid number in GNU.sparse.map", entry.offset)
            self._sparse.append((offset, length))
        self._begin_sparse_body()
        return True

    def _on_sparse_map(self, blk: bytes) -> None:
        """Accumulate GNU 1.0 sparse map blocks (part of the body) until all tokens are in."""
        entry = self._entry
        assert entry is not None
        self._remain -= BLOCK
        self._sparse_map += blk
        lines = self._sparse_map.count(b"\n")
        if lines < 1:
            self._check_map_room()
            return
        first_end = self._sparse_map.index(b"\n")
        count = go_parse_int(bytes(self._sparse_map[:first_end]))
        if count is None or count < 0 or 2 * count > _INT64_MAX:
            raise TarHeaderError("invalid GNU 1.0 sparse map entry count", entry.offset)
        if lines < 1 + 2 * count:
            self._check_map_room()
            return
        # Go reads whole blocks and drops what follows the last token in the final block.
        tokens = bytes(self._sparse_map).split(b"\n", 1 + 2 * count)[1 : 1 + 2 * count]
        self._sparse_map.clear()
        for i in range(0, len(tokens), 2):
            offset, length = go_parse_int(tokens[i]), go_parse_int(tokens[i + 1])
            if offset is None or length is None:
                raise TarHeaderError("invalid number in GNU 1.0 sparse map", entry.offset)
            self._sparse.append((offset, length))
        self._begin_sparse_body()

    def _check_map_room(self) -> None:
        # The map is read in whole blocks from the entry's own data, like Go's mustReadFull
        # on the entry reader: a block that is not all there is an unexpected EOF.
        entry = self._entry
        offset = entry.offset if entry is not None else None
        if len(self._sparse_map) + BLOCK > self._max_sparse_map:
            raise TarLimitError("GNU 1.0 sparse map exceeds the size limit", offset)
        if self._remain < BLOCK:
            raise TarTruncatedError("GNU sparse map runs past the end of the entry's data", offset)

    def _begin_sparse_body(self) -> None:
        entry = self._entry
        assert entry is not None
        entries, self._sparse = self._sparse, []
        if entry.typeflag in _HEADER_ONLY or not _validate_sparse(entries, entry.size):
            raise TarHeaderError("invalid sparse map", entry.offset)
        data = sum(length for _, length in entries)
        # Go fails with errMissData / errUnrefData once it reaches the point where the dense
        # data and the map disagree; the outcome is decided here already.
        if data != self._remain:
            raise TarHeaderError(
                f"sparse map describes {data} data bytes but the entry stores {self._remain}",
                entry.offset,
            )
        holes = entry.size - data
        if holes > self._holes_left:
            raise TarLimitError("sparse holes exceed the expansion limit", entry.offset)
        self._holes_left -= holes
        self._segments = _sparse_segments(entries, entry.size)
        self._segment = 0
        self._sink.begin_entry(entry)
        self._state = _ST_SPARSE_BODY
        self._emit_holes()

    def _emit_holes(self) -> None:
        """Expand hole runs at the cursor; finish the entry when no runs are left."""
        segments = self._segments
        while self._segment < len(segments):
            is_hole, length = segments[self._segment]
            if not is_hole:
                self._remain_segment = length
                return
            while length:
                take = min(length, len(_ZEROS))
                self._sink.entry_data(_ZEROS[:take])
                length -= take
            self._segment += 1
        self._segments = []
        self._end_entry()

    def _feed_sparse(self, view: memoryview, pos: int, total: int) -> int:
        take = min(self._remain_segment, total - pos)
        self._sink.entry_data(view[pos : pos + take])
        self._remain_segment -= take
        self._remain -= take
        pos += take
        if not self._remain_segment:
            self._segment += 1
            self._emit_holes()
        return pos
