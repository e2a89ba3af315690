"""`layerlog`: the services, the client commands and the tools, one subcommand each.

Exit statuses (the same for every subcommand; `layerlog --help` lists them):
0 success; 1 the answer is no (exists, history found nothing) or the operation failed (a layer
that does not verify, an unknown layer); 2 bad usage or input (arguments, LAYERLOG_* settings,
files); 3 Kafka, S3 or the query service cannot be reached; 130 interrupted.

The services log JSON lines (services.core.logs); the client commands print for people, or JSON
with --json for scripts.
"""

from __future__ import annotations

from services.cli.main import main

__all__ = ["main"]
