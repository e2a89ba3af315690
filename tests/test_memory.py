"""services.core.memory: with glibc tuned, a freed 8 MiB buffer leaves the process's resident
set at once, even after an earlier free raised glibc's own threshold (its default behaviour)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from services.core.memory import tune_malloc

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

tuned = tune_malloc() if sys.argv[1] == "tune" else False
size = 8 << 20
first = b"x" * size
del first  # the free that makes untuned glibc keep later blocks of this size in its heap
second = b"y" * size
held = rss_kib()
del second
print(json.dumps({"tuned": tuned, "released_kib": held - rss_kib()}))
"""


def probe(mode: str, **env: str) -> dict[str, object]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**environment, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_big_buffer_is_returned_to_the_kernel() -> None:
    result = probe("tune")
    assert result["tuned"] is True
    assert int(result["released_kib"]) >= 7 * 1024, result  # type: ignore[call-overload]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_operators_malloc_settings_win() -> None:
    assert probe("tune", MALLOC_ARENA_MAX="4")["tuned"] is False
