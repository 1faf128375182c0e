"""A serving `phi3v-ort serve` made findable: its state file (registry.py) for as long as it serves, the time of
its last request, and its exit after an idle time (`--idle-exit`, idle.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from phi3v_ort.client import registry
from phi3v_ort.server.idle import Activity, ActivityState, exit_when_idle
from phi3v_ort.client.registry import ServerRecord

LOG_ENV = "PHI3V_ORT_SERVER_LOG"  # set by a parent that started this server in the background: where its log goes


def client_url(host: str, port: int) -> str:
    """Where a client on this machine reaches a server listening on `host`."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def server_record(sock: socket.socket, host: str, spec, model_name: str, processor: str, workers: int,
                  api_key: bool, limits, load_s: float, idle_exit_s: float | None) -> ServerRecord:
    """What `serve` records about itself (spec: the workers' WorkerSpec; limits: its ServerLimits)."""
    from phi3v_ort import __version__

    port = sock.getsockname()[1]
    return ServerRecord(
        pid=os.getpid(), url=client_url(host, port), host=host, port=port,
        model_dir=str(Path(spec.model_dir).resolve()), model_name=model_name, device=spec.device,
        processor=processor, threads=spec.threads, workers=workers, share_buffer=spec.policy.share_buffer,
        cuda_graph=spec.policy.cuda_graph, api_key=api_key, started=time.time(), load_s=round(load_s, 3),
        version=__version__, idle_exit_s=idle_exit_s, max_images=limits.max_images,
        max_image_bytes=limits.max_image_bytes, max_body_bytes=limits.max_body_bytes,
        max_tokens_limit=limits.max_tokens_limit,
        log=os.environ.get(LOG_ENV) or None)


def _remove_on_sigterm(pid: int) -> None:
    """uvicorn answers SIGTERM gracefully, then restores the handler it found and raises the signal again, so
    the process still ends by SIGTERM (no `finally` runs then): this handler removes the state file first and
    lets the signal end the process as before."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame) -> None:
        registry.remove(pid)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, on_sigterm)


@contextlib.contextmanager
def announced(app, sock: socket.socket, record: ServerRecord) -> Iterator[ActivityState]:
    """Around serve_forever: the state file written once the socket listens (connections wait in its backlog
    until uvicorn serves them, so a client that reads the file never finds nothing listening), kept up to date
    with the last request, and removed when serving ends (SIGTERM and Ctrl-C end serve_forever normally)."""
    import atexit

    current = [record]

    def request_ended() -> None:
        current[0] = replace(current[0], last_request=time.time())
        registry.write(current[0])

    state = ActivityState(on_request_end=request_ended)
    app.add_middleware(Activity, state=state)
    app.state.load_s = record.load_s  # the chat route reports it to clients that ask (extension.py)
    sock.listen(2048)  # uvicorn's own backlog
    atexit.register(registry.remove, record.pid)
    _remove_on_sigterm(record.pid)
    registry.write(record)
    try:
        if record.idle_exit_s:
            exit_when_idle(state, record.idle_exit_s)
        yield state
    finally:
        registry.remove(record.pid)
