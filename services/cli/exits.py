"""Exit statuses, the same for every subcommand, and the errors that choose them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable

from services.core.settings import SettingsError

EXIT_OK = 0
EXIT_NO = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

EXIT_STATUSES = """\
exit status:
  0    success
  1    the answer is no (exists: not there; history: nothing found) or the operation failed
       (the layer did not verify, is unknown, the upload was cancelled, or the policy does
       not let the user do it: LayerAccessDenied)
  2    bad usage or input: arguments, a LAYERLOG_* setting, a file that cannot be read/written,
       a login the registry refuses (wrong user name or password: LayerLoginFailed), Kafka
       refusing the login (a wrong password) or what it asked (no ACL allows it)
  3    Kafka, S3, the query service or the registry's token endpoint cannot be reached
       (or a topic does not exist)
  130  interrupted (Ctrl-C)"""


class Unavailable(Exception):
    """A server the command needs is not answering: exit status 3."""


class UsageError(Exception):
    """Arguments that argparse alone cannot check: exit status 2."""


def client_command(
    function: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    """Runs an async command and turns what can go wrong into a message and an exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(function(args))
        except SettingsError:
            raise  # main() reports it
        except Exception as error:
            status, code, message = _classify(error)
            if status is None:
                raise
            if getattr(args, "json", False):
                print(json.dumps({"error": code, "message": message}))
            print(f"layerlog: {code}: {message}", file=sys.stderr)
            return status

    return run


def _classify(error: Exception) -> tuple[int | None, str, str]:
    """(exit status, error code, message); status None for errors that are bugs."""
    import aiohttp
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from services.audit.timetravel import UntilError
    from services.client import LayerError, LayerLoginFailed, LayerNameInvalid
    from services.client.tokens import TokenServerUnavailable
    from services.core.kafka import KafkaRefused
    from services.core.names import InvalidName
    from services.gc.follower import Behind

    # A refused login is bad input (the credentials given); a refused action is an answer (1).
    usage = (
        UsageError,
        LayerNameInvalid,
        LayerLoginFailed,
        InvalidName,
        UntilError,
        FileExistsError,
        KafkaRefused,
    )
    if isinstance(error, usage):
        return EXIT_USAGE, type(error).__name__, str(error)
    if isinstance(error, TokenServerUnavailable):
        return EXIT_UNAVAILABLE, "Unavailable", str(error)
    if isinstance(error, LayerError):
        return EXIT_NO, type(error).__name__, str(error)
    # Before OSError: aiohttp's connection errors are OSErrors too, but not the user's fault.
    if isinstance(
        error, aiohttp.ClientConnectionError | KafkaConnectionError | Unavailable | Behind
    ):
        return EXIT_UNAVAILABLE, "Unavailable", str(error) or type(error).__name__
    if isinstance(error, KafkaError | TimeoutError | LookupError):
        return EXIT_UNAVAILABLE, "Unavailable", f"{type(error).__name__}: {error}"
    if isinstance(error, OSError):
        return EXIT_USAGE, type(error).__name__, str(error)
    return None, "", ""
