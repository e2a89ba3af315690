"""The services' Prometheus metrics, defined once so every process exports the same names.

Names follow the Prometheus conventions: a `layerlog_` prefix, base units in the name (`_bytes`,
`_seconds`), `_total` on counters (prometheus_client appends it). Each process registers all of
them; a service simply leaves the ones that are not about it at zero (or absent, for labelled ones).

The upload worker and the verifier serve /metrics on their own port (serve() below); the query
service serves it on its HTTP API.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import (
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

log = logging.getLogger(__name__)

# A `_created` series per counter doubles what every scrape carries and no dashboard here uses
# it (rate() copes with restarts on its own). Process-wide, so the query service's HTTP
# counters (services.query.http imports this module through the projection) follow too.
disable_created_metrics()

# Chunks are staged with one S3 request or a few; past a minute something is wrong anyway.
_STORAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Verification reads the whole layer once: seconds for small layers, minutes for huge ones.
_VERIFY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# Upload worker and verifier (services.core.processor): counted from the outputs of committed
# transactions only, so a batch that is applied again after a failed commit is not counted twice.
INGESTED_BYTES = Counter(
    "layerlog_ingested_bytes", "Bytes of layer data made durable (ChunkAppended lengths)"
)
INGESTED_CHUNKS = Counter("layerlog_ingested_chunks", "Chunks made durable (ChunkAppended events)")
CHUNK_APPEND_SECONDS = Histogram(
    "layerlog_chunk_append_seconds",
    "Time to apply one AppendChunk command that was made durable",
    buckets=_STORAGE_BUCKETS,
)
VERIFICATION_SECONDS = Histogram(
    "layerlog_verification_seconds",
    "Time to verify a finished upload, by outcome (committed or failed)",
    ["outcome"],
    buckets=_VERIFY_BUCKETS,
)
VERIFICATION_FAILURES = Counter(
    "layerlog_verification_failures", "LayerValidationFailed verdicts, by reason", ["reason"]
)
COMMANDS_REJECTED = Counter(
    "layerlog_commands_rejected",
    "CommandRejected events, by command and reason",
    ["command", "reason"],
)
DEAD_LETTERS = Counter("layerlog_dead_letters", "Records sent to the dead-letter topic", ["reason"])
EVENTS_PUBLISHED = Counter(
    "layerlog_events_published", "Events committed to the events topic, by type", ["event"]
)
RECORDS_HANDLED = Counter(
    "layerlog_records_handled", "Input records applied and committed", ["topic"]
)
HANDLE_SECONDS = Histogram(
    "layerlog_record_handle_seconds",
    "Time to apply one input record (any type)",
    ["topic"],
    buckets=_STORAGE_BUCKETS,
)
COMMIT_FAILURES = Counter(
    "layerlog_commit_failures",
    "Transactions that did not commit (fenced: another replica took the partition)",
    ["topic", "kind"],
)
CONSUMER_LAG = Gauge(
    "layerlog_consumer_lag_records",
    "Records in an owned input partition not yet read (high watermark minus position)",
    ["topic", "partition"],
)

# Query service (services.query.projection).
PROJECTION_LAG = Gauge(
    "layerlog_projection_lag_records",
    "Events in the log not yet applied to the index, per events partition",
    ["partition"],
)
PROJECTION_EVENTS_APPLIED = Counter(
    "layerlog_projection_events_applied", "Events applied to the query index"
)
PROJECTION_LAST_EVENT_SECONDS = Gauge(
    "layerlog_projection_last_event_timestamp_seconds",
    "Log timestamp of the newest event applied to the index (time() minus this: how stale)",
)

# Query and registry replicas (services.query.replica, services.query.snapshots).
REPLICA_READY = Gauge(
    "layerlog_replica_ready",
    "1 once the index holds the log as it was when the process started (it then takes traffic)",
)
CATCH_UP_REMAINING = Gauge(
    "layerlog_replica_catch_up_remaining_records",
    "Events between the index and the log end offsets noted at start (0 once ready)",
)
SNAPSHOTS_TAKEN = Counter(
    "layerlog_snapshots_taken", "Snapshots of the index uploaded to S3 (manifest written)"
)
SNAPSHOT_FAILURES = Counter(
    "layerlog_snapshot_failures", "Snapshots that could not be taken or uploaded"
)
SNAPSHOT_LAST_TAKEN_SECONDS = Gauge(
    "layerlog_snapshot_last_taken_timestamp_seconds", "When this process last uploaded a snapshot"
)
SNAPSHOTS_SKIPPED = Counter(
    "layerlog_snapshots_skipped",
    "Snapshots a new replica found unusable and skipped, by reason",
    ["reason"],
)
SNAPSHOT_RESTORES = Counter(
    "layerlog_snapshot_restores", "New indexes started from a snapshot instead of the log's start"
)

# The garbage collector (services.gc).
GC_RECLAIMED = Counter(
    "layerlog_gc_reclaimed",
    "Copies the garbage collector reclaimed (a BlobReclaimed or ManifestReclaimed committed, "
    "then the object deleted), by kind (blob, manifest)",
    ["kind"],
)
GC_RECLAIMED_BYTES = Counter(
    "layerlog_gc_reclaimed_bytes", "Bytes the garbage collector reclaimed, by kind", ["kind"]
)
GC_KEPT = Counter(
    "layerlog_gc_kept",
    "Unlinked copies a sweep kept, once per sweep, by kind and reason: grace (unlinked for less "
    "than LAYERLOG_GC_GRACE_SECONDS), racing_link (linked again, or its links moved, between "
    "the mark and the check), hold (a push, mount or manifest PUT in flight holds it), pointer "
    "(the blobs/ pointer named it again)",
    ["kind", "reason"],
)
GC_MANIFESTS_RESTORED = Counter(
    "layerlog_gc_manifests_restored",
    "Manifest copies the collector wrote back: a PUT of the same manifest raced its delete",
)
GC_HOLDS_RELEASED = Counter(
    "layerlog_gc_holds_released", "Holds deleted once the log had their cause's outcome"
)
GC_SWEEPS = Counter("layerlog_gc_sweeps", "Sweeps, by outcome (done, failed)", ["outcome"])
GC_SWEEP_SECONDS = Histogram(
    "layerlog_gc_sweep_seconds",
    "Time one sweep took, from the mark to the last delete",
    buckets=_VERIFY_BUCKETS,
)

# Query service and registry (services.core.waits): requests waiting for a verdict or an
# outcome, and those refused because the process had as many waiting as it allows.
WAITING_REQUESTS = Gauge(
    "layerlog_waiting_requests",
    "Requests waiting for a verdict or a command's outcome (LAYERLOG_MAX_WAITING_REQUESTS caps it)",
)
WAIT_REFUSALS = Counter(
    "layerlog_wait_refusals",
    "Requests answered 429 because LAYERLOG_MAX_WAITING_REQUESTS requests were already waiting",
)


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (Settings has validated it already) as the pair start_http_server takes."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def serve(listen: str, service: str) -> Callable[[], None]:
    """Serves /metrics on listen from a background thread; returns the function that stops it.

    A port that is taken is logged and otherwise ignored: a replica started next to another on
    the same host must still do its work, and losing metrics is better than losing the service.
    """
    host, port = parse_listen(listen)
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as error:
        log.error(
            "%s: cannot serve metrics on %s (%s); running without a /metrics endpoint",
            service,
            listen,
            error,
        )
        return lambda: None
    log.info("%s: metrics on http://%s:%d/metrics", service, host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
