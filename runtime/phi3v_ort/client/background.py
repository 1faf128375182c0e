"""`--keep-alive`: start `phi3v-ort serve` for a model in the background, detached, and wait until it answers.

It runs `serve --port 0 --idle-exit DURATION --quiet` in its own session (a Ctrl-C in the terminal that started
it does not reach it), with its output in a log file beside the state files; it records itself (registry.py)
once it is ready, and exits on its own after DURATION without requests (`phi3v-ort stop` ends it sooner).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from phi3v_ort.errors import Phi3vError
from phi3v_ort.client import registry
from phi3v_ort.server.presence import LOG_ENV
from phi3v_ort.client.registry import ServerRecord

READY_TIMEOUT_S = 1800.0  # the real model from a slow disk onto a GPU takes minutes; a dead process ends it sooner
POLL_S = 0.05


def serve_command(model_dir: str, device: str, threads: int | None, processor: str, idle_s: float) -> list[str]:
    return [sys.executable, "-m", "phi3v_ort", "serve", "--model-dir", model_dir, "--port", "0",
            "--idle-exit", f"{idle_s:g}s", "--device", device, "--processor", processor, "--quiet",
            *(["--threads", str(threads)] if threads else [])]


def start_server(model_dir: str, device: str = "auto", threads: int | None = None, processor: str = "own",
                 idle_s: float = 300.0, timeout_s: float = READY_TIMEOUT_S) -> ServerRecord:
    """A server for `model_dir`, started now and ready (its record); one sentence if it cannot start."""
    folder = registry.state_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = folder / f"serve-{Path(model_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(serve_command(model_dir, device, threads, processor, idle_s),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, LOG_ENV: str(log)})
    try:
        return _wait_ready(proc, log, time.monotonic() + timeout_s)
    except BaseException:  # not ready (Ctrl-C included): nothing is left running
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        raise


def _wait_ready(proc: subprocess.Popen, log: Path, deadline: float) -> ServerRecord:
    while True:
        record = next((r for r in registry.recorded() if r.pid == proc.pid), None)
        if record is not None and (registry.health(record.url) or {}).get("status") == "ok":
            return record
        if proc.poll() is not None:
            raise Phi3vError(f"the background server exited before it was ready: {last_line(log)} (log: {log})")
        if time.monotonic() > deadline:
            raise Phi3vError(f"the background server was not ready after {READY_TIMEOUT_S:g} s (log: {log})")
        time.sleep(POLL_S)


def last_line(log: Path) -> str:
    """The log's last non-empty line, without the `Error: ` the CLI puts before it."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].removeprefix("Error: ") if lines else "no output"
