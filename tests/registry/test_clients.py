"""Real OCI clients (crane, oras, regctl, skopeo) against the registry, byte for byte.

Every image is built here (random tar layers, an OCI layout written by tests/registry/images.py),
so each check compares what a client got back with bytes the test made, not with what another
client reported.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.authfiles import admin_bearer
from tests.layers import random_tar
from tests.registry.clients import Clients, client_path, run_hashing
from tests.registry.conftest import Registry
from tests.registry.images import (
    LAYER_GZIP,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Layout,
    sha256,
    write_random_tar_layer,
)

MIB = 1 << 20
RSS_LIMIT = 200 * MIB
BIG_LAYER_BYTES = 1 << 30


def gzip_layer(layout: Layout, seed: int) -> tuple[Descriptor, str]:
    raw = random_tar(seed, files=4, max_size=300_000)
    return layout.add_blob(gzip.compress(raw, mtime=0), LAYER_GZIP), sha256(raw)


def image_layout(path: Path, seed: int, architecture: str = "amd64") -> tuple[Layout, Descriptor]:
    """A layout holding one image of two gzip layers; returns it and the manifest's descriptor."""
    layout = Layout(path)
    layers = [gzip_layer(layout, seed), gzip_layer(layout, seed + 1)]
    return layout, layout.add_image(layers, architecture)


def blob(layout: Layout, digest: str) -> bytes:
    return layout.blob_path(digest).read_bytes()


def layers_of(layout: Layout, manifest: Descriptor) -> list[str]:
    return [layer["digest"] for layer in json.loads(blob(layout, manifest.digest))["layers"]]


