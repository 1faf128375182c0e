"""A server's activity: requests in flight and the time of the last one, for `serve --idle-exit` and `ps`.

`Activity` is ASGI middleware added around the app (`app.add_middleware(Activity, ...)` before it starts):
every HTTP request except GET /health (what `ps`, `run --server auto` and load balancers poll) counts. The
idle-exit watcher ends the server the way SIGTERM does (queued requests answered, running ones finished) once no
request has been in flight for the given time.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable

from phi3v_ort.errors import Phi3vError

DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, option: str = "DURATION") -> float:
    """'30s', '5m', '1h', '1h30m', '250ms' or plain seconds ('90') -> seconds (above 0)."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise Phi3vError(f"{option} must be a duration such as 30s, 5m or 1h, got {text!r}") from None
        seconds = sum(float(n) * UNIT_S[u] for n, u in parts)
    if not 0 < seconds < float("inf"):
        raise Phi3vError(f"{option} must be above 0, got {text!r}")
    return seconds


class ActivityState:
    """What the middleware counts (shared with the watcher thread and whoever records the last request)."""

    def __init__(self, on_request_end: Callable[[], None] | None = None):
        self.lock = threading.Lock()
        self.in_flight = 0
        self.last = time.monotonic()  # the server's start counts as activity
        self.on_request_end = on_request_end

    def idle_s(self) -> float:
        """How long nothing has been in flight (0 while a request runs)."""
        with self.lock:
            return 0.0 if self.in_flight else time.monotonic() - self.last


class Activity:
    """ASGI middleware: counts the requests that keep a server busy (all but GET /health)."""

    def __init__(self, app, state: ActivityState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health":
            await self.app(scope, receive, send)
            return
        with self.state.lock:
            self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            with self.state.lock:
                self.state.in_flight -= 1
                self.state.last = time.monotonic()
            if self.state.on_request_end is not None:
                try:
                    self.state.on_request_end()
                except OSError:  # a state folder that went away never fails a request
                    pass


def exit_when_idle(state: ActivityState, idle_s: float, stop: Callable[[], None] | None = None) -> threading.Thread:
    """A daemon thread that calls `stop` (default: SIGTERM to this process, the graceful path) once the server
    has been idle for `idle_s`."""
    stop = stop or (lambda: os.kill(os.getpid(), signal.SIGTERM))
    tick = min(1.0, max(0.05, idle_s / 10))

    def watch() -> None:
        while state.idle_s() < idle_s:
            time.sleep(tick)
        stop()

    thread = threading.Thread(target=watch, name="idle-exit", daemon=True)
    thread.start()
    return thread
