"""The Kafka principals: one per service, so the broker's ACLs say what each may do.

services/core/access.py holds the ACLs each one is granted; `deploy/stack up` creates a SCRAM
user with a password file of its own for each (`python -m services.core.principals` lists them).
"""

from __future__ import annotations

import sys
from enum import StrEnum


class Principal(StrEnum):
    # A super user: creates topics, grants the ACLs below, warms the coordinators up.
    ADMIN = "admin"
    # Writes commands; reads events for its own projection and the read barrier.
    REGISTRY = "registry"
    # Reads commands in its group and writes events and dead letters in transactions (and
    # ExpireUpload commands).
    UPLOAD_WORKER = "upload-worker"
    # Reads and writes events in transactions, and dead letters.
    VERIFIER = "verifier"
    # Reads events for its index and the read barrier.
    QUERY = "query"
    # The SDK and the CLI's push: put upload commands on the commands topic, nothing else.
    CLIENT = "client"
    # `layerlog history`, `replay` and `audit verify`: read every topic, write none.
    AUDITOR = "auditor"
    # The garbage collector (services/gc): reads events for its own index, writes BlobReclaimed
    # and ManifestReclaimed events in transactions of its own.
    GC = "gc"


# The local broker's own user (its listeners and its super-user rights); no Layerlog process
# logs in as it.
BROKER_USER = "broker"


def stack_users() -> list[str]:
    """Every SCRAM user the local stack creates."""
    return [BROKER_USER, *(principal.value for principal in Principal)]


if __name__ == "__main__":
    sys.stdout.write("".join(f"{user}\n" for user in stack_users()))