def tar_members(data: bytes) -> dict[str, bytes]:
    """Regular files of a tar (or tar.gz) by name, for comparing file systems."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {
            member.name.lstrip("./"): archive.extractfile(member).read()  # type: ignore[union-attr]
            for member in archive.getmembers()
            if member.isfile()
        }


def push(clients: Clients, path: Path, repository: str, tag: str, seed: int) -> Layout:
    layout, manifest = image_layout(path, seed)
    clients.crane("push", str(path), clients.ref(repository, tag))
    digest = clients.crane("digest", clients.ref(repository, tag)).stdout.decode().strip()
    assert digest == manifest.digest
    return layout


def test_crane_push_then_pull_returns_every_byte(clients: Clients, tmp_path: Path) -> None:
    layout, manifest = image_layout(tmp_path / "image", seed=1)
    repository = "clients/crane"
    clients.crane("push", str(layout.path), clients.ref(repository, "v1"))

    # The registry keeps the manifest's exact bytes, so its digest is the one computed here.
    assert clients.crane("digest", clients.ref(repository, "v1")).stdout.decode().strip() == (
        manifest.digest
    )
    got = clients.crane("manifest", clients.ref(repository, "v1")).stdout
    assert got == blob(layout, manifest.digest)
    config = json.loads(got)["config"]["digest"]
    assert clients.crane("config", clients.ref(repository, "v1")).stdout == blob(layout, config)
    for layer in layers_of(layout, manifest):
        assert clients.crane("blob", clients.ref(repository, layer)).stdout == blob(layout, layer)

    pulled = tmp_path / "pulled"
    clients.crane("pull", "--format", "oci", clients.ref(repository, "v1"), str(pulled))
    for digest in [manifest.digest, config, *layers_of(layout, manifest)]:
        hex_digest = digest.removeprefix("sha256:")
        assert (pulled / "blobs" / "sha256" / hex_digest).read_bytes() == blob(layout, digest)

    # The flattened file system holds every file of both layers, with its content.
    exported = clients.crane("export", clients.ref(repository, "v1"), "-").stdout
    expected: dict[str, bytes] = {}
    for layer in layers_of(layout, manifest):
        expected |= tar_members(blob(layout, layer))
    assert tar_members(exported) == expected


def test_crane_append_pushes_layers_as_given(clients: Clients, tmp_path: Path) -> None:
    first = gzip.compress(random_tar(11, files=3), mtime=0)
    second = gzip.compress(random_tar(12, files=3), mtime=0)
    (tmp_path / "first.tar.gz").write_bytes(first)
    (tmp_path / "second.tar.gz").write_bytes(second)
    base, child = clients.ref("clients/append", "base"), clients.ref("clients/append", "child")

    clients.crane("append", "--oci-empty-base", "-f", str(tmp_path / "first.tar.gz"), "-t", base)
    clients.crane("append", "-b", base, "-f", str(tmp_path / "second.tar.gz"), "-t", child)

    # A gzip layer is uploaded as the file's bytes, so its digest is the file's sha256.
    layers = json.loads(clients.crane("manifest", child).stdout)["layers"]
    assert [layer["digest"] for layer in layers] == [sha256(first), sha256(second)]
    assert clients.crane("blob", clients.ref("clients/append", sha256(second))).stdout == second
    exported = tar_members(clients.crane("export", child, "-").stdout)
    assert exported == tar_members(first) | tar_members(second)


def test_multi_arch_index(clients: Clients, tmp_path: Path) -> None:
    repository = "clients/multi"
    images: dict[str, tuple[Layout, Descriptor]] = {}
    for number, architecture in enumerate(("amd64", "arm64")):
        layout, manifest = image_layout(tmp_path / architecture, 20 + 2 * number, architecture)
        clients.crane("push", str(layout.path), clients.ref(repository, architecture))
        images[architecture] = (layout, manifest)

    index_ref = clients.ref(repository, "latest")
    clients.crane(
        "index",
        "append",
        "-m",
        clients.ref(repository, "amd64"),
        "-m",
        clients.ref(repository, "arm64"),
        "-t",
        index_ref,
    )
    index = json.loads(clients.crane("manifest", index_ref).stdout)
    assert index["mediaType"] == OCI_INDEX
    by_arch = {entry["platform"]["architecture"]: entry["digest"] for entry in index["manifests"]}
    assert by_arch == {arch: manifest.digest for arch, (_, manifest) in images.items()}

    # Each client resolves the platform through the index to the very manifest pushed.
    arm_layout, arm = images["arm64"]
    resolved = clients.crane("digest", "--platform", "linux/arm64", index_ref).stdout.decode()
    assert resolved.strip() == arm.digest
    raw = clients.regctl(
        "manifest", "get", "--platform", "linux/arm64", "--format", "raw-body", index_ref
    ).stdout
    assert raw == blob(arm_layout, arm.digest)


def test_crane_copy_mounts_blobs_across_repositories(clients: Clients, tmp_path: Path) -> None:
    layout = push(clients, tmp_path / "image", "clients/source", "v1", seed=30)
    manifest = layout.manifests[0]
    source, target = clients.ref("clients/source", "v1"), clients.ref("clients/target", "v1")

    copied = clients.crane("--verbose", "copy", source, target)

    # crane asks for a cross-repository mount of each blob; a registry that mounts answers 201
    # and crane sends no bytes (no PATCH) to the target repository.
    log = copied.stderr.decode(errors="replace")
    assert "mount=" in log and "from=clients%2Fsource" in log, log[-3000:]
    assert "PATCH" not in log, log[-3000:]
    assert clients.crane("digest", target).stdout.decode().strip() == manifest["digest"]
    for layer in layers_of(layout, Descriptor(OCI_MANIFEST, str(manifest["digest"]), 0)):
        assert clients.crane("blob", clients.ref("clients/target", layer)).stdout == blob(
            layout, layer
        )


def test_oras_attach_and_discover_through_the_referrers_api(
    clients: Clients, registry: Registry, tmp_path: Path
) -> None:
    repository = "clients/oras"
    subject = clients.ref(repository, "v1")
    (tmp_path / "artifact.txt").write_bytes(b"an artifact pushed by oras\n")
    (tmp_path / "sbom.json").write_text('{"packages": []}')
    clients.oras(
        "push",
        "--artifact-type",
        "application/vnd.layerlog.test",
        subject,
        "artifact.txt:text/plain",
        cwd=tmp_path,
    )
    # The referrers API only, never the tag-schema fallback: the registry must answer it.
    attached = clients.oras(
        "attach",
        "--distribution-spec",
        "v1.1-referrers-api",
        "--artifact-type",
        "application/vnd.layerlog.sbom",
        "--format",
        "json",
        subject,
        "sbom.json:application/json",
        cwd=tmp_path,
    )
    sbom_digest = json.loads(attached.stdout)["digest"]

    discovered = clients.oras(
        "discover", "--distribution-spec", "v1.1-referrers-api", "--format", "json", subject
    )
    referrers = json.loads(discovered.stdout)["referrers"]
    assert [(r["digest"], r["artifactType"]) for r in referrers] == [
        (sbom_digest, "application/vnd.layerlog.sbom")
    ]

    subject_digest = clients.crane("digest", subject).stdout.decode().strip()
    url = f"{registry.url}/v2/{repository}/referrers/{subject_digest}"
    request = urllib.request.Request(url, headers=admin_bearer(registry.url, repository))
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"] == OCI_INDEX
        index = json.loads(response.read())
    assert [entry["digest"] for entry in index["manifests"]] == [sbom_digest]
    # No fallback tag (sha256-<hex>) was written in place of the API.
    tags = clients.oras("repo", "tags", clients.ref(repository)).stdout.decode().split()
    assert tags == ["v1"]

    pulled = tmp_path / "pulled"
    clients.oras("pull", "-o", str(pulled), clients.ref(repository, sbom_digest))
    assert (pulled / "sbom.json").read_text() == '{"packages": []}'


def test_regctl_copy_and_manifest_get(clients: Clients, tmp_path: Path) -> None:
    layout = push(clients, tmp_path / "image", "clients/regctl-source", "v1", seed=40)
    digest = str(layout.manifests[0]["digest"])
    target = clients.ref("clients/regctl-target", "copied")

    clients.regctl("image", "copy", clients.ref("clients/regctl-source", "v1"), target)

    raw = clients.regctl("manifest", "get", "--format", "raw-body", target).stdout
    assert raw == blob(layout, digest)
    assert clients.regctl("image", "digest", target).stdout.decode().strip() == digest
    for layer in layers_of(layout, Descriptor(OCI_MANIFEST, digest, 0)):
        got = clients.regctl("blob", "get", clients.ref("clients/regctl-target"), layer).stdout
        assert got == blob(layout, layer)


def test_tag_listing(clients: Clients, tmp_path: Path) -> None:
    repository = "clients/tags"
    push(clients, tmp_path / "image", repository, "v1", seed=50)
    for tag in ("b-tag", "a-tag", "v2", "latest"):
        clients.crane("tag", clients.ref(repository, "v1"), tag)
    expected = sorted(["v1", "b-tag", "a-tag", "v2", "latest"])

    assert clients.crane("ls", clients.ref(repository)).stdout.decode().split() == expected
    listed = clients.regctl("tag", "ls", clients.ref(repository)).stdout.decode().split()
    assert listed == expected
    tags = clients.oras("repo", "tags", clients.ref(repository)).stdout.decode().split()
    assert tags == expected
    # Paging with ?last=: only the tags after it, still in lexical order.
    after = clients.oras("repo", "tags", "--last", "b-tag", clients.ref(repository)).stdout
    assert after.decode().split() == [tag for tag in expected if tag > "b-tag"]


def head_status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, method="HEAD", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_deletes(clients: Clients, registry: Registry, tmp_path: Path) -> None:
    repository = "clients/deletes"
    layout = push(clients, tmp_path / "image", repository, "v1", seed=60)
    digest = str(layout.manifests[0]["digest"])
    clients.crane("tag", clients.ref(repository, "v1"), "v2")

    # A tag goes; the manifest and the other tag stay.
    clients.regctl("tag", "delete", clients.ref(repository, "v2"))
    assert clients.crane("ls", clients.ref(repository)).stdout.decode().split() == ["v1"]
    assert clients.crane("digest", clients.ref(repository, digest)).stdout.decode().strip() == (
        digest
    )

    # The manifest by digest goes; then its layers can go too.
    admin = admin_bearer(registry.url, repository)
    clients.crane("delete", clients.ref(repository, digest))
    assert clients.crane("manifest", clients.ref(repository, digest), expect_ok=False).returncode
    assert head_status(f"{registry.url}/v2/{repository}/manifests/{digest}", admin) == 404
    layer = layers_of(layout, Descriptor(OCI_MANIFEST, digest, 0))[0]
    assert head_status(f"{registry.url}/v2/{repository}/blobs/{layer}", admin) == 200
    clients.regctl("blob", "delete", clients.ref(repository), layer)
    assert clients.crane("blob", clients.ref(repository, layer), expect_ok=False).returncode
    assert head_status(f"{registry.url}/v2/{repository}/blobs/{layer}", admin) == 404


def test_skopeo_copies_in_and_out(clients: Clients, tmp_path: Path) -> None:
    layout, manifest = image_layout(tmp_path / "image", seed=70)
    ref = "docker://" + clients.ref("clients/skopeo", "v1")
    clients.skopeo("copy", "--dest-tls-verify=false", f"oci:{layout.path}", ref)

    raw = clients.skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout
    assert raw == blob(layout, manifest.digest)
    out = tmp_path / "out"
    clients.skopeo("copy", "--src-tls-verify=false", ref, f"oci:{out}")
    for layer in layers_of(layout, manifest):
        assert (out / "blobs" / "sha256" / layer.removeprefix("sha256:")).read_bytes() == (
            blob(layout, layer)
        )


class MemorySampler:
    """Samples VmRSS of each service process (and its children) until stopped; keeps the
    largest, and the kernel's own high-water mark VmHWM, which no sampling gap can miss."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak_rss = dict.fromkeys(pids, 0)
        self.peak_hwm = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            for process in [pid, *descendants(pid)]:
                rss, hwm = status_kib(process, "VmRSS"), status_kib(process, "VmHWM")
                self.peak_rss[name] = max(self.peak_rss[name], rss * 1024)
                self.peak_hwm[name] = max(self.peak_hwm[name], hwm * 1024)


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            for child in children.read_text().split():
                found += [int(child), *descendants(int(child))]
        except FileNotFoundError:
            pass
    return found


