"""GET /metrics: the server's figures in Prometheus's text format (prometheus_client), named as vLLM's and
llama.cpp's servers name theirs, with the prefix `phi3v_`:

- phi3v_http_requests_total{route, status}: every HTTP request once it has ended (a path that is no route counts
  as route "other", so a scan cannot grow the label set);
- phi3v_time_to_first_token_seconds, phi3v_e2e_request_latency_seconds: histograms of the chat completions that
  ran on a worker (first token: from the request's arrival; end to end: until its response ended);
- phi3v_prompt_tokens_total, phi3v_generation_tokens_total: the tokens of those completions (the whole
  conversation's prompt, as usage counts it);
- phi3v_requests_waiting, phi3v_requests_running, phi3v_workers, phi3v_workers_alive, phi3v_workers_busy (gauges)
  and phi3v_worker_restarts_total: read from the service when scraped.

Each app has its own registry (not prometheus_client's global one), so a process can hold many apps (tests do).
/metrics is open, as vLLM leaves it and as /health is: `--api-key` guards /v1 only; `--no-metrics` removes it.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

from phi3v_ort.server.access_log import LOG_KEY

CHAT_ROUTE = "/v1/chat/completions"
# seconds; vLLM's buckets, cut to what a CPU prefill of a few crops (seconds) to a GPU decode (milliseconds) spans
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class ServiceCollector:
    """The service's state as gauges and the workers' restarts as a counter, read at each scrape."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        service = self.service
        workers = service.pool.health()
        for name, doc, value in (
                ("phi3v_requests_waiting", "Requests waiting for a worker.", service.waiting),
                ("phi3v_requests_running", "Requests a worker is answering.", len(service.active)),
                ("phi3v_workers", "Model worker processes.", len(workers)),
                ("phi3v_workers_alive", "Model workers alive.", sum(w["alive"] for w in workers)),
                ("phi3v_workers_busy", "Model workers generating.", sum(w["busy"] for w in workers))):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("phi3v_worker_restarts", "Model workers restarted after dying.",
                                  value=sum(w["restarts"] for w in workers))


class ServerMetrics:
    """One app's metrics, in a registry of its own."""

    def __init__(self, service, routes: set[str]):
        self.routes = routes
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("phi3v_http_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=r)
        self.ttft = Histogram("phi3v_time_to_first_token_seconds", "Time to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("phi3v_e2e_request_latency_seconds", "A chat completion from arrival to its end.",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("phi3v_prompt_tokens", "Prompt tokens of answered requests.", registry=r)
        self.generation_tokens = Counter("phi3v_generation_tokens", "Tokens generated.", registry=r)
        r.register(ServiceCollector(service))

    def observe(self, path: str, status: int, record: dict, ended: float) -> None:
        """One HTTP request that has ended; `record`: what the chat route left (access_log.LOG_KEY)."""
        route = path if path in self.routes else "other"
        self.requests.labels(route=route, status=str(status)).inc()
        if route != CHAT_ROUTE or record.get("completion_tokens") is None:
            return  # never reached a worker
        self.prompt_tokens.inc(record.get("prompt_tokens") or 0)
        self.generation_tokens.inc(record["completion_tokens"])
        if record.get("first_token") is not None:
            self.ttft.observe(record["first_token"] - record["started"])
        self.e2e.observe(ended - record["started"])

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """ASGI middleware: hands each ended HTTP request to ServerMetrics.observe (a client gone first: 499)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = scope.setdefault(LOG_KEY, {"started": time.perf_counter()})
        status: list[int] = []

        async def send_seen(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        except Exception:
            status.append(500)
            raise
        finally:
            self.metrics.observe(scope.get("path", ""), status[0] if status else 499, record, time.perf_counter())
