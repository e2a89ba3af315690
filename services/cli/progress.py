"""The progress bar that push and pull draw on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO


class Progress:
    """A one-line progress bar on a terminal: percent, bytes, rate and ETA, redrawn with \\r.

    Drawn only when the stream is a terminal (not when piped or redirected) and not disabled
    (--quiet, --json); otherwise every call does nothing.
    """

    WIDTH = 24
    INTERVAL = 0.1  # seconds between redraws: fast enough to look live, cheap on a slow tty

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = max(0, total)
        self.stream = stream or sys.stderr
        self.enabled = enabled and _is_terminal(self.stream)
        self.clock = clock
        self.started = clock()
        self.drawn_at = -1.0
        self.done = 0
        self.width = 0

    def update(self, done: int, *, force: bool = False) -> None:
        self.done = done
        if not self.enabled:
            return
        moment = self.clock()
        if not force and moment - self.drawn_at < self.INTERVAL:
            return
        self.drawn_at = moment
        self._draw(self.line(moment))

    def status(self, text: str) -> None:
        """Replaces the bar with a note (e.g. waiting for the verifier)."""
        if self.enabled:
            self._draw(f"{self.label}  {text}")

    def close(self) -> None:
        if self.enabled:
            self.update(self.done, force=True)
            self.stream.write("\n")
            self.stream.flush()

    def line(self, moment: float) -> str:
        elapsed = max(moment - self.started, 1e-9)
        rate = self.done / elapsed
        fraction = 1.0 if self.total == 0 else min(1.0, self.done / self.total)
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        if self.done >= self.total:
            eta = f"in {_duration(elapsed)}"
        elif rate > 0:
            eta = f"ETA {_duration((self.total - self.done) / rate)}"
        else:
            eta = "ETA --:--"
        return (
            f"{self.label} {fraction * 100:3.0f}% [{bar}] {format_size(self.done)} / "
            f"{format_size(self.total)}  {format_size(rate)}/s  {eta}"
        )

    def _draw(self, text: str) -> None:
        # Pads over what a longer previous line left behind, rather than relying on ANSI codes.
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def format_size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class CountingReader:
    """A file's readinto() that reports how far it got (for the hashing pass's progress)."""

    def __init__(self, source: BinaryIO, progress: Progress) -> None:
        self.source = source
        self.progress = progress
        self.position = 0

    def readinto(self, buffer: Any) -> int:
        count = self.source.readinto(buffer)  # type: ignore[attr-defined]
        self.position += count or 0
        self.progress.update(self.position)
        return count or 0
