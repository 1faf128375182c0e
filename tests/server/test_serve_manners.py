"""`phi3v-ort serve`'s manners: one access-log line per request on stderr (off with --quiet), a port in use is one
sentence before anything starts, and the web page at / is self-contained."""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
try:
    import httpx2 as httpx  # the maintained successor the openai client itself uses (as tests/server/test_server.py)
except ImportError:
    httpx = pytest.importorskip("httpx", reason="the server tests use httpx")

from tests.conftest import Served  # noqa: E402

CHART_URI = "data:image/png;base64," + base64.b64encode((Path(__file__).parents[1] / "data" / "chart.png").read_bytes()).decode()
LINE = re.compile(r'^(?P<client>\S+) "(?P<method>[A-Z]+) (?P<path>\S+)" (?P<status>\d{3}) '
                  r"prompt_tokens=(?P<prompt>\d+|-) completion_tokens=(?P<completion>\d+|-) "
                  r"ttft_ms=(?P<ttft>\d+|-) total_ms=(?P<total>\d+)$")


def _log_lines(server: Served, path: str, count: int, after: int, timeout: float = 10.0) -> list[dict]:
    """The access-log lines for `path` after the first `after` lines of the log (a line is written once its
    response has ended, so a streamed one may come a moment after the client saw [DONE])."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [LINE.match(line) for line in server.stderr().splitlines()[after:]]
        found = [m.groupdict() for m in lines if m and m["path"] == path]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_one_access_log_line_per_request(served):
    http = httpx.Client(base_url=served.url, timeout=60)
    after = len(served.stderr().splitlines())
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the chart."},
                                                      {"type": "image_url", "image_url": {"url": CHART_URI}}]}],
            "max_tokens": 5}
    plain = http.post("/v1/chat/completions", json=body)
    assert plain.status_code == 200 and plain.headers["x-phi3v-image-tokens"] == "1921"
    usage = plain.json()["usage"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.headers["x-phi3v-image-tokens"] == "1921"
        assert "".join(r.iter_text()).rstrip().endswith("data: [DONE]")
    assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    assert http.get("/health").status_code == 200
    assert http.get("/nowhere").status_code == 404

    chats = _log_lines(served, "/v1/chat/completions", 3, after)
    assert len(chats) == 3, served.stderr()[-2000:]
    for line in chats[:2]:  # the plain answer, then the stream
        assert (line["client"], line["method"], line["status"]) == ("127.0.0.1", "POST", "200")
        assert (int(line["prompt"]), int(line["completion"])) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert line["ttft"] != "-" and 0 <= int(line["ttft"]) <= int(line["total"])
    refused = chats[2]
    assert (refused["status"], refused["prompt"], refused["completion"], refused["ttft"]) == ("400", "-", "-", "-")
    health = _log_lines(served, "/health", 1, after)
    assert health and health[-1]["status"] == "200" and health[-1]["prompt"] == "-"
    assert _log_lines(served, "/nowhere", 1, after)[0]["status"] == "404"
    assert "Traceback" not in served.stderr()


def test_the_page_is_served_self_contained(served):
    r = httpx.get(served.url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    assert "<script>" in page and "<style>" in page and "New conversation" in page and 'id="apikey"' in page
    assert "/v1/chat/completions" in page and "tiny-int4-cpu" in page
    # nothing from elsewhere: no src/href to another origin, no import, no CDN
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads something from elsewhere"
    assert "import(" not in page and "<link" not in page


def test_port_in_use_is_one_line_before_anything_starts(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "phi3v_ort", "serve", "--model-dir", str(tiny_dir), "--port",
                               str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == (f"Error: port {port} on 127.0.0.1 is already in use: stop what is listening there, or "
                           "choose another --port\n")
    assert "serving" not in proc.stderr and time.monotonic() - started < 30  # no worker was started


def test_quiet_serves_without_an_access_log(tiny_dir, tmp_path):
    server = Served(tiny_dir, tmp_path, "--workers", "1", "--quiet")
    try:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
        time.sleep(0.3)
        lines = server.stderr().splitlines()
        assert len(lines) == 1 and lines[0].startswith("serving tiny-int4-cpu (cpu, 1 worker(s)"), lines
        assert lines[0].endswith(f"on {server.url}/v1 (web page: {server.url}/)")
    finally:
        server.stop()
