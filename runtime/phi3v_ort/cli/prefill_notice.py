"""Ctrl-C during a chat's prefill, answered at once: "the question will be cancelled when the model has read it".

og 0.18 holds the GIL for the whole prefill (seconds to minutes on a CPU for an image), so Python's SIGINT handler,
and any Python thread, runs only after it: the question is cancelled then (chat_loop), but the person pressing
Ctrl-C would see nothing until that moment. The C-level part of Python's handler still runs at once and writes the
signal's number to the wakeup fd (signal.set_wakeup_fd); a tiny helper process, which needs no GIL of ours, reads
that pipe and writes the sentence to stderr. The wakeup fd is set only around the prefill, so a Ctrl-C at any other
moment says nothing more than before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

MESSAGE = "\n[Ctrl-C: the question will be cancelled as soon as the model has read it and its images]\n"

# The helper: ignores Ctrl-C itself (its own session), writes the sentence for every SIGINT byte, ends when this
# process closes the pipe (its end of file). Standard library only, so it starts in tens of milliseconds.
HELPER = f"""
import os, signal, sys
while True:
    data = os.read(0, 64)
    if not data:
        break
    if {int(signal.SIGINT)} in data:
        os.write(2, {MESSAGE.encode()!r})
"""


class PrefillNotice:
    """arm() before a prefill, disarm() after it, close() at the end. Without a main thread, a pipe or a helper it
    does nothing (it never fails a question)."""

    def __init__(self) -> None:
        self.write_fd: int | None = None
        self.helper: subprocess.Popen | None = None

    def _start(self) -> bool:
        if self.helper is not None:
            return self.helper.poll() is None
        try:
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)  # set_wakeup_fd needs it: a full pipe drops a byte, never blocks
            self.helper = subprocess.Popen([sys.executable, "-I", "-c", HELPER], stdin=read_fd,
                                           stdout=subprocess.DEVNULL, start_new_session=True)
            os.close(read_fd)
            self.write_fd = write_fd
            return True
        except OSError:
            return False

    def arm(self) -> int | None:
        """Start writing SIGINT to the helper; returns the wakeup fd to restore (None: not armed)."""
        if not self._start() or self.write_fd is None:
            return None
        try:
            return signal.set_wakeup_fd(self.write_fd)
        except ValueError:  # not the main thread
            return None

    def disarm(self, previous: int | None) -> None:
        if previous is not None:
            signal.set_wakeup_fd(previous)

    def close(self) -> None:
        """End the helper (closing the pipe ends it)."""
        if self.write_fd is not None:
            os.close(self.write_fd)
            self.write_fd = None
        if self.helper is not None:
            try:
                self.helper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.helper.kill()
            self.helper = None
