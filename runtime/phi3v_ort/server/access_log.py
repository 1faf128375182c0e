"""The server's access log: one line per HTTP request on stderr, written when its response has ended."""

from __future__ import annotations

import sys
import time

LOG_KEY = "phi3v.log"  # the scope entry where a route leaves what the access log reports (tokens, first token)


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
        record = scope[LOG_KEY] = {"started": started}
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
        line = (f"{client[0] if client else '-'} \"{scope.get('method', '-')} {path}\" {status} "
                f"prompt_tokens={figure('prompt_tokens')} completion_tokens={figure('completion_tokens')} "
                f"ttft_ms={ttft} total_ms={total_s * 1000:.0f}")
        try:
            print(line, file=self.stream or sys.stderr, flush=True)
        except (OSError, ValueError):  # a closed or broken stderr never fails a request
            pass
