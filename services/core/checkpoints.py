"""Named points inside a service's work where a test can stop it, to run another service's step
at exactly that moment (tests/test_gc_race.py interleaves pushes with the collector's phases).

A service takes a Checkpoint and awaits it at each point; in production it is `passing`, which
returns at once.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class Step(StrEnum):
    # The verifier read the digest's blobs/ pointer (naming another copy), before its hold.
    VERIFIER_POINTER_READ = "verifier.pointer-read"
    # The verifier chose the copy its verdict names (hold written, pointer read again), before
    # it stores the verdict.
    VERIFIER_COPY_CHOSEN = "verifier.copy-chosen"
    # The verdict is stored; its own copy (when it points at another) is not deleted yet.
    VERIFIER_VERDICT_STORED = "verifier.verdict-stored"
    # The verdict is stored and the duplicate copy deleted; the events are not published yet.
    VERIFIER_DECIDED = "verifier.decided"
    # The upload worker resolved a MountBlob to a copy (hold written), before it decides.
    WORKER_MOUNT_RESOLVED = "worker.mount-resolved"


class Checkpoint(Protocol):
    async def __call__(self, step: Step, digest: str) -> None: ...


async def passing(step: Step, digest: str) -> None:
    """The production checkpoint: nothing waits."""
    return None
