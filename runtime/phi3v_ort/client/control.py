"""Stopping running servers (`phi3v-ort stop`): which ones a user means, and SIGTERM then wait."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from phi3v_ort.errors import Phi3vError
from phi3v_ort.client import registry
from phi3v_ort.client.registry import ServerRecord


def matches(record: ServerRecord, target: str) -> bool:
    """A server is named by its process id, its model name, its package folder's name or the folder's path."""
    if target.isdigit():
        return record.pid == int(target)
    if target in (record.model_name, Path(record.model_dir).name):
        return True
    return Path(target).expanduser().exists() and str(Path(target).expanduser().resolve()) == record.model_dir


def select(target: str | None, every: bool) -> list[ServerRecord]:
    """The servers `stop` ends: all of them, the ones `target` names, or the only one."""
    servers = registry.recorded()
    if every:
        if not servers:
            raise Phi3vError("no phi3v-ort server is running")
        return servers
    if target is None:
        if len(servers) != 1:
            raise Phi3vError("no phi3v-ort server is running" if not servers else
                             f"{len(servers)} servers are running: name one (MODEL or PID, see `phi3v-ort ps`) "
                             "or give --all")
        return servers
    chosen = [r for r in servers if matches(r, target)]
    if not chosen:
        raise Phi3vError(f"no running phi3v-ort server matches {target!r} (`phi3v-ort ps` lists them)")
    return chosen


def stop_server(record: ServerRecord, timeout: float = 30.0) -> None:
    """SIGTERM (the server answers what runs, refuses what waits), then wait for the process to exit."""
    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        registry.remove(record.pid)
        return
    except PermissionError:
        raise Phi3vError(f"cannot stop the server with pid {record.pid}: it belongs to another user") from None
    deadline = time.monotonic() + timeout
    while registry.pid_alive(record.pid):
        if time.monotonic() > deadline:
            raise Phi3vError(f"the server with pid {record.pid} has not exited after {timeout:g} s")
        time.sleep(0.05)
    registry.remove(record.pid)  # it removes its own file; this is for one that could not
