"""The OCI rules library (pure logic): references, digests and what a manifest says."""

from __future__ import annotations

import hashlib
import json

import pytest

from services.oci.errors import ErrorCode, OciError, error_body
from services.oci.manifest import (
    DOCKER_MANIFEST,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    ManifestInvalid,
    media_type_of,
    parse_manifest,
)
from services.oci.references import (
    InvalidReference,
    UnsupportedDigest,
    check_tag,
    digest_of,
    is_digest,
    parse_oci_digest,
)

SHA = "sha256:" + hashlib.sha256(b"x").hexdigest()
CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": SHA, "size": 1}


def image(**extra: object) -> bytes:
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": CONFIG, "layers": []}
    document.update(extra)
    return json.dumps(document).encode()


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A" * 128, "a-b_c.d"])
def test_tags_in_the_grammar(tag: str) -> None:
    assert check_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a/b", "a:b", "tag with space"])
def test_tags_outside_the_grammar(tag: str) -> None:
    with pytest.raises(InvalidReference):
        check_tag(tag)


def test_digests() -> None:
    assert str(parse_oci_digest(SHA)) == SHA
    sha512 = digest_of(b"x", "sha512")
    assert parse_oci_digest(str(sha512)) == sha512 and sha512.matches(b"x")
    assert is_digest(SHA) and not is_digest("latest")
    with pytest.raises(UnsupportedDigest):
        parse_oci_digest("md5:" + "0" * 32)
    for bad in ("sha256:baddigeststring", "sha256:" + "A" * 64, "sha256:", "nocolon", SHA + "0"):
        with pytest.raises(InvalidReference):
            parse_oci_digest(bad)


def test_image_manifest_with_subject_takes_the_config_media_type_as_artifact_type() -> None:
    subject = {"mediaType": OCI_MANIFEST, "digest": SHA, "size": 5}
    manifest = parse_manifest(image(subject=subject, annotations={"a": "b"}), OCI_MANIFEST)
    assert manifest.subject is not None and manifest.subject.digest == SHA
    assert manifest.artifact_type == CONFIG["mediaType"]
    assert manifest.annotations == {"a": "b"}
    explicit = parse_manifest(image(artifactType="application/x.sig"), None)
    assert explicit.artifact_type == "application/x.sig"


def test_non_distributable_layers_are_marked() -> None:
    foreign = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}
    nd = {"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"}
    plain = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
    layers = [kind | {"digest": SHA, "size": 1} for kind in (foreign, nd, plain)]
    manifest = parse_manifest(image(layers=layers), OCI_MANIFEST)
    assert [d.distributable for d in manifest.blobs] == [False, False, True]


def test_index_children() -> None:
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [CONFIG | {"size": 3}]}
    ).encode()
    manifest = parse_manifest(body, OCI_INDEX)
    assert manifest.is_index and [d.size for d in manifest.manifests] == [3]


@pytest.mark.parametrize(
    ("body", "content_type", "why"),
    [
        (b"{not json", OCI_MANIFEST, "not JSON"),
        (b"[]", OCI_MANIFEST, "JSON object"),
        (image(), DOCKER_MANIFEST, "does not match"),
        (image(mediaType="text/plain"), "text/plain", "unsupported"),
        (image(schemaVersion=1), OCI_MANIFEST, "schemaVersion"),
        (image(layers=[{"mediaType": "x", "digest": "sha256:bad", "size": 1}]), None, "digest"),
        (image(layers=[{"mediaType": "x", "digest": SHA, "size": -1}]), None, "size"),
        (image(layers=[CONFIG] * 10_001), None, "at most"),
        (image(annotations={"a": 1}), None, "strings"),
        (b" " * (MAX_MANIFEST_BYTES + 1), OCI_MANIFEST, "at most"),
    ],
)
def test_invalid_manifests_say_why(body: bytes, content_type: str | None, why: str) -> None:
    with pytest.raises(ManifestInvalid, match=why):
        parse_manifest(body, content_type)


def test_media_type_comes_from_the_header_else_the_body() -> None:
    assert media_type_of(image(), f"{OCI_MANIFEST}; charset=utf-8") == OCI_MANIFEST
    assert media_type_of(image(), None) == OCI_MANIFEST
    assert media_type_of(b"junk", None) == ""


def test_the_spec_s_error_body() -> None:
    refusal = OciError(404, ErrorCode.MANIFEST_UNKNOWN, "no such manifest", {"tag": "v1"})
    assert refusal.body() == {
        "errors": [
            {"code": "MANIFEST_UNKNOWN", "message": "no such manifest", "detail": {"tag": "v1"}}
        ]
    }
    assert error_body(ErrorCode.UNSUPPORTED, "no")["errors"][0]["detail"] == {}
