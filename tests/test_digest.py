"""Digest strings, the streaming verifier, compressed layers and the ``layerlog digest`` CLI."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import lzma
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard

from services.digests import cli as digest_cli
from services.digests.digest import (
    CorruptCompression,
    Digest,
    DigestError,
    InvalidDigest,
    MalformedLayer,
    StreamingVerifier,
    TarSumVersionUnsupported,
    TruncatedLayer,
    UnsupportedCompression,
    compute_digests,
    parse_digest,
)
from tests.tarbuild import END, Header, entry

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "tarsum"
LAYER = DATA / "46af0962ab5afeb5ce6740d4d91652e69206fc991fd5328c1a94d364ad00e457" / "layer.tar"
LAYER_JSON = LAYER.with_name("json")
LAYER_V1 = "tarsum.v1+sha256:41cd5c911333ee394776e432fc5a27cc82dfea313e5feff965e31c0fddd9213d"
LAYER_V0_JSON = "tarsum+sha256:4095cc12fa5fdb1ab2760377e1cd0c4ecdd3e61b4f9b82319d96fcea6c9a41c6"
HEX = {"md5": 32, "sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128}


def hexof(n: int) -> str:
    return ("0123456789abcdef" * 8)[:n]


# -- digest strings ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_parse_raw_digest(algorithm: str) -> None:
    text = f"{algorithm}:{hexof(HEX[algorithm])}"
    parsed = parse_digest(text)
    assert parsed == Digest(algorithm, hexof(HEX[algorithm]))
    assert str(parsed) == text
    assert not parsed.is_tarsum


@pytest.mark.parametrize("version", ["tarsum", "tarsum.v1", "tarsum.dev"])
@pytest.mark.parametrize("cipher", sorted(HEX))
def test_parse_tarsum_label(version: str, cipher: str) -> None:
    text = f"{version}+{cipher}:{hexof(HEX[cipher])}"
    parsed = parse_digest(text)
    assert parsed.algorithm == f"{version}+{cipher}"
    assert str(parsed) == text
    assert parsed.is_tarsum


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("sha256" + hexof(64), "no ':'"),
        (":" + hexof(64), "empty algorithm"),
        ("md5:" + hexof(32), "unsupported digest algorithm 'md5'"),
        ("SHA256:" + hexof(64), "unsupported digest algorithm"),
        ("sha256:" + hexof(63), "64 hex characters, got 63"),
        ("sha256:" + hexof(65), "64 hex characters, got 65"),
        ("sha512:" + hexof(64), "128 hex characters, got 64"),
        ("sha256:" + hexof(63) + "A", "must be lowercase"),
        ("sha256:" + hexof(63) + "g", "non-hex character 'g'"),
        ("sha256:" + hexof(63) + "\u0661", "non-hex character"),  # an Arabic-Indic digit
        (" sha256:" + hexof(64), "unsupported digest algorithm ' sha256'"),
        ("sha256:" + hexof(64) + "\n", "64 hex characters, got 65"),
        ("tarsum:" + hexof(64), "lacks '+<cipher>'"),
        ("tarsum+sha257:" + hexof(64), "unsupported TarSum cipher 'sha257'"),
        ("tarsum.v1+:" + hexof(64), "unsupported TarSum cipher ''"),
        ("tarsum.V1+sha256:" + hexof(64), "not a TarSum version label"),
        ("tarsumx+sha256:" + hexof(64), "not a TarSum version label"),
        ("tarsum.+sha256:" + hexof(64), "not a TarSum version label"),
        ("tarsum.v1+md5:" + hexof(64), "md5 digest must have 32 hex characters"),
        ("tarsum.v9+sha256:abc", "64 hex characters, got 3"),  # malformed beats unsupported
        ("", "no ':'"),
    ],
)
def test_invalid_digests_say_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(InvalidDigest) as raised:
        parse_digest(text)
    assert complaint in str(raised.value)
    assert not isinstance(raised.value, TarSumVersionUnsupported)


@pytest.mark.parametrize("version", ["tarsum.v9", "tarsum.v2", "tarsum.experimental"])
def test_unknown_tarsum_version_is_its_own_error(version: str) -> None:
    with pytest.raises(TarSumVersionUnsupported, match=version.replace(".", r"\.")) as raised:
        parse_digest(f"{version}+sha256:{hexof(64)}")
    assert not isinstance(raised.value, InvalidDigest)
    assert isinstance(raised.value, DigestError)


def test_non_string_digest() -> None:
    with pytest.raises(InvalidDigest):
        parse_digest(b"sha256:" + hexof(64).encode())  # type: ignore[arg-type]


def test_digest_objects_are_validated() -> None:
    with pytest.raises(InvalidDigest):
        Digest("sha256", "abc")
    with pytest.raises(TarSumVersionUnsupported):
        Digest("tarsum.v3+sha256", hexof(64))
    digest = Digest("sha256", hexof(64))
    with pytest.raises(AttributeError):
        digest.hex = "0" * 64  # type: ignore[misc]


# -- the verifier ---------------------------------------------------------------------------


def test_raw_digests_in_one_pass() -> None:
    blob = b"not a tar, and it does not matter for sha" * 1000
    verifier = StreamingVerifier(["sha256", "sha384", "sha512"])
    verifier.update(blob)
    result = verifier.finish()
    assert list(result) == ["sha256", "sha384", "sha512"]
    for name, value in result.items():
        assert value == Digest(name, hashlib.new(name, blob).hexdigest())
    assert verifier.size == len(blob)


def test_tarsum_and_sha256_together_any_chunking() -> None:
    layer = LAYER.read_bytes()
    expected = {
        LAYER_V1.split(":")[0]: LAYER_V1,
        "sha256": f"sha256:{hashlib.sha256(layer).hexdigest()}",
    }
    for chunk in (1, 7, 512, 513, 4096, len(layer)):
        verifier = StreamingVerifier([LAYER_V1.split(":")[0], "sha256"])
        for i in range(0, len(layer), chunk):
            verifier.update(layer[i : i + chunk])
        assert {k: str(v) for k, v in verifier.finish().items()} == expected


def test_extra_payload() -> None:
    verifier = StreamingVerifier(["tarsum+sha256"], extra_payload=LAYER_JSON.read_bytes())
    verifier.update(LAYER.read_bytes())
    assert str(verifier.finish()["tarsum+sha256"]) == LAYER_V0_JSON


def test_caller_may_reuse_its_buffer() -> None:
    layer = LAYER.read_bytes()
    verifier = StreamingVerifier(["tarsum.v1+sha256", "sha256"])
    buffer = bytearray(1000)
    for i in range(0, len(layer), 1000):
        piece = layer[i : i + 1000]
        buffer[: len(piece)] = piece
        verifier.update(memoryview(buffer)[: len(piece)])
        buffer[:] = b"\xee" * len(buffer)  # scribble: nothing may still point at it
    result = verifier.finish()
    assert str(result["tarsum.v1+sha256"]) == LAYER_V1
    assert result["sha256"].hex == hashlib.sha256(layer).hexdigest()


def test_verifier_rejects_bad_algorithms_up_front() -> None:
    with pytest.raises(InvalidDigest):
        StreamingVerifier(["sha256", "md5"])
    with pytest.raises(TarSumVersionUnsupported):
        StreamingVerifier(["tarsum.v9+sha256"])
    with pytest.raises(ValueError):
        StreamingVerifier([])


def test_finish_is_final() -> None:
    verifier = StreamingVerifier(["sha256"])
    verifier.update(b"abc")
    first = verifier.finish()
    assert verifier.finish() == first
    with pytest.raises(ValueError, match="after finish"):
        verifier.update(b"more")


def test_duplicate_algorithms_are_computed_once() -> None:
    verifier = StreamingVerifier({"sha256", "tarsum.v1+sha256"} | {"sha256"})
    verifier.update(LAYER.read_bytes())
    assert set(verifier.finish()) == {"sha256", "tarsum.v1+sha256"}


def test_compute_digests_from_files_and_readers() -> None:
    with open(LAYER, "rb") as handle:
        result = compute_digests(handle, ["tarsum.v1+sha256"], chunk_size=100)
    assert str(result["tarsum.v1+sha256"]) == LAYER_V1

    class ReadOnly:
        def __init__(self, data: bytes) -> None:
            self._stream = io.BytesIO(data)

        def read(self, size: int) -> bytes:
            return self._stream.read(size)

    result = compute_digests(ReadOnly(LAYER.read_bytes()), ["tarsum.v1+sha256"])  # type: ignore[arg-type]
    assert str(result["tarsum.v1+sha256"]) == LAYER_V1


def test_raw_digest_of_a_non_layer_is_no_error() -> None:
    verifier = StreamingVerifier(["sha256"])
    verifier.update(b"\x1f\x8b\x08garbage that is not gzip")
    assert (
        verifier.finish()["sha256"].hex
        == hashlib.sha256(b"\x1f\x8b\x08garbage that is not gzip").hexdigest()
    )


def test_errors_are_sticky() -> None:
    verifier = StreamingVerifier(["tarsum.v1+sha256", "sha256"])
    with pytest.raises(MalformedLayer):
        verifier.update(b"x" * 600)
    with pytest.raises(MalformedLayer):
        verifier.update(LAYER.read_bytes())
    with pytest.raises(MalformedLayer):
        verifier.finish()


# -- compressed layers ---------------------------------------------------------------------


def _verify(blob: bytes, chunk: int | None = None) -> dict[str, str]:
    verifier = StreamingVerifier(["tarsum.v1+sha256", "sha256"])
    step = chunk or max(1, len(blob))
    for i in range(0, len(blob), step):
        verifier.update(blob[i : i + step])
    return {k: str(v) for k, v in verifier.finish().items()}


def _zstd_frames(data: bytes, parts: int, **options: bool) -> bytes:
    size = -(-len(data) // parts)
    return b"".join(
        zstandard.ZstdCompressor(level=3, **options).compress(data[i : i + size])
        for i in range(0, len(data), size)
    )


SKIPPABLE = b"\x5a\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"skip!"

COMPRESSED = {
    "plain": lambda tar: tar,
    "gzip": lambda tar: gzip.compress(tar, 6),
    "gzip members": lambda tar: (
        gzip.compress(tar[:3000]) + gzip.compress(tar[3000:7000]) + gzip.compress(tar[7000:])
    ),
    "gzip level 1 with header fields": lambda tar: _gzip_with_name(tar),
    "zstd": lambda tar: zstandard.ZstdCompressor(level=3).compress(tar),
    "zstd frames": lambda tar: _zstd_frames(tar, 3, write_checksum=True),
    "zstd no content size": lambda tar: _zstd_frames(tar, 1, write_content_size=False),
    "zstd skippable": lambda tar: SKIPPABLE + _zstd_frames(tar, 2) + SKIPPABLE,
    "zstd streamed": lambda tar: _zstd_streamed(tar),
}


def _gzip_with_name(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(
        filename="layer.tar", fileobj=out, mode="wb", compresslevel=1, mtime=7
    ) as gz:
        gz.write(data)
    return out.getvalue()


def _zstd_streamed(data: bytes) -> bytes:
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    return compressor.compress(data[:5000]) + compressor.compress(data[5000:]) + compressor.flush()


@pytest.mark.parametrize("kind", sorted(COMPRESSED))
def test_compressed_layers(kind: str) -> None:
    tar = LAYER.read_bytes()
    blob = COMPRESSED[kind](tar)
    result = _verify(blob)
    # TarSum is over the decompressed tar; the sha256 is over the blob as stored.
    assert result["tarsum.v1+sha256"] == LAYER_V1
    assert result["sha256"] == f"sha256:{hashlib.sha256(blob).hexdigest()}"
    assert _verify(blob, chunk=1) == result
    assert _verify(blob, chunk=333) == result


def _tar_of_zeros(size: int) -> bytes:
    return entry(Header(name=b"zeros", size=size), bytes(size)) + END


def _peak_while_verifying(blob: bytes) -> tuple[int, str]:
    tracemalloc.start()
    try:
        verifier = StreamingVerifier(["tarsum.v1+sha256"])
        for i in range(0, len(blob), 1 << 16):
            verifier.update(blob[i : i + (1 << 16)])
        digest = str(verifier.finish()["tarsum.v1+sha256"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, digest


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_high_ratio_streams_stay_bounded(codec: str) -> None:
    # 96 MiB of zeros compress to a few hundred KiB; the verifier must never hold the whole
    # expansion of a chunk (a 64 KiB zstd chunk of RLE blocks could be gigabytes).
    size = 96 << 20
    tar = _tar_of_zeros(size)
    blob = (
        zlib.compress(tar, 1, wbits=31)
        if codec == "gzip"
        else zstandard.ZstdCompressor().compress(tar)
    )
    assert len(blob) < size // 100
    peak, digest = _peak_while_verifying(blob)
    assert peak < 8 << 20, f"peak {peak} bytes"
    body_sum = hashlib.sha256(
        b"namezerosmode420uid0gid0size%dtypeflag0linknameunamegnamedevmajor0devminor0" % size
        + bytes(size)
    ).hexdigest()
    assert digest == f"tarsum.v1+sha256:{hashlib.sha256(body_sum.encode()).hexdigest()}"


def test_truncated_gzip() -> None:
    blob = gzip.compress(LAYER.read_bytes()[:5000])  # the tar inside has no end marker
    with pytest.raises(TruncatedLayer, match="gzip"):
        _verify(blob[:-10])


def test_corrupt_gzip() -> None:
    blob = bytearray(gzip.compress(LAYER.read_bytes()))
    blob[40] ^= 0xFF
    with pytest.raises(MalformedLayer):
        _verify(bytes(blob))


def test_gzip_checksum_is_checked_while_the_tar_is_open() -> None:
    tar = _tar_of_zeros(100_000)[:-1024]  # no end marker: the gzip trailer is reached
    blob = bytearray(gzip.compress(tar))
    blob[-6] ^= 0x01  # CRC32 in the trailer
    with pytest.raises(CorruptCompression, match="incorrect data check"):
        _verify(bytes(blob))


def test_the_whole_compressed_stream_is_checked() -> None:
    # A bad CRC after the end-of-archive marker fails whatever the chunking (zlib checks the
    # trailer in the same call that returns the last bytes, so "stop at the end marker" would
    # make the verdict depend on chunk sizes).
    blob = gzip.compress(LAYER.read_bytes())
    broken = blob[:-8] + bytes(8)
    for chunk in (1, 100, len(broken)):
        with pytest.raises(CorruptCompression, match="incorrect data check"):
            _verify(broken, chunk)
    with pytest.raises(CorruptCompression):
        _verify(blob + b"trailing junk")


def test_tar_bytes_after_the_end_marker_are_ignored_inside_compression() -> None:
    tar = LAYER.read_bytes() + b"not a header, after the end of the archive" * 30
    assert _verify(gzip.compress(tar))["tarsum.v1+sha256"] == LAYER_V1
    assert _verify(zstandard.ZstdCompressor().compress(tar))["tarsum.v1+sha256"] == LAYER_V1


def test_garbage_between_gzip_members_of_an_unfinished_tar() -> None:
    tar = LAYER.read_bytes()
    blob = gzip.compress(tar[:4096]) + b"\x00\x00junk" + gzip.compress(tar[4096:])
    with pytest.raises(CorruptCompression):
        _verify(blob)


def test_truncated_and_corrupt_zstd() -> None:
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(LAYER.read_bytes()[:5000])
    with pytest.raises(TruncatedLayer, match="zstd"):
        _verify(blob[:-3])
    corrupt = bytearray(blob)
    corrupt[-2] ^= 0xFF  # content checksum
    with pytest.raises(CorruptCompression):
        _verify(bytes(corrupt))
    with pytest.raises(CorruptCompression, match="expected a frame"):
        _verify(blob + b"not a frame")


@pytest.mark.parametrize(
    "blob",
    [lzma.compress(b"x" * 100), b"BZh91AY&SY" + b"\x00" * 100],
    ids=["xz", "bzip2"],
)
def test_unsupported_compression_is_named(blob: bytes) -> None:
    with pytest.raises(UnsupportedCompression):
        _verify(blob)


@pytest.mark.parametrize("size", [1, 2, 3, 9])
def test_tiny_blobs(size: int) -> None:
    with pytest.raises(MalformedLayer):
        _verify(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00"[:size] if size > 2 else b"\x1f\x8b"[:size])


# -- the CLI -------------------------------------------------------------------------------


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="layerlog")
    digest_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["digest", *argv])
    status = args.handler(args)
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_default_sha256(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _cli([str(LAYER)], capsys)
    assert (status, err) == (0, "")
    assert out == f"sha256:{hashlib.sha256(LAYER.read_bytes()).hexdigest()}\n"


def test_cli_tarsum_with_extra_payload(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--algorithm", "tarsum+sha256", "--extra-payload", str(LAYER_JSON), str(LAYER)]
    assert _cli(argv, capsys) == (0, LAYER_V0_JSON + "\n", "")


def test_cli_reads_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest_cli, "_stdin", lambda: io.BytesIO(gzip.compress(LAYER.read_bytes())))
    assert _cli(["--algorithm", "tarsum.v1+sha256", "-"], capsys) == (0, LAYER_V1 + "\n", "")


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["--algorithm", "md5", "LAYER"], 2, "unsupported digest algorithm 'md5'"),
        (["--algorithm", "tarsum.v9+sha256", "LAYER"], 2, "not supported"),
        (["/nonexistent/layer"], 2, "cannot read /nonexistent/layer"),
        (
            ["--algorithm", "tarsum+sha256", "--extra-payload", "/nonexistent", "LAYER"],
            2,
            "extra payload",
        ),
        (["--extra-payload", "JSON", "LAYER"], 2, "only to TarSum"),
        (["--algorithm", "tarsum.v1+sha256", "JSON"], 1, "not a valid tar archive"),
    ],
)
def test_cli_errors(
    argv: list[str], status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [{"LAYER": str(LAYER), "JSON": str(LAYER_JSON)}.get(a, a) for a in argv]
    got_status, out, err = _cli(argv, capsys)
    assert (got_status, out) == (status, "")
    assert err.startswith("layerlog digest: error: ") and err.endswith("\n")
    assert err.count("\n") == 1
    assert message in err


def test_cli_as_a_program(tmp_path: Path) -> None:
    blob = tmp_path / "layer.tar.zst"
    blob.write_bytes(zstandard.ZstdCompressor().compress(LAYER.read_bytes()))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.digests.cli",
            "digest",
            "--algorithm",
            "tarsum.v1+sha256",
            "-",
        ],
        input=blob.read_bytes(),
        capture_output=True,
        cwd=ROOT,
        check=False,
    )
    assert (run.returncode, run.stdout.decode(), run.stderr) == (0, LAYER_V1 + "\n", b"")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.digests.cli",
            "digest",
            "--algorithm",
            "sha1",
            str(blob),
        ],
        capture_output=True,
        cwd=ROOT,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.decode().count("\n") == 1
