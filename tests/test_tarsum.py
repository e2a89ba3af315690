"""TarSum v0/v1/dev against the reference (docker's pkg/tarsum on Go's archive/tar).

Expected values come from three places, never from the code under test:

* tests/data/tarsum/vectors.json and the vectors of moby's own tarsum_test.go, for archives
  rebuilt here byte for byte from the headers those tests list;
* ``spec_tarsum`` below, a plain implementation of the algorithm over header values written
  out by hand in each test (the values Go's archive/tar reports, which is the point of most
  traps: Python's tarfile reports different ones);
* a few values computed by the reference itself (moby pkg/tarsum v28.5.2 built with Go 1.26)
  where an independent computation would mean re-deriving Go's sort or tar writer, marked so.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.digests.digest import (
    InvalidTarHeader,
    LayerLimitExceeded,
    MalformedLayer,
    StreamingVerifier,
    TarSumUndefined,
    TruncatedLayer,
)
from services.digests.tarsum import clean_path, go_sort
from tests.tarbuild import END, GNU, V7, Header, base256, entry, gnu_long, pad, pax, pax_record

DATA = Path(__file__).parent / "data" / "tarsum"


# -- an independent statement of the algorithm ------------------------------------------------


@dataclass
class Spec:
    """One entry as Go's archive/tar reports it, and its logical body."""

    name: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int | None = None  # defaults to len(body)
    mtime: int = 0
    typeflag: bytes = b"0"
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""


def spec_file_sum(item: Spec, version: str, cipher: str) -> str:
    size = len(item.body) if item.size is None else item.size
    fields: list[tuple[bytes, bytes]] = [
        (b"name", item.name),
        (b"mode", b"%d" % item.mode),
        (b"uid", b"%d" % item.uid),
        (b"gid", b"%d" % item.gid),
        (b"size", b"%d" % size),
    ]
    if version == "tarsum":
        fields.append((b"mtime", b"%d" % item.mtime))
    # tarsum_spec.md lists uname and gname as headers, but the reference's encodeHeader writes
    # them with empty values ("compatible with versions before go 1.10"): the code wins.
    fields += [
        (b"typeflag", item.typeflag),
        (b"linkname", item.linkname),
        (b"uname", b""),
        (b"gname", b""),
        (b"devmajor", b"%d" % item.devmajor),
        (b"devminor", b"%d" % item.devminor),
    ]
    if version != "tarsum":
        fields += sorted(item.xattrs.items())
    hasher = hashlib.new(cipher)
    for key, value in fields:
        hasher.update(key + value)
    hasher.update(item.body)
    return hasher.hexdigest()


def spec_tarsum(
    items: list[Spec],
    version: str = "tarsum.v1",
    cipher: str = "sha256",
    extra: bytes | None = None,
    order: list[int] | None = None,
) -> str:
    """Sums sorted by hex, or in ``order`` (archive positions) where a test fixes it."""
    sums = [spec_file_sum(item, version, cipher) for item in items]
    ordered = sorted(sums) if order is None else [sums[i] for i in order]
    final = hashlib.new(cipher)
    if extra is not None:
        final.update(extra)
    for value in ordered:
        final.update(value.encode())
    return f"{version}+{cipher}:{final.hexdigest()}"


def tarsum(data: bytes, algorithm: str = "tarsum.v1+sha256", extra: bytes | None = None) -> str:
    verifier = StreamingVerifier([algorithm], extra)
    verifier.update(data)
    return str(verifier.finish()[algorithm])


def tarsum_bytewise(data: bytes, algorithm: str = "tarsum.v1+sha256") -> str:
    verifier = StreamingVerifier([algorithm])
    for i in range(len(data)):
        verifier.update(data[i : i + 1])
    return str(verifier.finish()[algorithm])


VERSIONS = ["tarsum", "tarsum.v1", "tarsum.dev"]


# -- reference vectors ---------------------------------------------------------------------


