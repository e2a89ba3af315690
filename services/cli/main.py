"""The entry point: parse, configure logging, run the chosen handler, map errors to exits."""

from __future__ import annotations

import argparse
import os
import sys

from services.cli.exits import EXIT_INTERRUPTED, EXIT_USAGE
from services.cli.parser import build_parser
from services.cli.run import run_service
from services.core import logs
from services.core.kafka import KafkaRefused
from services.core.settings import LOG_LEVELS, Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        _configure_logging(args)
        return int(args.handler(args) or 0)
    except (SettingsError, KafkaRefused) as error:
        print(f"layerlog: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _configure_logging(args: argparse.Namespace) -> None:
    if getattr(args, "handler", None) is run_service:
        # Services log JSON lines for a log collector; the level is a setting, checked with the
        # others (a bad LAYERLOG_LOG_LEVEL stops the service at start-up with exit status 2).
        logs.configure_json(args.service, Settings.from_env().log_level)
    else:
        # Commands are run by people; a bad level is reported by the commands that read settings.
        level = os.environ.get("LAYERLOG_LOG_LEVEL", "INFO").strip().upper()
        logs.configure_human(level if level in LOG_LEVELS else "INFO")
