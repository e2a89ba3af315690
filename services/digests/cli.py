"""``layerlog digest``: print a blob's digest (sha256/384/512) or a layer's TarSum.

Exit status: 0 with the digest on stdout; 2 for a bad algorithm or an unreadable input or
extra-payload file; 1 when the input is read but is not a layer a TarSum can be computed for
(the data is wrong rather than the invocation). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, BinaryIO

from services.digests.digest import (
    RAW_ALGORITHMS,
    DigestError,
    MalformedLayer,
    compute_digests,
    parse_algorithm,
)

EXIT_OK = 0
EXIT_BAD_LAYER = 1
EXIT_USAGE = 2


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``digest`` subcommand to ``subparsers`` (from ArgumentParser.add_subparsers()).

    The handler is the ``handler`` default: ``args.handler(args)`` returns the exit status.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "digest",
        help="print the digest or TarSum of a blob",
        description=(
            "Print the digest of a blob: sha256, sha384 or sha512 over its bytes, or a TarSum "
            "(tarsum+CIPHER, tarsum.v1+CIPHER, tarsum.dev+CIPHER) over the files of the layer "
            "it holds (plain, gzip or zstd tar). Reads stdin for '-'."
        ),
    )
    parser.add_argument(
        "--algorithm",
        default="sha256",
        metavar="ALG",
        help="sha256 (default), sha384, sha512, or a TarSum label such as tarsum.v1+sha256",
    )
    parser.add_argument(
        "--extra-payload",
        metavar="FILE",
        help="bytes hashed before the file sums (TarSum only; the image JSON in old docker)",
    )
    parser.add_argument("path", metavar="PATH|-", help="the blob to digest, or - for stdin")
    parser.set_defaults(handler=run)
    return parser


def _fail(status: int, message: str) -> int:
    one_line = " ".join(str(message).split())
    print(f"layerlog digest: error: {one_line}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    """Handler for ``layerlog digest``; returns the exit status."""
    try:
        algorithm = parse_algorithm(args.algorithm)
    except DigestError as error:
        return _fail(EXIT_USAGE, str(error))
    extra = None
    if args.extra_payload is not None:
        if algorithm in RAW_ALGORITHMS:
            return _fail(EXIT_USAGE, "--extra-payload applies only to TarSum algorithms")
        try:
            with open(args.extra_payload, "rb") as handle:
                extra = handle.read()
        except OSError as error:
            return _fail(EXIT_USAGE, f"cannot read extra payload {args.extra_payload}: {error}")
    try:
        if args.path == "-":
            digests = compute_digests(_stdin(), [algorithm], extra)
        else:
            with open(args.path, "rb") as handle:
                digests = compute_digests(handle, [algorithm], extra)
    except MalformedLayer as error:
        return _fail(EXIT_BAD_LAYER, f"{args.path}: {error}")
    except OSError as error:
        return _fail(EXIT_USAGE, f"cannot read {args.path}: {error}")
    sys.stdout.write(f"{digests[algorithm]}\n")
    sys.stdout.flush()
    return EXIT_OK


def _stdin() -> BinaryIO:
    return sys.stdin.buffer


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m services.digests.cli ...``)."""
    parser = argparse.ArgumentParser(prog="layerlog")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
