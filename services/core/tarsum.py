"""TarSum v0 ("tarsum"), v1 ("tarsum.v1") and dev ("tarsum.dev"), bit-exact with pkg/tarsum.

The reference reads a tar with Go's archive/tar and, for every entry, hashes the selected header
fields as ``key + value`` and then the body; the final digest hashes an optional extra payload
and then the hex file sums in sorted order. Details the spec (tarsum_spec.md) leaves out and the
code decides:

* ``uname`` and ``gname`` are always hashed with empty values (encodeHeader blanks them "to be
  compatible with versions before go 1.10"), although the spec lists them as headers.
* v1 and dev are one algorithm (both use v1TarHeaderSelect): v0's fields minus ``mtime``, plus
  the ``SCHILY.xattr.*`` PAX records (prefix stripped) sorted by name; v0 ignores xattrs.
* Header values are Go's: a directory name keeps its trailing slash, ``mode`` is the raw
  mode field in decimal (often including S_IFDIR etc.), ``size`` is the size field even for
  links and devices, a PAX global header is an entry (zero time, ``mtime-62135596800`` in v0).
* Duplicate detection uses ``path.Join(".", path.Join("/", name))``; when any path repeats,
  the sums are ordered by Go's (unstable) sort.Sort with a comparator that orders same-path
  entries by position and all others by sum. That comparator is not a strict order, so the
  result depends on Go's exact algorithm (pdqsort), which :func:`go_sort` reproduces.
* The reference also writes every header it reads back out with Go's ``tar.Writer`` and fails
  when ``WriteHeader`` refuses it (a regular file named ``dir/``, a header whose fields fit
  none of the formats its reader said it was in, a NUL in a name that needs PAX, ...).
  :func:`writer_rejection` reproduces that decision, so such archives have no TarSum here
  either.
* The reference's label parser accepts only sha256 and sha512, but the algorithm is defined
  for any hash (its own tests use md5, sha1, sha224 and sha384); we offer the six the
  registry's digest grammar names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from services.core.tarstream import (
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
    TarError,
)

VERSION_V0 = "tarsum"
VERSION_V1 = "tarsum.v1"
VERSION_DEV = "tarsum.dev"
VERSIONS = (VERSION_V0, VERSION_V1, VERSION_DEV)
CIPHERS: dict[str, Callable[[], Any]] = {
    "md5": hashlib.md5,
    "sha1": hashlib.sha1,
    "sha224": hashlib.sha224,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}

# One % operation builds the whole header string; uname and gname carry no value on purpose.
_V0_HEADER = (
    b"name%bmode%duid%dgid%dsize%dmtime%dtypeflag%blinkname%bunamegnamedevmajor%ddevminor%d"
)
_V1_HEADER = b"name%bmode%duid%dgid%dsize%dtypeflag%blinkname%bunamegnamedevmajor%ddevminor%d"
_BYTE = [bytes([i]) for i in range(256)]


class TarSumUndefinedError(TarError):
    """The reference fails on this archive (its tar.Writer rejects an entry): no TarSum exists."""


# -- the reference's tar.Writer.WriteHeader, reduced to "does it return an error" ------------

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


@dataclass(frozen=True)
class TarSumSpec:
    version: str
    cipher: str

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"unknown TarSum version {self.version!r}")
        if self.cipher not in CIPHERS:
            raise ValueError(f"unknown TarSum cipher {self.cipher!r}")

    @property
    def label(self) -> str:
        return f"{self.version}+{self.cipher}"


def v0_header(entry: TarEntry) -> bytes:
    return _V0_HEADER % (
        entry.name,
        entry.mode,
        entry.uid,
        entry.gid,
        entry.size,
        entry.mtime,
        _BYTE[entry.typeflag],
        entry.linkname,
        entry.devmajor,
        entry.devminor,
    )


def v1_header(entry: TarEntry) -> bytes:
    if entry.xattrs_unknown:
        raise TarSumUndefinedError(
            "a PAX global header mixes an invalid value with xattr records; the xattrs Go "
            "applies depend on map iteration order, so v1/dev TarSums are not deterministic",
            entry.offset,
        )
    head = _V1_HEADER % (
        entry.name,
        entry.mode,
        entry.uid,
        entry.gid,
        entry.size,
        _BYTE[entry.typeflag],
        entry.linkname,
        entry.devmajor,
        entry.devminor,
    )
    if entry.pax:
        xattrs = entry.xattrs()
        if xattrs:
            return head + b"".join(name + value for name, value in xattrs)
    return head


def clean_path(name: bytes) -> bytes:
    """``path.Join(".", path.Join("/", name))``: the key the reference compares for duplicates."""
    # Most names have no '.' or empty segment and need only the trailing slash removed.
    if name and name[0] != 0x2F and name[0] != 0x2E and b"//" not in name and b"/." not in name:
        return name[:-1] if name[-1] == 0x2F else name
    parts: list[bytes] = []
    for part in name.split(b"/"):
        if not part or part == b".":
            continue
        if part == b"..":
            if parts:
                parts.pop()  # at the root, '..' stays at the root
            continue
        parts.append(part)
    return b"/".join(parts) or b"."


class TarSum:
    """A :class:`~services.core.tarstream.TarSink` computing any number of TarSums in one pass."""

    def __init__(self, specs: Sequence[TarSumSpec]) -> None:
        if not specs:
            raise ValueError("no TarSum requested")
        self._specs = list(dict.fromkeys(specs))
        self._ctors = [CIPHERS[spec.cipher] for spec in self._specs]
        self._v0 = [spec.version == VERSION_V0 for spec in self._specs]
        self._sums: list[list[bytes]] = [[] for _ in self._specs]
        self._keys: list[bytes] = []
        self._seen: set[bytes] = set()
        self._duplicates = False
        self._current: list[Any] = []
        self._one = None
        if len(self._specs) == 1:
            # The common case (one TarSum) skips the per-chunk loop over hashers.
            self.begin_entry = self._begin_one  # type: ignore[method-assign]
            self.entry_data = self._data_one  # type: ignore[method-assign]
            self.end_entry = self._end_one  # type: ignore[method-assign]

    @property
    def specs(self) -> list[TarSumSpec]:
        return list(self._specs)

    def _note_path(self, name: bytes) -> None:
        key = clean_path(name)
        if key in self._seen:
            self._duplicates = True
        else:
            self._seen.add(key)
        self._keys.append(key)

    def _check_encodable(self, entry: TarEntry) -> None:
        reason = writer_rejection(entry)
        if reason is not None:
            raise TarSumUndefinedError(
                f"the reference TarSum fails on entry {entry.name[:200]!r}: Go's tar.Writer "
                f"refuses it ({reason})",
                entry.offset,
            )

    def begin_entry(self, entry: TarEntry) -> None:
        self._check_encodable(entry)
        self._note_path(entry.name)
        v0 = v1 = None
        current = []
        for ctor, is_v0 in zip(self._ctors, self._v0, strict=True):
            if is_v0:
                if v0 is None:
                    v0 = v0_header(entry)
                current.append(ctor(v0))
            else:
                if v1 is None:
                    v1 = v1_header(entry)
                current.append(ctor(v1))
        self._current = current

    def entry_data(self, data: memoryview) -> None:
        for hasher in self._current:
            hasher.update(data)

    def end_entry(self) -> None:
        for sums, hasher in zip(self._sums, self._current, strict=True):
            sums.append(hasher.digest())
        self._current = []

    def _begin_one(self, entry: TarEntry) -> None:
        self._check_encodable(entry)
        self._note_path(entry.name)
        header = v0_header(entry) if self._v0[0] else v1_header(entry)
        self._one = self._ctors[0](header)

    def _data_one(self, data: memoryview) -> None:
        self._one.update(data)  # type: ignore[union-attr]

    def _end_one(self) -> None:
        self._sums[0].append(self._one.digest())  # type: ignore[union-attr]
        self._one = None

    @property
    def entries(self) -> int:
        return len(self._keys)

    def digests(self, extra_payload: bytes | None = None) -> dict[str, str]:
        """Label -> hex digest for every spec."""
        results: dict[str, str] = {}
        for spec, ctor, sums in zip(self._specs, self._ctors, self._sums, strict=True):
            final = ctor()
            if extra_payload is not None:
                final.update(extra_payload)
            for digest in self._ordered(sums):
                final.update(digest.hex().encode())
            results[spec.label] = final.hexdigest()
        return results

    def _ordered(self, sums: list[bytes]) -> list[bytes]:
        # Raw digests of one length sort like their lowercase hex, which Go compares.
        if not self._duplicates:
            return sorted(sums)
        items = list(zip(sums, self._keys, range(len(sums)), strict=True))
        go_sort(items, _by_sum_keeping_path_order)
        return [item[0] for item in items]


def _by_sum_keeping_path_order(x: tuple[bytes, bytes, int], y: tuple[bytes, bytes, int]) -> bool:
    """fileinfosums.go bySum.Less when duplicates exist."""
    if x[1] == y[1]:
        return x[2] < y[2]
    return x[0] < y[0]


T = TypeVar("T")

_MASK64 = (1 << 64) - 1
_INCREASING = 1
_DECREASING = 2
_UNKNOWN = 0


def go_sort(data: list[T], less: Callable[[T, T], bool]) -> None:
    """Sort ``data`` in place making exactly the comparisons and swaps of Go's ``sort.Sort``.

    With a comparator that is not a strict weak order (TarSum's, once paths repeat), every
    algorithm may give a different permutation, so bit-exactness needs Go's: pattern-defeating
    quicksort with insertion sort below 13 elements, heapsort after too many bad pivots, and
    the xorshift (13, 7, 17) pattern breaker of Go >= 1.24 (earlier toolchains used
    (13, 17, 5), which matters only when a partition came out badly unbalanced).
    """
    n = len(data)
    if n > 1:
        _GoSorter(data, less).pdqsort(0, n, n.bit_length())


class _GoSorter:
    def __init__(self, data: list[Any], less: Callable[[Any, Any], bool]) -> None:
        self.data = data
        self.less = less
        self.swaps = 0

    def lt(self, i: int, j: int) -> bool:
        return self.less(self.data[i], self.data[j])

    def swap(self, i: int, j: int) -> None:
        data = self.data
        data[i], data[j] = data[j], data[i]

    def insertion_sort(self, a: int, b: int) -> None:
        for i in range(a + 1, b):
            j = i
            while j > a and self.lt(j, j - 1):
                self.swap(j, j - 1)
                j -= 1

    def sift_down(self, lo: int, hi: int, first: int) -> None:
        root = lo
        while True:
            child = 2 * root + 1
            if child >= hi:
                return
            if child + 1 < hi and self.lt(first + child, first + child + 1):
                child += 1
            if not self.lt(first + root, first + child):
                return
            self.swap(first + root, first + child)
            root = child

    def heap_sort(self, a: int, b: int) -> None:
        first, hi = a, b - a
        for i in range((hi - 1) // 2, -1, -1):
            self.sift_down(i, hi, first)
        for i in range(hi - 1, -1, -1):
            self.swap(first, first + i)
            self.sift_down(0, i, first)

    def pdqsort(self, a: int, b: int, limit: int) -> None:
        was_balanced = was_partitioned = True
        while True:
            length = b - a
            if length <= 12:
                self.insertion_sort(a, b)
                return
            if limit == 0:
                self.heap_sort(a, b)
                return
            if not was_balanced:
                self.break_patterns(a, b)
                limit -= 1
            pivot, hint = self.choose_pivot(a, b)
            if hint == _DECREASING:
                self.reverse_range(a, b)
                pivot = (b - 1) - (pivot - a)
                hint = _INCREASING
            if was_balanced and was_partitioned and hint == _INCREASING:
                if self.partial_insertion_sort(a, b):
                    return
            # 'a > 0' looks at the element before this range, as Go does.
            if a > 0 and not self.lt(a - 1, pivot):
                a = self.partition_equal(a, b, pivot)
                continue
            mid, was_partitioned = self.partition(a, b, pivot)
            left, right = mid - a, b - mid
            threshold = length // 8
            if left < right:
                was_balanced = left >= threshold
                self.pdqsort(a, mid, limit)
                a = mid + 1
            else:
                was_balanced = right >= threshold
                self.pdqsort(mid + 1, b, limit)
                b = mid

    def partition(self, a: int, b: int, pivot: int) -> tuple[int, bool]:
        self.swap(a, pivot)
        i, j = a + 1, b - 1
        while i <= j and self.lt(i, a):
            i += 1
        while i <= j and not self.lt(j, a):
            j -= 1
        if i > j:
            self.swap(j, a)
            return j, True
        self.swap(i, j)
        i += 1
        j -= 1
        while True:
            while i <= j and self.lt(i, a):
                i += 1
            while i <= j and not self.lt(j, a):
                j -= 1
            if i > j:
                break
            self.swap(i, j)
            i += 1
            j -= 1
        self.swap(j, a)
        return j, False

    def partition_equal(self, a: int, b: int, pivot: int) -> int:
        self.swap(a, pivot)
        i, j = a + 1, b - 1
        while True:
            while i <= j and not self.lt(a, i):
                i += 1
            while i <= j and self.lt(a, j):
                j -= 1
            if i > j:
                return i
            self.swap(i, j)
            i += 1
            j -= 1

    def partial_insertion_sort(self, a: int, b: int) -> bool:
        i = a + 1
        for _ in range(5):
            while i < b and not self.lt(i, i - 1):
                i += 1
            if i == b:
                return True
            if b - a < 50:
                return False
            self.swap(i, i - 1)
            if i - a >= 2:
                # Go's bound here is the absolute index 1, not a + 1.
                for j in range(i - 1, 0, -1):
                    if not self.lt(j, j - 1):
                        break
                    self.swap(j, j - 1)
            if b - i >= 2:
                for j in range(i + 1, b):
                    if not self.lt(j, j - 1):
                        break
                    self.swap(j, j - 1)
        return False

    def break_patterns(self, a: int, b: int) -> None:
        length = b - a
        if length < 8:
            return
        state = length
        modulus = 1 << length.bit_length()
        middle = a + (length // 4) * 2
        for idx in range(middle - 1, middle + 2):
            state ^= (state << 13) & _MASK64
            state ^= state >> 7
            state ^= (state << 17) & _MASK64
            other = state & (modulus - 1)
            if other >= length:
                other -= length
            self.swap(idx, a + other)

    def choose_pivot(self, a: int, b: int) -> tuple[int, int]:
        length = b - a
        self.swaps = 0
        i = a + length // 4 * 1
        j = a + length // 4 * 2
        k = a + length // 4 * 3
        if length >= 8:
            if length >= 50:
                i = self.median(i - 1, i, i + 1)
                j = self.median(j - 1, j, j + 1)
                k = self.median(k - 1, k, k + 1)
            j = self.median(i, j, k)
        if self.swaps == 0:
            return j, _INCREASING
        if self.swaps == 12:
            return j, _DECREASING
        return j, _UNKNOWN

    def order2(self, a: int, b: int) -> tuple[int, int]:
        if self.lt(b, a):
            self.swaps += 1
            return b, a
        return a, b

    def median(self, a: int, b: int, c: int) -> int:
        a, b = self.order2(a, b)
        b, c = self.order2(b, c)
        a, b = self.order2(a, b)
        return b

    def reverse_range(self, a: int, b: int) -> None:
        i, j = a, b - 1
        while i < j:
            self.swap(i, j)
            i += 1
            j -= 1
