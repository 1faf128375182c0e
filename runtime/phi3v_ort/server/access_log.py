"""The server's access log: one line per HTTP request on stderr, written when its response has ended.

What the client chose (method, path, query) is escaped before it is written: a `%0a` in a path would otherwise
write a line of the client's making, and `%1b[` would send escape sequences to the operator's terminal. Control
and other unprintable characters (and spaces) become `\\xHH` / `\\uHHHH`, `"` and `\\` get a backslash (nginx's
manner), so a request is always exactly one line whose quoted part ends where it seems to.
"""

from __future__ import annotations

import sys
import time

LOG_KEY = "phi3v.log"  # the scope entry where a route leaves what the access log reports (tokens, first token)


def escape(text: str) -> str:
    """`text` safe for one log line and one field of it: unprintable characters and spaces as `\\xHH` / `\\uHHHH`,
    `"` and `\\` escaped."""
    if text.isprintable() and not any(c in text for c in '"\\ '):
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c.isprintable() and c != " ":
            out.append(c)
        else:
            code = ord(c)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class AccessLog:
    """ASGI middleware: one line per HTTP request on `stream`, once its response has ended (a stream included):
    `CLIENT "METHOD PATH" STATUS prompt_tokens=P completion_tokens=C ttft_ms=T total_ms=D` (`-` where a request
    has no such figure). The chat route fills scope[LOG_KEY]; a client gone before any response logs 499."""

    def __init__(self, app, stream=None):
        self.app, self.stream = app, stream

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = scope.setdefault(LOG_KEY, {"started": started})  # shared with metrics.MetricsMiddleware
        status: list[int] = []

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception:
            if not status:
                status.append(500)  # Starlette's ServerErrorMiddleware, outside this one, answers it
            raise
        finally:
            self.write(scope, status[0] if status else 499, record, time.perf_counter() - started)

    def write(self, scope, status: int, record: dict, total_s: float) -> None:
        client = scope.get("client")
        path = scope.get("path", "")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")

        def figure(key: str) -> str:
            value = record.get(key)
            return "-" if value is None else str(value)

        first = record.get("first_token")
        ttft = "-" if first is None else f"{(first - record['started']) * 1000:.0f}"
        method = escape(scope.get("method", "-"))
        line = (f"{escape(client[0]) if client else '-'} \"{method} {escape(path)}\" {status} "
                f"prompt_tokens={figure('prompt_tokens')} completion_tokens={figure('completion_tokens')} "
                f"ttft_ms={ttft} total_ms={total_s * 1000:.0f}")
        try:
            print(line, file=self.stream or sys.stderr, flush=True)
        except (OSError, ValueError):  # a closed or broken stderr never fails a request
            pass
