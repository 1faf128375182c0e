"""GET /metrics (issue 23 item 8): Prometheus's text format, one registry per app, counters that move with the
requests, worker gauges and restarts; `--no-metrics` removes it."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
pytest.importorskip("prometheus_client", reason="/metrics needs the serve extra's prometheus_client")
try:
    import httpx2 as httpx  # the maintained successor the openai client itself uses (as tests/server/test_server.py)
except ImportError:
    httpx = pytest.importorskip("httpx", reason="the server tests use httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from phi3v_ort.server.app import create_app  # noqa: E402
from phi3v_ort.workers.pool import WorkerSpec  # noqa: E402
from tests.conftest import Served  # noqa: E402

HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}


def scrape(get) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from one GET /metrics."""
    r = get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def app_client(tiny_dir):
    app = create_app(WorkerSpec(str(tiny_dir)), "tiny")
    yield app, TestClient(app, base_url="http://localhost")
    app.state.pool.close()


def test_counters_move_with_a_request(app_client):
    _, c = app_client
    before = scrape(c.get)
    answer = c.post("/v1/chat/completions", json=HELLO).json()
    streamed = c.post("/v1/chat/completions", json={**HELLO, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200
    assert c.post("/v1/chat/completions", json={**HELLO, "model": "gpt-4o"}).status_code == 404
    assert c.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    assert c.get("/no/such/route/123").status_code == 404
    after = scrape(c.get)

    chat = "/v1/chat/completions"
    assert moved(before, after, "phi3v_http_requests_total", route=chat, status="200") == 2
    assert moved(before, after, "phi3v_http_requests_total", route=chat, status="404") == 1
    assert moved(before, after, "phi3v_http_requests_total", route=chat, status="415") == 1
    assert moved(before, after, "phi3v_http_requests_total", route="other", status="404") == 1
    assert moved(before, after, "phi3v_http_requests_total", route="/metrics", status="200") == 1  # the first
    usage = answer["usage"]
    assert moved(before, after, "phi3v_prompt_tokens_total") == 2 * usage["prompt_tokens"]
    assert moved(before, after, "phi3v_generation_tokens_total") >= usage["completion_tokens"] >= 1
    for histogram in ("phi3v_time_to_first_token_seconds", "phi3v_e2e_request_latency_seconds"):
        assert moved(before, after, histogram + "_count") == 2
        assert moved(before, after, histogram + "_sum") > 0
        assert moved(before, after, histogram + "_bucket", le="+Inf") == 2
    assert after[("phi3v_workers", ())] == 1 and after[("phi3v_workers_alive", ())] == 1
    assert after[("phi3v_workers_busy", ())] == 0 and after[("phi3v_requests_waiting", ())] == 0


def test_a_worker_restart_is_counted(app_client):
    app, c = app_client
    before = scrape(c.get)
    os.kill(app.state.pool.workers[0].info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and moved(before, scrape(c.get), "phi3v_worker_restarts_total") < 1:
        time.sleep(0.2)
    assert moved(before, scrape(c.get), "phi3v_worker_restarts_total") == 1


def test_each_app_has_its_own_registry(tiny_dir, app_client):
    other = create_app(WorkerSpec(str(tiny_dir)), "tiny")  # would raise "Duplicated timeseries" on a shared one
    try:
        assert app_client[0].state.metrics.registry is not other.state.metrics.registry
        fresh = scrape(TestClient(other, base_url="http://localhost").get)
        assert ("phi3v_prompt_tokens_total", ()) in fresh and fresh[("phi3v_prompt_tokens_total", ())] == 0
    finally:
        other.state.pool.close()


def test_the_served_server_exposes_metrics_without_the_api_key(tiny_dir, tmp_path):
    server = Served(tiny_dir, tmp_path, "--api-key", "s3cret")
    off = None
    try:
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        families = {f.name for f in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=10).text)}
        assert {"phi3v_http_requests", "phi3v_time_to_first_token_seconds", "phi3v_e2e_request_latency_seconds",
                "phi3v_prompt_tokens", "phi3v_generation_tokens", "phi3v_requests_waiting", "phi3v_workers_busy",
                "phi3v_worker_restarts"} <= families
        (tmp_path / "off").mkdir()
        off = Served(tiny_dir, tmp_path / "off", "--no-metrics")
        r = httpx.get(off.url + "/metrics", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["message"] == "no route /metrics"
    finally:
        server.stop()
        if off is not None:
            off.stop()