@pytest.mark.timeout(1800)
def test_one_gib_layer_with_crane_keeps_every_service_under_200_mib(
    clients: Clients, registry: Registry, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "big")
    layer = write_random_tar_layer(layout, BIG_LAYER_BYTES)
    manifest = layout.add_image([(layer, layer.digest)])
    pids = {
        name: service.process.pid
        for name, service in registry.services.items()
        if service.process is not None
    }
    ref = clients.ref("clients/big", "v1")

    with MemorySampler(pids) as memory:
        clients.crane("push", str(layout.path), ref, timeout=1500)
        # Read back through the registry too: bytes and memory both count on the way out.
        argv = [
            client_path("crane"),
            "--insecure",
            "blob",
            clients.ref("clients/big", layer.digest),
        ]
        read_back = run_hashing(argv, timeout=900, env=clients.env)
    assert read_back == layer.digest
    assert clients.crane("digest", ref).stdout.decode().strip() == manifest.digest

    report = {name: (memory.peak_rss[name] // MIB, memory.peak_hwm[name] // MIB) for name in pids}
    print(f"peak RSS, VmHWM in MiB, {BIG_LAYER_BYTES // MIB} MiB pushed and read: {report}")
    for name in pids:
        assert memory.peak_rss[name] <= RSS_LIMIT, report
        assert memory.peak_hwm[name] <= RSS_LIMIT, report