def _vectors() -> list[dict[str, str | None]]:
    return json.loads((DATA / "vectors.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: str(v["expected"])[:24])
def test_shared_vectors(vector: dict[str, str | None]) -> None:
    layer = (DATA / str(vector["tar"])).read_bytes()
    extra = (
        None if vector["extra_payload"] is None else (DATA / vector["extra_payload"]).read_bytes()
    )
    algorithm = f"{vector['version']}+sha256"
    assert tarsum(layer, algorithm, extra) == vector["expected"]


def test_shared_vector_byte_at_a_time() -> None:
    vector = _vectors()[2]
    layer = (DATA / str(vector["tar"])).read_bytes()
    extra = (DATA / str(vector["extra_payload"])).read_bytes()
    verifier = StreamingVerifier(["tarsum.v1+sha256"], extra)
    for i in range(len(layer)):
        verifier.update(layer[i : i + 1])
    assert str(verifier.finish()["tarsum.v1+sha256"]) == vector["expected"]


# moby pkg/tarsum/tarsum_test.go: sizedTar(1 file of 1 MiB zeros) written by Go's tar.Writer
# (Name "/testdata0", Mode 0755, Typeflag '0', zero ModTime, which the writer stores as 0).
MOBY_ZEROS = {
    "md5": "tarsum+md5:3a6cdb475d90459ac0d3280703d17be2",
    "sha1": "tarsum+sha1:14b5e0d12a0c50a4281e86e92153fa06d55d00c6",
    "sha224": "tarsum+sha224:dd8925b7a4c71b13f3a68a0f9428a757c76b93752c398f272a9062d5",
    "sha256": "tarsum+sha256:75258b2c5dcd9adfe24ce71eeca5fc5019c7e669912f15703ede92b1a60cb11f",
    "sha384": "tarsum+sha384:e39e82f40005134bed13fb632d1a5f2aa4675c9ddb4a136fbcec202797e68d2f6"
    "35e1200dee2e3a8d7f69d54d3f2fd27",
    "sha512": "tarsum+sha512:7c56de40b2d1ed3863ff25d83b59cdc8f53e67d1c01c3ee8f201f8e4dec3107da"
    "976d0c0ec9109c962a152b32699fe329b2dab13966020e400c32878a0761a7e",
}


@pytest.mark.parametrize("cipher", sorted(MOBY_ZEROS))
def test_moby_ciphers(cipher: str) -> None:
    layer = entry(Header(name=b"/testdata0", mode=0o755, size=1 << 20), bytes(1 << 20)) + END
    assert tarsum(layer, f"tarsum+{cipher}") == MOBY_ZEROS[cipher]
    # The same value from the independent statement of the algorithm.
    spec = Spec(name=b"/testdata0", mode=0o755, body=bytes(1 << 20))
    assert spec_tarsum([spec], "tarsum", cipher) == MOBY_ZEROS[cipher]


def _moby_iteration_layer(name: bytes, xattrs: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    named = name != b"file.txt"
    header = Header(
        name=name,
        mode=0,
        uid=1000 if named else 0,
        gid=1000 if named else 0,
        uname=b"slartibartfast" if named else b"",
        gname=b"users" if named else b"",
        size=len(body),
    )
    return (pax(xattrs) if xattrs else b"") + entry(header, body) + END


# moby tarsum_test.go TestIteration: headers rendered by Go's tar.Writer, then summed.
MOBY_ITERATION = [
    (
        "tarsum",
        b"file.txt",
        [],
        b"",
        "626c4a2e9a467d65c33ae81f7f3dedd4de8ccaee72af73223c4bc4718cbc7bbd",
    ),
    (
        "tarsum.dev",
        b"file.txt",
        [],
        b"",
        "6ffd43a1573a9913325b4918e124ee982a99c0f3cba90fc032a65f5e20bdd465",
    ),
    (
        "tarsum.dev",
        b"another.txt",
        [],
        b"test",
        "862964db95e0fa7e42836ae4caab3576ab1df8d275720a45bdd01a5a3730cc63",
    ),
    (
        "tarsum.dev",
        b"xattrs.txt",
        [(b"SCHILY.xattr.user.key1", b"value1"), (b"SCHILY.xattr.user.key2", b"value2")],
        b"test",
        "4b1ba03544b49d96a32bacc77f8113220bd2f6a77e7e6d1e7b33cd87117d88e7",
    ),
    (
        "tarsum.dev",
        b"xattrs.txt",
        [(b"SCHILY.xattr.user.KEY1", b"value1"), (b"SCHILY.xattr.user.key2", b"value2")],
        b"test",
        "410b602c898bd4e82e800050f89848fc2cf20fd52aa59c1ce29df76b878b84a6",
    ),
    (
        "tarsum",
        b"xattrs.txt",
        [(b"SCHILY.xattr.user.NOT", b"CALCULATED")],
        b"test",
        "b1f97eab73abd7593c245e51070f9fbdb1824c6b00a0b7a3d7f0015cd05e9e86",
    ),
]


@pytest.mark.parametrize(("version", "name", "xattrs", "body", "expected"), MOBY_ITERATION)
def test_moby_iteration_vectors(
    version: str, name: bytes, xattrs: list[tuple[bytes, bytes]], body: bytes, expected: str
) -> None:
    layer = _moby_iteration_layer(name, xattrs, body)
    assert tarsum(layer, f"{version}+sha256") == f"{version}+sha256:{expected}"
    named = name != b"file.txt"
    spec = Spec(
        name=name,
        mode=0,
        uid=1000 if named else 0,
        gid=1000 if named else 0,
        xattrs={k.removeprefix(b"SCHILY.xattr."): v for k, v in xattrs},
        body=body,
    )
    assert spec_tarsum([spec], version) == f"{version}+sha256:{expected}"


# -- traps: header values are what Go reports -----------------------------------------------


def test_directory_keeps_its_trailing_slash() -> None:
    layer = entry(Header(name=b"etc/", mode=0o755, typeflag=b"5")) + END
    # Python's tarfile strips the slash; Go (and so TarSum) keeps it.
    assert tarfile.open(fileobj=io.BytesIO(layer)).getnames() == ["etc"]
    expected = spec_tarsum([Spec(name=b"etc/", mode=0o755, typeflag=b"5")])
    assert tarsum(layer) == expected
    assert expected != spec_tarsum([Spec(name=b"etc", mode=0o755, typeflag=b"5")])


def test_names_are_not_normalised() -> None:
    layer = entry(Header(name=b"./etc/hosts", size=3), b"abc") + END
    assert tarsum(layer) == spec_tarsum([Spec(name=b"./etc/hosts", body=b"abc")])


def test_mode_is_the_raw_field_in_decimal() -> None:
    # Old GNU tar and docker's own layers store S_IFDIR etc. in the mode field.
    layer = entry(Header(name=b"dir/", mode=0o40755, typeflag=b"5")) + END
    assert tarsum(layer, "tarsum+sha256") == spec_tarsum(
        [Spec(name=b"dir/", mode=16877, typeflag=b"5")], "tarsum"
    )


def test_uname_and_gname_do_not_count() -> None:
    def layer(owner: bytes) -> bytes:
        return entry(Header(name=b"f", uname=owner, gname=owner, size=1), b"x") + END

    assert tarsum(layer(b"root")) == tarsum(layer(b"nobody"))
    assert tarsum(layer(b"root")) == spec_tarsum([Spec(name=b"f", body=b"x")])


def test_ustar_prefix_is_joined() -> None:
    prefix, name = b"p" * 120, b"n" * 90
    layer = entry(Header(name=name, prefix=prefix, size=1), b"x") + END
    assert tarsum(layer) == spec_tarsum([Spec(name=prefix + b"/" + name, body=b"x")])


def test_pax_path_and_gnu_long_names() -> None:
    long_path = b"d/" * 100 + b"file"
    long_link = b"t/" * 80 + b"target"
    layer = (
        pax([(b"path", long_path)])
        + entry(Header(name=b"truncated", size=2), b"hi")
        + gnu_long(b"L", b"g/" * 70 + b"gnu")
        + gnu_long(b"K", long_link)
        + entry(Header(name=b"short", typeflag=b"2", magic=GNU))
        + END
    )
    expected = spec_tarsum(
        [
            Spec(name=long_path, body=b"hi"),
            Spec(name=b"g/" * 70 + b"gnu", typeflag=b"2", linkname=long_link),
        ]
    )
    assert tarsum(layer) == expected


def test_gnu_long_name_wins_over_pax_path() -> None:
    layer = (
        pax([(b"path", b"from-pax")])
        + gnu_long(b"L", b"from-gnu")
        + entry(Header(name=b"from-header"))
        + END
    )
    assert tarsum(layer) == spec_tarsum([Spec(name=b"from-gnu")])


def test_hard_link_size_is_hashed_but_has_no_body() -> None:
    # Go's reader treats links, devices, directories and FIFOs as header-only: the size field
    # is reported as written, and the next header follows at once.
    layer = (
        entry(Header(name=b"a", size=3), b"abc")
        + Header(name=b"b", typeflag=b"1", linkname=b"a", size=123).encode()
        + entry(Header(name=b"c", size=1), b"z")
        + END
    )
    expected = spec_tarsum(
        [
            Spec(name=b"a", body=b"abc"),
            Spec(name=b"b", typeflag=b"1", linkname=b"a", size=123),
            Spec(name=b"c", body=b"z"),
        ]
    )
    assert tarsum(layer) == expected


def test_symlinks_devices_and_fifos() -> None:
    layer = (
        entry(Header(name=b"link", typeflag=b"2", linkname=b"../target", mode=0o777))
        + entry(Header(name=b"dev/null", typeflag=b"3", devmajor=1, devminor=3, mode=0o666))
        + entry(Header(name=b"dev/sda", typeflag=b"4", devmajor=8, devminor=0, mode=0o660))
        + entry(Header(name=b"run/fifo", typeflag=b"6", mode=0o600))
        + END
    )
    expected = spec_tarsum(
        [
            Spec(name=b"link", typeflag=b"2", linkname=b"../target", mode=0o777),
            Spec(name=b"dev/null", typeflag=b"3", devmajor=1, devminor=3, mode=0o666),
            Spec(name=b"dev/sda", typeflag=b"4", devmajor=8, mode=0o660),
            Spec(name=b"run/fifo", typeflag=b"6", mode=0o600),
        ]
    )
    assert tarsum(layer) == expected


def test_v7_nul_typeflag_becomes_regular_or_directory() -> None:
    # The '\0' typeflag is reported as '0', or as '5' (header only) when the name ends in '/'.
    layer = (
        entry(Header(name=b"file", typeflag=b"\x00", size=2, magic=V7), b"ok")
        + Header(name=b"dir/", typeflag=b"\x00", size=7, magic=V7).encode()
        + END
    )
    expected = spec_tarsum(
        [Spec(name=b"file", body=b"ok"), Spec(name=b"dir/", typeflag=b"5", size=7)]
    )
    assert tarsum(layer) == expected


def test_v7_header_has_no_owner_names_or_devices() -> None:
    header = Header(name=b"f", typeflag=b"3", magic=V7, devmajor=4, devminor=5)
    layer = entry(header) + END
    # V7 has no device fields: Go reports 0 whatever the bytes there hold.
    assert tarsum(layer) == spec_tarsum([Spec(name=b"f", typeflag=b"3")])


@pytest.mark.parametrize("version", VERSIONS)
def test_xattrs_count_from_v1_on_sorted_and_as_bytes(version: str) -> None:
    records = [
        (b"SCHILY.xattr.user.z", b"last"),
        (b"SCHILY.xattr.security.capability", b"\x01\x00\x00\x02\xff"),  # not UTF-8
        (b"SCHILY.xattr.user.\xe9t\xe9", b"latin-1 name"),  # not UTF-8 either
        (b"SCHILY.xattr.user.empty", b""),  # kept: v1 reads PAXRecords, where it is present
        (b"comment", b"not an xattr"),
    ]
    layer = pax(records) + entry(Header(name=b"f", size=1), b"x") + END
    xattrs = {
        b"user.z": b"last",
        b"security.capability": b"\x01\x00\x00\x02\xff",
        b"user.\xe9t\xe9": b"latin-1 name",
        b"user.empty": b"",
    }
    assert tarsum(layer, f"{version}+sha256") == spec_tarsum(
        [Spec(name=b"f", body=b"x", xattrs=xattrs)], version
    )


def test_pax_overrides_numbers_and_times() -> None:
    layer = (
        pax([(b"uid", b"4000000"), (b"gid", b"+12"), (b"mtime", b"1700000000.75"), (b"size", b"5")])
        + entry(Header(name=b"a", size=0o777), b"12345")
        + pax([(b"mtime", b"-1.5")])
        + entry(Header(name=b"b"))
        + END
    )
    items = [
        Spec(name=b"a", uid=4000000, gid=12, mtime=1700000000, body=b"12345"),
        # Go's time.Unix(-1, -5e8).Unix() is -2: seconds round toward minus infinity.
        Spec(name=b"b", mtime=-2),
    ]
    assert tarsum(layer, "tarsum+sha256") == spec_tarsum(items, "tarsum")


def test_base256_numbers() -> None:
    header = Header(
        name=b"big",
        uid=base256(1 << 40, 8),
        gid=base256(7, 8),
        mtime=base256(-1234567, 12),
        size=base256(3, 12),
        magic=GNU,
    )
    layer = entry(header, b"abc") + END
    expected = Spec(name=b"big", uid=1 << 40, gid=7, mtime=-1234567, body=b"abc")
    assert tarsum(layer, "tarsum+sha256") == spec_tarsum([expected], "tarsum")


def test_octal_fields_with_spaces_and_nuls() -> None:
    header = Header(
        name=b"f", mode=b" 644 \x00\x00\x00", uid=b"\x00" * 8, size=b"  3\x00" + b" " * 8
    )
    layer = entry(header, b"abc") + END
    assert tarsum(layer) == spec_tarsum([Spec(name=b"f", mode=0o644, body=b"abc")])


def test_signed_checksum_is_accepted() -> None:
    header = Header(name=b"f\xe9", checksum="signed", magic=GNU)
    layer = entry(header) + END
    assert tarsum(layer) == spec_tarsum([Spec(name=b"f\xe9")])


@pytest.mark.parametrize("version", VERSIONS)
def test_global_header_is_an_entry(version: str) -> None:
    # Go returns a 'g' record as an entry with only a name, xattrs and PAX records; the zero
    # time.Time makes its v0 mtime -62135596800.
    layer = (
        pax([(b"comment", b"global"), (b"SCHILY.xattr.user.g", b"1")], typeflag=b"g", name=b"gh")
        + entry(Header(name=b"f", size=1), b"x")
        + END
    )
    items = [
        Spec(name=b"gh", mode=0, mtime=-62135596800, typeflag=b"g", xattrs={b"user.g": b"1"}),
        Spec(name=b"f", body=b"x"),
    ]
    assert tarsum(layer, f"{version}+sha256") == spec_tarsum(items, version)


def test_global_header_does_not_apply_to_later_entries() -> None:
    layer = pax([(b"uid", b"77")], typeflag=b"g", name=b"g") + entry(Header(name=b"f")) + END
    items = [Spec(name=b"g", mode=0, typeflag=b"g", mtime=-62135596800), Spec(name=b"f")]
    assert tarsum(layer, "tarsum+sha256") == spec_tarsum(items, "tarsum")


def test_later_pax_header_replaces_earlier_one() -> None:
    layer = (
        pax([(b"uid", b"5"), (b"SCHILY.xattr.user.a", b"1")])
        + pax([(b"gid", b"6")])
        + entry(Header(name=b"f"))
        + END
    )
    assert tarsum(layer) == spec_tarsum([Spec(name=b"f", gid=6)])


def _old_gnu_sparse(name: bytes, real_size: int, fragments: list[tuple[int, bytes]]) -> bytes:
    """A GNU 'S' entry: 4 map entries in the header, the rest in extension blocks."""
    area = [(offset, len(data)) for offset, data in fragments]

    def pack(entries: list[tuple[int, int]]) -> bytes:
        return b"".join(b"%011o\x00%011o\x00" % (off, length) for off, length in entries)

    head, rest = area[:4], area[4:]
    extensions = [rest[i : i + 21] for i in range(0, len(rest), 21)]
    extra = {
        386: pack(head),
        482: b"\x01" if extensions else b"\x00",
        483: b"%011o\x00" % real_size,
    }
    physical = b"".join(data for _, data in fragments)
    header = Header(name=name, typeflag=b"S", size=len(physical), magic=GNU, extra=extra)
    blocks = b""
    for i, chunk in enumerate(extensions):
        block = bytearray(512)
        block[: 24 * len(chunk)] = pack(chunk)
        block[504] = 1 if i + 1 < len(extensions) else 0
        blocks += bytes(block)
    return header.encode() + blocks + pad(physical)


def _logical(real_size: int, fragments: list[tuple[int, bytes]]) -> bytes:
    content = bytearray(real_size)
    for offset, data in fragments:
        content[offset : offset + len(data)] = data
    return bytes(content)


def test_old_gnu_sparse_file_with_extension_blocks() -> None:
    fragments = [(i * 4096 + 100, b"%03d" % i * 10) for i in range(30)]  # > 4 + 21 entries
    real_size = 40 * 4096
    layer = _old_gnu_sparse(b"sparse.img", real_size, fragments) + entry(Header(name=b"z")) + END
    items = [
        Spec(name=b"sparse.img", typeflag=b"S", body=_logical(real_size, fragments)),
        Spec(name=b"z"),
    ]
    assert tarsum(layer) == spec_tarsum(items)
    assert tarsum_bytewise(layer) == spec_tarsum(items)


def test_pax_sparse_1_0_file() -> None:
    fragments = [(0, b"head"), (10_000, b"middle" * 100), (50_000, b"tail")]
    real_size = 60_000
    sparse_map = b"3\n" + b"".join(b"%d\n%d\n" % (o, len(d)) for o, d in fragments)
    physical = pad(sparse_map) + b"".join(d for _, d in fragments)
    records = [
        (b"GNU.sparse.major", b"1"),
        (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", b"real/name.db"),
        (b"GNU.sparse.realsize", b"%d" % real_size),
    ]
    header = Header(name=b"real/GNUSparseFile.0/name.db", size=len(physical))
    layer = pax(records) + entry(header, physical) + END
    expected = spec_tarsum([Spec(name=b"real/name.db", body=_logical(real_size, fragments))])
    assert tarsum(layer) == expected
    assert tarsum_bytewise(layer) == expected


def test_pax_sparse_0_1_file() -> None:
    fragments = [(5, b"abc"), (4000, b"xyz")]
    records = [
        (b"GNU.sparse.size", b"5000"),
        (b"GNU.sparse.numblocks", b"2"),
        (b"GNU.sparse.map", b"5,3,4000,3"),
        (b"GNU.sparse.name", b"f"),
    ]
    layer = pax(records) + entry(Header(name=b"stored", size=6), b"abcxyz") + END
    assert tarsum(layer) == spec_tarsum([Spec(name=b"f", body=_logical(5000, fragments))])


def test_sparse_map_must_match_the_stored_data() -> None:
    records = [
        (b"GNU.sparse.size", b"100"),
        (b"GNU.sparse.numblocks", b"1"),
        (b"GNU.sparse.map", b"0,10"),
    ]
    layer = pax(records) + entry(Header(name=b"f", size=4), b"abcd") + END
    with pytest.raises(InvalidTarHeader, match="sparse"):
        tarsum(layer)


# -- ordering ----------------------------------------------------------------------------


def test_same_path_keeps_archive_order() -> None:
    # Later entries clobber earlier ones on extraction, so the reference keeps their order
    # instead of sorting by sum; swapping the two changes the TarSum.
    first = entry(Header(name=b"etc/passwd", size=3), b"old")
    second = entry(Header(name=b"./etc/passwd", size=3), b"new")  # same path once cleaned
    items = [Spec(name=b"etc/passwd", body=b"old"), Spec(name=b"./etc/passwd", body=b"new")]
    assert tarsum(first + second + END) == spec_tarsum(items, order=[0, 1])
    assert tarsum(second + first + END) == spec_tarsum(items, order=[1, 0])
    assert tarsum(first + second + END) != tarsum(second + first + END)


def _duplicate_heavy() -> bytes:
    parts = []
    for i in range(16):
        if i in (1, 6, 11, 14):
            name, body = b"etc/passwd", b"copy %d 0\n" % i
        else:
            name, body = b"usr/lib/f%02d" % i, b"body %d 0\n" % i
        parts.append(entry(Header(name=name, size=len(body), mtime=1_600_000_000), body))
    return b"".join(parts) + END


def test_duplicate_paths_follow_gos_sort() -> None:
    # With repeated paths the reference's comparator (position among same-path entries, sum
    # otherwise) is not a total order, so the result is whatever Go's sort.Sort makes of it.
    # Expected values computed by the reference (moby pkg/tarsum v28.5.2, Go 1.26).
    layer = _duplicate_heavy()
    assert tarsum(layer, "tarsum+sha256") == (
        "tarsum+sha256:90beef085e9ccf3a6ff3d03730b4b93ebaa81ef053ea4b99f635e76ca15a8115"
    )
    assert tarsum(layer, "tarsum.v1+sha256") == (
        "tarsum.v1+sha256:86f6fa4748573ecfd8407b9e7ebef950558cf2a777126f9f3d798cdabd5d6952"
    )
    # An ordinary comparison sort with the same comparator gets a different answer.
    items = []
    for pos, member in enumerate(tarfile.open(fileobj=io.BytesIO(layer))):
        body = b"copy %d 0\n" % pos if member.name == "etc/passwd" else b"body %d 0\n" % pos
        spec = Spec(name=member.name.encode(), mtime=1_600_000_000, body=body)
        items.append((spec_file_sum(spec, "tarsum", "sha256"), member.name, pos))

    def compare(a: tuple[str, str, int], b: tuple[str, str, int]) -> int:
        if a[1] == b[1]:
            return -1 if a[2] < b[2] else 1
        return -1 if a[0] < b[0] else 1

    naive = sorted(items, key=functools.cmp_to_key(compare))
    final = hashlib.sha256(b"".join(s.encode() for s, _, _ in naive)).hexdigest()
    assert f"tarsum+sha256:{final}" != tarsum(layer, "tarsum+sha256")


def test_go_sort_is_a_sort_for_orders() -> None:
    rng = random.Random(7)
    for n in (0, 1, 2, 12, 13, 49, 50, 51, 200, 1000):
        data = [rng.randrange(50) for _ in range(n)]
        expected = sorted(data)
        go_sort(data, lambda a, b: a < b)
        assert data == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=-5, max_value=5), max_size=300))
def test_go_sort_property(values: list[int]) -> None:
    data = list(values)
    go_sort(data, lambda a, b: a < b)
    assert data == sorted(values)


def test_go_sort_small_inputs_are_insertion_sort() -> None:
    # Up to 12 elements Go runs a plain insertion sort, so even a cyclic comparator has one
    # answer: rock-paper-scissors inserted in this order.
    beats = {("paper", "rock"), ("scissors", "paper"), ("rock", "scissors")}
    data = ["rock", "paper", "scissors"]
    go_sort(data, lambda a, b: (a, b) in beats)
    # i=1: paper < rock -> [paper, rock, scissors]; i=2: scissors < rock? no -> stop.
    assert data == ["paper", "rock", "scissors"]


@pytest.mark.parametrize(
    ("name", "key"),
    [
        (b"a", b"a"),
        (b"a/", b"a"),
        (b"./a", b"a"),
        (b"/a", b"a"),
        (b"a//b", b"a/b"),
        (b"a/./b/", b"a/b"),
        (b"a/../b", b"b"),
        (b"../../x", b"x"),
        (b".", b"."),
        (b"", b"."),
        (b"/", b"."),
        (b".hidden", b".hidden"),
        (b"d/.x", b"d/.x"),
    ],
)
def test_clean_path_matches_go_path_join(name: bytes, key: bytes) -> None:
    assert clean_path(name) == key


# -- archive boundaries ------------------------------------------------------------------


def test_empty_archive_and_empty_stream() -> None:
    empty = hashlib.sha256().hexdigest()
    assert tarsum(END) == f"tarsum.v1+sha256:{empty}"
    assert tarsum(b"") == f"tarsum.v1+sha256:{empty}"
    assert tarsum(bytes(512)) == f"tarsum.v1+sha256:{empty}"


def test_extra_payload_is_hashed_first() -> None:
    layer = entry(Header(name=b"f", size=1), b"x") + END
    items = [Spec(name=b"f", body=b"x")]
    assert tarsum(layer, extra=b"{}") == spec_tarsum(items, extra=b"{}")
    assert tarsum(layer, extra=b"") == spec_tarsum(items)  # empty payload hashes nothing


def test_missing_end_marker_is_accepted_like_the_reference() -> None:
    # The issue says a truncated stream is an error; Go's reader (and so the reference) ends
    # the archive at EOF on a block boundary or inside a body's padding. The reference wins:
    # rejecting would refuse layers other registries accept.
    body = entry(Header(name=b"f", size=3), b"abc")
    expected = spec_tarsum([Spec(name=b"f", body=b"abc")])
    assert tarsum(body) == expected
    assert tarsum(body[:515]) == expected  # cut inside the padding
    assert tarsum(body + bytes(512)) == expected  # a single zero block


def test_bytes_after_the_end_marker_are_ignored() -> None:
    layer = entry(Header(name=b"f", size=3), b"abc") + END
    assert tarsum(layer + b"garbage that is not a header" * 40) == tarsum(layer)


# -- what the reference refuses ------------------------------------------------------------


def test_regular_file_named_like_a_directory_has_no_tarsum() -> None:
    # The reference copies each header through Go's tar.Writer, which refuses a regular file
    # whose name ends in '/' ("filename may not have trailing slash"), so its TarSum fails.
    layer = entry(Header(name=b"dir/", typeflag=b"0")) + END
    with pytest.raises(TarSumUndefined, match="trailing slash"):
        tarsum(layer)


def test_header_that_fits_no_format_has_no_tarsum() -> None:
    # Read as GNU format (from the GNU magic), but a uid of 2**60 fits neither GNU's 8-byte
    # base-256 field as Go writes it nor USTAR; the writer only offers PAX, which the header's
    # GNU format excludes. Verified with the reference: "Format specifies GNU".
    layer = entry(Header(name=b"f", uid=base256(1 << 60, 8), magic=GNU)) + END
    with pytest.raises(TarSumUndefined):
        tarsum(layer)


def test_nondeterministic_global_header_has_no_tarsum() -> None:
    # mergePAX stops at the first bad value in Go's random map order, so whether the global
    # header's path applies varies from run to run in the reference.
    layer = pax([(b"path", b"elsewhere"), (b"uid", b"bad")], typeflag=b"g") + END
    with pytest.raises(TarSumUndefined, match="map iteration"):
        tarsum(layer)


# -- malformed input -----------------------------------------------------------------------


MALFORMED = {
    "bad checksum": (entry(Header(name=b"f", checksum=b"0000001\x00")) + END, InvalidTarHeader),
    "garbage": (b"this is not a tar archive at all " * 40, InvalidTarHeader),
    "random bytes": (random.Random(1).randbytes(4096), InvalidTarHeader),
    "non-octal size": (
        entry(Header(name=b"f", size=b"12x4567\x00abc\x00")) + END,
        InvalidTarHeader,
    ),
    "zero block then header": (bytes(512) + entry(Header(name=b"f")), InvalidTarHeader),
    "truncated header": (entry(Header(name=b"f"))[:300], TruncatedLayer),
    "truncated body": (entry(Header(name=b"f", size=2000), b"x" * 2000)[:1500], TruncatedLayer),
    "truncated pax record": (pax([(b"path", b"p" * 600)])[:700], TruncatedLayer),
    "negative size": (entry(Header(name=b"f", size=base256(-5, 12))) + END, InvalidTarHeader),
    "pax length too short": (
        entry(Header(name=b"P", typeflag=b"x", size=12), b"3 path=abc\n\n") + END,
        InvalidTarHeader,
    ),
    "pax without equals": (
        entry(Header(name=b"P", typeflag=b"x", size=6), b"6 x:y\n") + END,
        InvalidTarHeader,
    ),
    "pax path with NUL": (
        pax([(b"path", b"a\x00b")]) + entry(Header(name=b"f")) + END,
        InvalidTarHeader,
    ),
    "pax bad uid": (pax([(b"uid", b"12_000")]) + entry(Header(name=b"f")) + END, InvalidTarHeader),
    "pax bad mtime": (
        pax([(b"mtime", b"1.2.3")]) + entry(Header(name=b"f")) + END,
        InvalidTarHeader,
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_is_a_specific_error(case: str) -> None:
    data, error = MALFORMED[case]
    with pytest.raises(error) as raised:
        tarsum(data)
    assert isinstance(raised.value, MalformedLayer)
    assert "tar" in str(raised.value)
    with pytest.raises(error):
        tarsum_bytewise(data)


def test_oversized_pax_record_fails_before_it_is_read() -> None:
    # Go refuses special records over 1 MiB; the size field alone decides, so no buffer grows.
    header = Header(name=b"P", typeflag=b"x", size=(1 << 20) + 1).encode()
    verifier = StreamingVerifier(["tarsum.v1+sha256"])
    with pytest.raises(LayerLimitExceeded, match="exceeds"):
        verifier.update(header + bytes(20))


def test_oversized_gnu_long_name_fails() -> None:
    header = Header(name=b"././@LongLink", typeflag=b"L", size=2 << 20, magic=GNU).encode()
    with pytest.raises(LayerLimitExceeded):
        tarsum(header)


def test_pax_record_of_exactly_one_mebibyte_is_fine() -> None:
    value_len = (1 << 20) - len(b"1048576 path=\n")
    record = pax_record(b"path", b"p" * value_len)
    assert len(record) == 1 << 20
    layer = entry(Header(name=b"P", typeflag=b"x", size=len(record)), record)
    layer += entry(Header(name=b"f")) + END
    assert tarsum(layer) == spec_tarsum([Spec(name=b"p" * value_len)])


# -- streaming -----------------------------------------------------------------------------


def _everything() -> tuple[bytes, list[Spec]]:
    """An archive with one of each trap, and what Go reports for it."""
    long_path = b"x/" * 80 + b"long"
    layer = (
        entry(Header(name=b"./", typeflag=b"5", mode=0o40755))
        + entry(Header(name=b"etc/", typeflag=b"5", mode=0o755))
        + entry(Header(name=b"etc/hosts", size=600, uname=b"root"), b"h" * 600)
        + Header(name=b"etc/hosts.lnk", typeflag=b"1", linkname=b"etc/hosts", size=600).encode()
        + pax([(b"path", long_path), (b"SCHILY.xattr.user.k", b"\xff\x00v")])
        + entry(Header(name=b"short", size=1000), bytes(range(256)) * 3 + b"e" * 232)
        + gnu_long(b"L", b"gnu/" * 40)
        + entry(Header(name=b"gnu-short", typeflag=b"2", linkname=b"tgt", magic=GNU))
        + entry(Header(name=b"v7", typeflag=b"\x00", size=1, magic=V7), b"7")
        + entry(Header(name=b"uid", uid=base256(1 << 30, 8), magic=GNU))
        + END
    )
    items = [
        Spec(name=b"./", typeflag=b"5", mode=0o40755),
        Spec(name=b"etc/", typeflag=b"5", mode=0o755),
        Spec(name=b"etc/hosts", body=b"h" * 600),
        Spec(name=b"etc/hosts.lnk", typeflag=b"1", linkname=b"etc/hosts", size=600),
        Spec(
            name=long_path,
            xattrs={b"user.k": b"\xff\x00v"},
            body=bytes(range(256)) * 3 + b"e" * 232,
        ),
        Spec(name=b"gnu/" * 40, typeflag=b"2", linkname=b"tgt"),
        Spec(name=b"v7", body=b"7"),
        Spec(name=b"uid", uid=1 << 30),
    ]
    return layer, items


def test_all_traps_together_any_chunking() -> None:
    layer, items = _everything()
    expected = spec_tarsum(items)
    assert tarsum(layer) == expected
    assert tarsum_bytewise(layer) == expected


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40))
def test_chunk_boundaries_do_not_matter(sizes: list[int]) -> None:
    layer, items = _everything()
    verifier = StreamingVerifier(["tarsum+sha256", "tarsum.v1+sha256"])
    pos = 0
    while pos < len(layer):
        for size in sizes:
            verifier.update(memoryview(layer)[pos : pos + size])
            pos += size
    result = verifier.finish()
    assert str(result["tarsum.v1+sha256"]) == spec_tarsum(items)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(alphabet="abcXYZ019-_.", min_size=1, max_size=30),
            st.binary(max_size=1500),
            st.integers(min_value=0, max_value=0o7777),
        ),
        max_size=12,
        unique_by=lambda t: t[0],
    )
)
def test_tarfile_written_archives_match_the_spec(files: list[tuple[str, bytes, int]]) -> None:
    # For plain names Python's tarfile writes what Go then reads back unchanged.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, body, mode in files:
            info = tarfile.TarInfo("f" + name)
            info.size, info.mode, info.mtime = len(body), mode, 1_000_000
            archive.addfile(info, io.BytesIO(body))
    items = [Spec(name=b"f" + n.encode(), mode=m, mtime=1_000_000, body=b) for n, b, m in files]
    for version in VERSIONS:
        assert tarsum(buffer.getvalue(), f"{version}+sha256") == spec_tarsum(items, version)
