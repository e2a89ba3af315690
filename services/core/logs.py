"""Structured logs for the services: one JSON object per line on stderr.

Every line has ts, level, service, logger and message; upload_id and command_id (and any other
field) join it when a call passes them with `extra=`, or when the code around the call bound them
with `bound(...)` (the processor does that per record, so a handler's log lines name the upload
they were about without every call site passing it).

Client commands keep the human format: they are read by people, not by log collectors.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

# The attributes every LogRecord has; whatever else is on a record came in through `extra=`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)

# Fields bound for the code running in this asyncio task (contextvars are per task).
_bound: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "layerlog_log_fields", default=None
)

# Libraries whose INFO lines are about their own connection housekeeping.
_QUIET = ("aiokafka", "kafka")


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Adds fields (None values are left out) to every log line written inside the block."""
    current = _bound.get() or {}
    token = _bound.set({**current, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _bound.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_bound.get() or {})
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a stray non-JSON value in `extra=` must not cost the log line.
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_json(service: str, level: str, stream: TextIO | None = None) -> None:
    """Routes every logger (and Python warnings) to one JSON-lines handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    _install(handler, level)
    # Warnings print to stderr in their own format otherwise, breaking one-object-per-line.
    logging.captureWarnings(True)


def configure_human(level: str, stream: TextIO | None = None) -> None:
    """Plain lines for people. Like logging.basicConfig, it leaves a logging setup that is
    already there alone (a program or test that calls the CLI's main() in-process owns it)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _install(handler, level)


def _install(handler: logging.Handler, level: str) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET:
        # Still at least as quiet as asked for: LAYERLOG_LOG_LEVEL=ERROR silences them too.
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
