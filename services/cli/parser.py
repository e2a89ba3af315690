"""The argument parser: every subcommand, its help text and its handler."""

from __future__ import annotations

import argparse
import textwrap

from services.cli import commands
from services.cli.exits import EXIT_STATUSES, client_command
from services.cli.run import run_all, run_service


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerlog",
        description="Layerlog: an event-sourced store for container image layers.",
        epilog="Settings come from LAYERLOG_* environment variables (see README.md).\n\n"
        + EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, about: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=about,
            # Raw formatting keeps the exit-status table; so the prose is wrapped here.
            description=textwrap.fill(description or about, 88),
            epilog=EXIT_STATUSES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    # Services

    for name, about, listen in (
        (
            "upload-worker",
            "consume upload commands, stage chunks in S3, emit events",
            "LAYERLOG_WORKER_METRICS_LISTEN",
        ),
        (
            "verifier",
            "check finished uploads and publish LayerCommitted or a failure",
            "LAYERLOG_VERIFIER_METRICS_LISTEN",
        ),
    ):
        service = command(
            name,
            about,
            f"{about[0].upper()}{about[1:]}. Logs JSON lines on stderr (level: "
            f"LAYERLOG_LOG_LEVEL) and serves Prometheus metrics at http://{listen}/metrics.",
        )
        service.set_defaults(handler=run_service, service=name)

    query = command(
        "query",
        "serve Exists/Fetch from the index projected from events",
        "Serve the HTTP API (HEAD/GET /v2/<name>/blobs/<digest>, /healthz, /readyz, /metrics) "
        "from the SQLite index, which it keeps projecting from the events topic. With "
        "--read-only it serves an index as it is (one `layerlog replay` wrote) and starts no "
        "projection.",
    )
    query.add_argument("--index", help="SQLite index file (default: LAYERLOG_INDEX_PATH)")
    query.add_argument(
        "--read-only", action="store_true", help="serve a replayed index as it is; no projection"
    )
    query.set_defaults(handler=run_service, service="query")

    registry = command(
        "registry",
        "serve the OCI distribution API (push and pull for docker, crane, oras, ...)",
        "Serve the OCI distribution-spec v1.1 API on LAYERLOG_REGISTRY_LISTEN: blob uploads, "
        "mounts and deletes, manifest puts and deletes become commands on Kafka; reads come from "
        "an index (LAYERLOG_REGISTRY_INDEX_PATH) this process projects from the events topic.",
    )
    registry.set_defaults(handler=run_service, service="registry")

    gc_service = command(
        "gc-service",
        "reclaim the bytes of blobs and manifests no repository links, every so often",
        "Keep an index of its own (LAYERLOG_GC_INDEX_PATH) projected from the events topic and "
        "sweep every LAYERLOG_GC_INTERVAL_SECONDS: copies nothing has linked for "
        "LAYERLOG_GC_GRACE_SECONDS are reclaimed, each with a BlobReclaimed or ManifestReclaimed "
        "event published before its bytes are deleted. Pushes and pulls go on meanwhile. Serves "
        "Prometheus metrics at http://LAYERLOG_GC_METRICS_LISTEN/metrics.",
    )
    gc_service.set_defaults(handler=run_service, service="gc-service")

    run_all_command = command("run-all", "run the five services until Ctrl-C")
    run_all_command.set_defaults(handler=run_all)

    # Client commands

    push = command("push", "upload a layer file; prints its digest")
    push.add_argument("--repo", required=True, help="repository name")
    push.add_argument("--digest", help="digest to finish with (default: the file's sha256)")
    _output_options(push)
    push.add_argument("file", help="layer file")
    push.set_defaults(handler=client_command(commands.push))

    pull = command("pull", "download a layer to a file")
    pull.add_argument("--repo", required=True, help="repository name")
    pull.add_argument("digest")
    pull.add_argument("-o", "--output", required=True, help="file to write")
    _output_options(pull)
    pull.set_defaults(handler=client_command(commands.pull))

    exists = command("exists", "exit 0 and print true if the layer exists, else 1")
    exists.add_argument("--repo", required=True, help="repository name")
    exists.add_argument("digest")
    exists.add_argument("--json", action="store_true", help="print a JSON object")
    exists.set_defaults(handler=client_command(commands.exists))

    # Audit tools

    history = command(
        "history",
        "print the ordered history of an upload, or of every upload to a repository",
        "Replay the events topic (and the commands that caused the events) and print an "
        "upload's history: time, event, who did it, causing command, log positions "
        "(PARTITION@OFFSET), sizes, digests and verdicts. UPLOAD_ID reads only the one "
        "partition of each topic its key maps to. --repo has no key to go by and scans the "
        "WHOLE events topic once (slow on a long log), then prints each matching upload's "
        "history. Commands are kept 7 days; an older event's command is shown as gone. Chunk "
        "bytes and tokens are never printed.",
    )
    history.add_argument("upload_id", nargs="?", metavar="UPLOAD_ID", help="the upload's id")
    history.add_argument(
        "--repo", metavar="NAME", help="every upload to this repository (scans the whole log)"
    )
    history.add_argument(
        "--digest", metavar="D", help="with --repo: only the uploads finished with digest D"
    )
    history.add_argument(
        "--tag",
        metavar="T",
        help="with --repo: every digest tag T pointed to, when, who and which command moved it "
        "(reads only the repository's partition)",
    )
    history.add_argument(
        "--json", action="store_true", help="JSON lines, one per event, every field"
    )
    history.set_defaults(handler=client_command(commands.history))

    replay = command(
        "replay",
        "rebuild the index as of a time or log position into a new file (time travel)",
        "Rebuild the query index from the events topic up to a cut, into a new SQLite file; "
        "serve it with `layerlog query --index FILE --read-only`. --until TIME (ISO-8601; UTC "
        "when it has no zone) cuts every partition before its first event at or after TIME. "
        "--until PARTITION:OFFSET (repeat it for several partitions) cuts that partition before "
        "OFFSET; partitions not named are read to their end. Without --until: up to now.",
    )
    replay.add_argument(
        "--until",
        action="append",
        metavar="TIME|PARTITION:OFFSET",
        help="where to cut the log (repeatable for PARTITION:OFFSET)",
    )
    replay.add_argument("--out", required=True, metavar="FILE", help="new index file to write")
    replay.add_argument("--json", action="store_true", help="print a JSON object")
    replay.set_defaults(handler=client_command(commands.replay))

    snapshot = command(
        "snapshot",
        "upload a snapshot of an index to S3, which new replicas start from",
        "Copy an index file consistently (SQLite VACUUM INTO, beside a running service) with "
        "the per-partition log offsets it reflects, upload it to "
        "s3://LAYERLOG_BUCKET/snapshots/<events topic>/<id>/ and its manifest (sha256, size, "
        "offsets) last, then delete all but the newest LAYERLOG_SNAPSHOT_KEEP. A query or "
        "registry replica with a new index starts from the newest snapshot that passes its "
        "checks and replays only the log after it. --list shows the snapshots instead.",
    )
    snapshot.add_argument(
        "--index", metavar="FILE", help="the index to snapshot (default: LAYERLOG_INDEX_PATH)"
    )
    snapshot.add_argument("--list", action="store_true", help="list the snapshots in S3")
    snapshot.add_argument("--json", action="store_true", help="print JSON")
    snapshot.set_defaults(handler=client_command(commands.snapshot))

    audit = command("audit", "check the event log for tampering")
    audit_checks = audit.add_subparsers(metavar="CHECK")
    verify = audit_checks.add_parser(
        "verify",
        help="check every upload's hash chain and every committed blob's digest",
        description="Walk the events topic, check that each event links to the one before it "
        "in its upload's hash chain, and that each LayerCommitted's stored bytes still have "
        "its digest. Prints each break with its PARTITION:OFFSET. Exit status: 0 no break, "
        "1 breaks found, 2 bad usage or settings, 3 the log could not be read.",
    )
    verify.add_argument("--repo", metavar="NAME", help="only uploads to this repository")
    verify.add_argument(
        "--no-blobs", action="store_true", help="check the chains only, not the stored bytes"
    )
    verify.add_argument("--json", action="store_true", help="JSON lines: each break, a summary")
    verify.set_defaults(handler=client_command(commands.audit_verify))

    gc = command(
        "gc",
        "run one garbage-collection sweep now (--dry-run: list what would go)",
        "Catch an index up to the end of the events topic, then reclaim what no repository has "
        "linked for LAYERLOG_GC_GRACE_SECONDS, as the gc-service does (see README, Reclaiming "
        "space): the blobs/ pointer is withdrawn, what a push or mount in flight holds is kept, a "
        "BlobReclaimed or ManifestReclaimed is published, then the bytes are deleted. "
        "--dry-run changes nothing and lists what would go and the bytes it would free. The "
        "index is a temporary file (the whole log is read) unless --index names one to keep.",
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    gc.add_argument("--json", action="store_true", help="print a JSON object")
    gc.add_argument(
        "--index",
        metavar="FILE",
        help="an index file of this command's own to keep between runs (not the service's)",
    )
    gc.set_defaults(handler=client_command(commands.gc))

    provision = command(
        "provision", "create the topics, their Kafka ACLs and the bucket (idempotent)"
    )
    provision.set_defaults(
        handler=lambda _: __import__("services.core.provision").core.provision.main()
    )

    from services.cli import auth as auth_cli

    auth_cli.register(command)

    from services.digests import cli as digest_cli

    digest_cli.register(sub)
    return parser


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON object, no progress")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar (there is none unless stderr is a terminal)",
    )
