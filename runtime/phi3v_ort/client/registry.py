"""Where running `phi3v-ort serve` processes record themselves, so `run`, `chat`, `ps` and `stop` can find them.

One small JSON file per server (`server-PID.json`) in `$PHI3V_ORT_STATE_DIR`, else `$XDG_RUNTIME_DIR/phi3v-ort/`
(cleared at logout, the place for runtime state), else `~/.cache/phi3v-ort/servers/`. A server writes its file
once it is listening and its workers are ready, atomically (a reader never sees half a file), and removes it on
exit (SIGTERM and Ctrl-C included). A server killed with SIGKILL leaves its file: a file whose process is gone,
or whose address no longer answers, is stale; readers skip it and delete it.

The file holds what a client needs to decide whether the server answers the same way it would in-process: the
resolved package folder, the device, the processor, the threads per worker and the KV options; whether an API key
is required (never the key itself); and the server's request limits.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

STATE_DIR_ENV = "PHI3V_ORT_STATE_DIR"
HEALTH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ServerRecord:
    """One running server, as it recorded itself."""

    pid: int
    url: str  # where a client on this machine reaches it: http://127.0.0.1:PORT for a server on every interface
    host: str
    port: int
    model_dir: str  # resolved
    model_name: str
    device: str  # "cpu" or "cuda" (resolved)
    processor: str
    threads: int | None  # intra-op threads per worker (None: og's own default, on CUDA)
    workers: int
    share_buffer: bool
    cuda_graph: bool
    api_key: bool  # whether /v1 requires `Authorization: Bearer` (the key is never written)
    started: float  # time.time() when it started serving
    load_s: float  # how long its workers took to load the model
    version: str
    idle_exit_s: float | None = None  # exits after this long without requests (serve --idle-exit)
    last_request: float | None = None  # time.time() when the last request (other than /health) ended
    max_images: int = 8
    max_image_bytes: int = 16 * 2**20
    max_body_bytes: int = 32 * 2**20
    max_tokens_limit: int | None = None  # serve --max-tokens-limit (None: a record from before the option)
    log: str | None = None  # the log file of a server started in the background (--keep-alive)

    @classmethod
    def from_dict(cls, data: dict) -> "ServerRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def state_dir() -> Path:
    """The folder of the servers' state files (not created here)."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser()
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "phi3v-ort"
    return Path.home() / ".cache" / "phi3v-ort" / "servers"


def record_path(pid: int) -> Path:
    return state_dir() / f"server-{pid}.json"


def write(record: ServerRecord) -> Path:
    """Write (or rewrite) a server's file atomically: a temporary file renamed over the final name."""
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = record_path(record.pid)
    tmp = folder / f".{target.name}.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def remove(pid: int) -> None:
    record_path(pid).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process runs under this id (a zombie, exited but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(0) is the answer


def recorded() -> list[ServerRecord]:
    """Every server file whose process is alive, oldest first; files of dead processes (and unreadable ones) are
    deleted."""
    folder = state_dir()
    found = []
    for path in sorted(folder.glob("server-*.json")) if folder.is_dir() else []:
        try:
            record = ServerRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if not pid_alive(record.pid):
            path.unlink(missing_ok=True)
            continue
        found.append(record)
    return sorted(found, key=lambda r: r.started)


def health(url: str, timeout: float = HEALTH_TIMEOUT_S) -> dict | None:
    """GET /health as a dict (a 503 included: the server answers, its workers are down); None when it does not
    answer in time. Raises ConnectionRefusedError when nothing listens there."""
    from phi3v_ort.client.transport import get_json

    try:
        return get_json(url, "/health", timeout=timeout)[1]
    except ConnectionRefusedError:
        raise
    except (OSError, ValueError):
        return None


def running(model_dir: str | Path | None = None, ready_only: bool = True) -> list[ServerRecord]:
    """The servers that are alive and answer /health, for `model_dir` (resolved) when given; `ready_only`: only
    those whose workers are all up and that are not shutting down. One whose address refuses connections is stale
    (its process id now belongs to something else): its file is deleted. A server writes its file only once it
    listens, so a live one never refuses."""
    wanted = str(Path(model_dir).resolve()) if model_dir is not None else None
    alive = []
    for record in recorded():
        if wanted is not None and record.model_dir != wanted:
            continue
        try:
            report = health(record.url)
        except ConnectionRefusedError:
            remove(record.pid)
            continue
        ready = report is not None and report.get("status") == "ok" and not report.get("shutting_down")
        if ready or (not ready_only and report is not None):
            alive.append(record)
    return alive


def touch(record: ServerRecord) -> ServerRecord:
    """The record with `last_request` now, rewritten (what `ps` shows as idle time)."""
    from dataclasses import replace

    updated = replace(record, last_request=time.time())
    write(updated)
    return updated
