"""One batch run per output file: an advisory lock (flock) held for the whole run.

Two runs appending to the same JSONL both skip nothing (each planned before the other wrote) and write every id
twice (60 ids, 120 lines, both exit 0). The second run is refused in one sentence naming the holder's pid (read
from /proc/locks on Linux). The lock is on the file itself; a retry replaces the file with a rewritten copy
(runner.rewrite_output), so the copy is locked before it takes the name (`adopt`), and the old inode stays locked too:
a run that opened the old name just before the swap is refused as well. Locks are re-entrant within a process (the
CLI takes the lock before loading the model, run_batch takes it again). An output this lock created and that is
still empty when the run ends is removed again, so a refused or failed start leaves nothing behind."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from phi3v_ort.errors import Phi3vError

_HELD: dict[str, "OutputLock"] = {}  # real path -> this process's lock on it
_GUARD = threading.Lock()


class OutputLock:
    """An exclusive flock on a batch output, for the length of a run (a context manager; re-entrant)."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.real = os.path.realpath(self.output)
        self.fds: list[int] = []
        self.depth = 0
        self.created = False

    def __enter__(self) -> "OutputLock":
        with _GUARD:
            held = _HELD.get(self.real)
            if held is not None:
                held.depth += 1
                return held
            self._acquire()
            self.depth = 1
            _HELD[self.real] = self
            return self

    def __exit__(self, *exc) -> None:
        with _GUARD:
            held = _HELD[self.real]
            held.depth -= 1
            if held.depth == 0:
                del _HELD[self.real]
                held._release()

    def _acquire(self) -> None:
        if self.output.is_symlink() and not self.output.exists():
            raise Phi3vError(f"the output {self.output} is a symlink to nothing")
        try:
            Path(self.real).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.real, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                self.created = True
            except FileExistsError:
                fd = os.open(self.real, os.O_RDWR)
        except OSError as exc:
            raise Phi3vError(f"cannot write the output {self.output}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_pid(fd)
            os.close(fd)
            who = f"another batch run (pid {holder})" if holder else "another batch run"
            raise Phi3vError(f"the output {self.output} is being written by {who}: wait for it to finish, or "
                             f"choose another -o") from None
        self.fds.append(fd)

    def adopt(self, fd: int) -> None:
        """Lock a file that is about to replace the output (a rewrite): its lock is held until the run ends."""
        dup = os.dup(fd)  # shares the lock; it outlives the writer's own descriptor
        fcntl.flock(dup, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.fds.append(dup)

    def _release(self) -> None:
        if self.created:
            try:
                if os.path.getsize(self.real) == 0:
                    os.unlink(self.real)
            except OSError:
                pass
        for fd in self.fds:
            os.close(fd)  # closing the last descriptor of a file releases its flock
        self.fds.clear()


def output_lock(output: str | Path) -> OutputLock:
    return OutputLock(output)


def held(output: str | Path) -> OutputLock | None:
    """This process's lock on `output`, if it holds one (runner.rewrite_output locks the replacement through it)."""
    return _HELD.get(os.path.realpath(output))


def holder_pid(fd: int) -> int | None:
    """The pid /proc/locks gives for the flock on fd's file (Linux; None elsewhere or when it is not listed)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
                    return int(parts[4])
    except (OSError, ValueError):
        return None
    return None
