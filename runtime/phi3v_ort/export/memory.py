"""Peak memory of this process and everything it starts (the builder runs in a child process).

A sampler thread sums the resident set (VmRSS) of the process tree from /proc every 50 ms and keeps the maximum;
`peak_rss` is that sum's maximum. Resident pages of memory-mapped files (safetensors are read that way) count:
it is what the machine must hold, the conservative figure. Linux only; elsewhere the figures are None.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

INTERVAL_S = 0.05


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            kids += [int(k) for k in text]
    except OSError:
        pass
    return kids


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss(root: int | None = None) -> int:
    """Resident bytes of `root` (default: this process) and all its descendants."""
    todo, total, seen = [root or os.getpid()], 0, set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss_bytes(pid)
        todo += _children(pid)
    return total


class PeakMemory:
    """`with PeakMemory() as peak: ...; peak.peak_rss` (bytes, or None where /proc is missing)."""

    def __init__(self) -> None:
        self.available = Path(f"/proc/{os.getpid()}/status").is_file()
        self.peak_rss: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.peak_rss = max(self.peak_rss or 0, tree_rss())

    def __enter__(self) -> PeakMemory:
        if self.available:
            self.peak_rss = tree_rss()
            self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak_rss = max(self.peak_rss or 0, tree_rss())
