"""Peak memory of this process and everything it starts (the vision export and the builder run in child processes).

A sampler thread reads, every 100 ms:
- the process tree's proportional set size (PSS, /proc/PID/smaps_rollup): each resident page counted once, shared
  ones split between the processes sharing them, memory-mapped file pages (safetensors are read that way)
  included -- what the tree holds, without the double counting a sum of resident sets gives when processes share
  pages;
- the machine's used memory (MemTotal - MemAvailable): what the export leaves the rest of the machine, other
  processes included (on a quiet machine, the export's own footprint plus a baseline).
Linux only; elsewhere the figures are None.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path

INTERVAL_S = 0.1


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:
        pass
    return kids


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_pss(root: int | None = None) -> int:
    """Proportional set size of `root` (default: this process) and all its descendants, in bytes."""
    todo, total, seen = [root or os.getpid()], 0, set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _pss_bytes(pid)
        todo += _children(pid)
    return total


def system_used() -> int:
    """MemTotal - MemAvailable, in bytes (0 where /proc/meminfo is missing)."""
    try:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024
                for line in Path("/proc/meminfo").read_text().splitlines() if line.split()[1:2]}
        return info["MemTotal"] - info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return 0


class PeakMemory:
    """`with PeakMemory() as peak: ...`: `peak.peak_pss` and `peak.peak_system_used` (bytes, or None where /proc is
    missing). `peak.phase = NAME` starts a phase: `peak.phases[NAME]` is the tree's peak PSS while it lasted."""

    def __init__(self) -> None:
        self.available = Path(f"/proc/{os.getpid()}/smaps_rollup").is_file()
        self.peak_pss: int | None = None
        self.peak_system_used: int | None = None
        self.phases: dict[str, int] = {}
        self._phase: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def phase(self) -> str | None:
        return self._phase

    @phase.setter
    def phase(self, name: str | None) -> None:
        """A new phase gets a sample at once, so even one shorter than the interval has its figure."""
        self._phase = name
        if self.available and name is not None:
            self._sample()

    def _sample(self) -> None:
        pss, used = tree_pss(), system_used()
        with self._lock:
            self.peak_pss = max(self.peak_pss or 0, pss)
            self.peak_system_used = max(self.peak_system_used or 0, used)
            if self._phase is not None:
                self.phases[self._phase] = max(self.phases.get(self._phase, 0), pss)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._sample()

    def __enter__(self) -> PeakMemory:
        if self.available:
            self._sample()
            self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._sample()


def release_memory() -> None:
    """Collect garbage, then hand glibc's freed heap back to the system: after a model is freed glibc keeps much of
    it for reuse (measured on the small package: 400 MB resident after `del`, 266 MB after malloc_trim), which
    neither a child process nor torch's large tensors, mapped fresh, would get."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass
