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
from typing import Any

from services.digests.gosort import go_sort
from services.digests.tarstream import (
    TarEntry,
    TarError,
)
from services.digests.tarwriter import writer_rejection

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
    """A :class:`~services.digests.tarstream.TarSink` computing several TarSums in one pass."""

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
