"""A cap on requests that wait for something the log has not said yet (a verdict, an outcome).

A waiting request costs little CPU, but it holds a connection, a coroutine and a re-read of
the index every second for up to minutes. Without a cap, a client that opens thousands of
waits (on purpose, or in a retry storm) takes the process's memory and file descriptors from
everyone else. Past the cap a request is refused at once, before it has done anything, and its
client asks again later (429 with Retry-After).
"""

from __future__ import annotations

from services.core.metrics import WAIT_REFUSALS, WAITING_REQUESTS

# A slot frees as soon as any wait ends, which is usually within seconds.
RETRY_AFTER_SECONDS = 1


def refusal_message(limit: int) -> str:
    return f"{limit} requests are waiting for the log already; ask again shortly"


class WaitLimit:
    """At most `limit` holders at once in this process. There is no await between the check
    and the take, so one event loop needs no lock."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a wait limit is at least 1, not {limit}")
        self.limit = limit
        self.waiting = 0

    def try_take(self) -> bool:
        """Takes a slot if one is free; False (and counted as a refusal) if none is."""
        if self.waiting >= self.limit:
            WAIT_REFUSALS.inc()
            return False
        self.waiting += 1
        WAITING_REQUESTS.inc()
        return True

    def give(self) -> None:
        self.waiting -= 1
        WAITING_REQUESTS.dec()
