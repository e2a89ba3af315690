"""Summaries of py-spy's collapsed stacks (`py-spy record --format raw`), readable in a terminal.

`python -m bench.flame FILE [--top N] [--match TEXT]` prints the frames with the most samples on
the CPU by themselves (self) and including what they call (total). Idle threads (waiting in
select/epoll, a lock or a queue) are left out, so the shares are of the time spent working.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# Frames in which a thread waits rather than works.
IDLE = re.compile(
    r"\b(select|poll|epoll|_worker \(thread\.py|wait \(threading\.py|_wait_for_tstate_lock|"
    r"get \(queue\.py|acquire|sleep)\b"
)


def parse(path: Path, match: str | None = None) -> tuple[Counter[str], Counter[str], int]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_short(frame) for frame in stack.split(";")]
        if not frames or IDLE.search(frames[-1]):
            continue
        if match and not any(match in frame for frame in frames):
            continue
        count = int(count_text)
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return own, total, samples


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py:123)": paths make it unreadable.
    return re.sub(r"\(([^()]*/)?([^/()]+)\)$", r"(\2)", frame.strip())


def summary(path: Path, top: int = 25, match: str | None = None) -> str:
    own, total, samples = parse(path, match)
    if not samples:
        return f"{path.name}: no busy samples"
    lines = [f"{path.name}: {samples} busy samples" + (f" under {match!r}" if match else "")]
    lines.append("  self%  total%  frame")
    for frame, count in own.most_common(top):
        lines.append(
            f"  {100 * count / samples:5.1f}  {100 * total[frame] / samples:6.1f}  {frame}"
        )
    lines.append("  -- by total --")
    for frame, count in total.most_common(top):
        lines.append(f"  {100 * own[frame] / samples:5.1f}  {100 * count / samples:6.1f}  {frame}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flame", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="only stacks with a frame containing this text")
    args = parser.parse_args(argv)
    for path in args.files:
        print(summary(path, args.top, args.match))
    return 0


if __name__ == "__main__":
    sys.exit(main())
