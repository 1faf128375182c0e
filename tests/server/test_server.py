"""`phi3v-ort serve` with the official openai client on loopback, every bad request, auth, disconnects, load."""

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client")
try:
    import httpx2 as httpx  # the maintained successor the openai client itself uses
except ImportError:
    httpx = pytest.importorskip("httpx", reason="the server tests use httpx")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from phi3v_ort.cli import cli  # noqa: E402
from phi3v_ort.server.app import ServerLimits, create_app  # noqa: E402
from phi3v_ort.workers.pool import WorkerSpec  # noqa: E402


MODEL = "tiny-int4-cpu"  # the id a server of the fixture's folder serves (its folder's name); others are a 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def server(served):
    """`phi3v-ort serve --workers 2 --max-queue 8` on the fixture, shared with other modules (conftest.py)."""
    return served.url, served.proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user(text, *images):
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": data_uri(p)}} for p in images]}


def run_json(tiny_dir, question, images, max_tokens):
    args = ["run", "--model-dir", str(tiny_dir), "--json", "--max-new-tokens", str(max_tokens)]
    for p in images:
        args += ["-i", str(p)]
    result = CliRunner().invoke(cli, [*args, question])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("n_images", [1, 2])
def test_answers_equal_phi3v_ort_run(client, tiny_dir, png, n_images):
    images = [png(640, 400, seed=1), png(300, 700, seed=2)][:n_images]
    question = "What is difference in this two images?" if n_images == 2 else "Describe the chart."
    expected = run_json(tiny_dir, question, images, 12)
    response = client.chat.completions.create(model=MODEL, messages=[user(question, *images)], max_tokens=12)
    assert response.choices[0].message.content == expected["text"]
    assert response.choices[0].finish_reason == expected["finish_reason"]
    assert response.usage.prompt_tokens == expected["prompt_tokens"]
    assert response.usage.completion_tokens == len(expected["token_ids"])
    chunks = list(client.chat.completions.create(model=MODEL, messages=[user(question, *images)], max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected["finish_reason"]
    assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-int4-cpu"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_follow_up_reuses_the_kept_generator(server, png):
    image = png(600, 900, seed=5)
    first = [user("Help me get the title and author information of this book?", image)]
    r1 = httpx.post(server[0] + "/v1/chat/completions", json={"messages": first, "max_tokens": 6}, timeout=60)
    answer = r1.json()["choices"][0]["message"]["content"]
    follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the author?"}]
    r2 = httpx.post(server[0] + "/v1/chat/completions", json={"messages": follow, "max_tokens": 6}, timeout=60)
    assert r2.headers["x-phi3v-kv-reused"] == "true"  # only the new turn was prefilled (the worker's own count:
    # tests/server/test_server_workers.py); usage counts the whole conversation, as OpenAI does
    # The same request again finds no kept generator (r2 took it and now holds the longer transcript): a full
    # re-prefill. It re-tokenizes the answer text, so on random weights its answer may differ from r2's, which
    # continued on the exact generated ids (tests/engine/test_conversation.py proves those equal a fresh prefill).
    r3 = httpx.post(server[0] + "/v1/chat/completions", json={"messages": follow, "max_tokens": 6}, timeout=60)
    assert r3.headers["x-phi3v-kv-reused"] == "false"
    assert r3.json()["usage"]["prompt_tokens"] == r2.json()["usage"]["prompt_tokens"] > 1921


def test_disconnect_mid_stream_frees_the_generation(server):
    url = server[0]
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Tell me a very long story."}],
                            "max_tokens": 7000, "stream": True}) as response:
        lines = response.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any('"content"' in line for line in seen)
    deadline = time.time() + 20
    while time.time() < deadline and httpx.get(url + "/health").json()["running"]:
        time.sleep(0.1)
    assert httpx.get(url + "/health").json()["running"] == 0
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_bounded_load(server):
    """64 concurrent streaming clients for at most 30 s: each succeeds or gets 429; memory comes back; still up."""
    url, proc = server
    body = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 24, "stream": True}
    httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
    baseline = _rss(proc.pid)
    outcomes, lock = [], threading.Lock()
    stop_at = time.time() + 30

    def one():
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=35) as r:
                text = "".join(r.iter_text())
                ok = r.status_code == 200 and text.rstrip().endswith("data: [DONE]")
                result = "ok" if ok else ("429" if r.status_code == 429 and r.headers.get("retry-after") else
                                          f"bad {r.status_code}")
        except httpx.HTTPError as exc:
            result = f"error {exc!r}"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.1, stop_at - time.time()))
    assert all(not t.is_alive() for t in threads), "clients still running after 30 s"
    assert len(outcomes) == 64 and set(outcomes) <= {"ok", "429"}, set(outcomes)
    assert outcomes.count("ok") >= 10 and outcomes.count("429") >= 1  # the queue bound was really hit
    time.sleep(1)
    assert httpx.get(url + "/health").json()["running"] == 0
    assert _rss(proc.pid) < baseline + 200 * 2**20, (baseline, _rss(proc.pid))
    r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 200


# -- bad requests, in process (Starlette's test client) -----------------------------------------------------------

@pytest.fixture(scope="module")
def app_client(tiny_dir):
    limits = ServerLimits(max_body_bytes=2 * 2**20, max_images=2, max_image_bytes=1 * 2**20)
    app = create_app(WorkerSpec(str(tiny_dir)), "tiny", limits=limits)
    yield TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    app.state.pool.close()


def _post(c, body, **kw):
    if isinstance(body, (dict, list)):
        return c.post("/v1/chat/completions", json=body, **kw)
    return c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}, **kw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _png_bytes(w=64, h=48):
    import io

    out = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


BAD = {
    "malformed json": (b"{not json", 400, "not valid JSON"),
    "not an object": ([1, 2], 400, "JSON object"),
    "no messages": ({"messages": []}, 400, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    "missing content": ({"messages": [{"role": "user"}]}, 400, "no content"),
    "assistant last": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                       400, "last message"),
    "bad base64": ({"messages": [{"role": "user", "content": [_image_part("data:image/png;base64,@@@")]}]},
                   400, "base64"),
    "not an image": ({"messages": [{"role": "user", "content": [
        _image_part("data:image/png;base64," + _b64(b"hello, I am text"))]}]}, 400, "not an image"),
    "too many images": ({"messages": [{"role": "user", "content": [
        _image_part("data:image/png;base64," + _b64(_png_bytes()))] * 3}]}, 400, "too many images"),
    "remote disabled": ({"messages": [{"role": "user", "content": [_image_part("http://127.0.0.1:1/a.png")]}]},
                        400, "remote image URLs are disabled"),
    "bad max_tokens": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    "bad part type": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "unsupported type"),
    "beyond context": ({"messages": [{"role": "user", "content": "hello " * 9000}]}, 400,
                       "maximum context length is 8192"),
    "body too large": (b'{"messages": "' + b"x" * (3 * 2**20) + b'"}', 413, "larger than"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests(app_client, case):
    body, status, needle = BAD[case]
    r = _post(app_client, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"]


def test_bad_image_tag_is_refused_before_the_stream_starts(app_client):
    """The prompt is built in the HTTP process, so a bad tag is a plain 400, streaming or not (never a native
    index error in a worker)."""
    for where in ({"role": "user", "content": "<|image_3|> what?"},
                  {"role": "system", "content": "see <|image_1|>"}):
        messages = [where] if where["role"] == "user" else [where, {"role": "user", "content": "hi"}]
        r = _post(app_client, {"messages": messages, "stream": True})
        assert r.status_code == 400 and "image tag" in r.json()["error"]["message"], r.text


def test_remote_images_never_reach_private_addresses(tiny_dir):
    app = create_app(WorkerSpec(str(tiny_dir)), "tiny", allow_remote_images=True)
    c = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    for url in ("http://127.0.0.1:9/a.png", "http://169.254.169.254/latest", "http://10.0.0.1/x.png",
                "http://localhost/x.png", "http://[::1]/x.png"):
        r = _post(c, {"messages": [{"role": "user", "content": [_image_part(url)]}]})
        assert r.status_code == 400 and "not allowed" in r.json()["error"]["message"], url
    app.state.pool.close()


def test_auth(tiny_dir):
    app = create_app(WorkerSpec(str(tiny_dir)), "tiny", api_key="s3cret")
    c = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _post(c, body).status_code == 401
    assert _post(c, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(c, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/v1/models").status_code == 401
    assert c.get("/health").status_code == 200
    app.state.pool.close()


def test_unknown_route_is_json(app_client):
    r = app_client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert app_client.get("/v1/chat/completions").status_code == 405


def test_sigterm_shuts_down_cleanly(tiny_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "phi3v_ort", "serve", "--model-dir", str(tiny_dir), "--port",
                             str(port), "--max-tokens-limit", "8192"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    got = {}

    def long_request():
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "story"}], "max_tokens": 7000,
                                "stream": True}) as r:
            got["text"] = "".join(r.iter_text())

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    proc.send_signal(15)
    proc.wait(timeout=30)
    t.join(timeout=30)
    err = proc.stderr.read().decode()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught so the exit status says why it stopped
    assert proc.returncode in (0, -15), err[-2000:]
    assert "Traceback" not in err
    assert "data:" in got.get("text", "")  # the in-flight stream was served (finished or cut at the deadline)


def test_stop_string_cuts_the_answer(app_client, tiny_dir):
    full = _post(app_client, {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 12}).json()
    text = full["choices"][0]["message"]["content"]
    stop = text.split()[2]  # a word from the middle of the greedy answer
    r = _post(app_client, {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 12,
                           "stop": [stop]}).json()
    assert r["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    assert 0 < r["usage"]["completion_tokens"] < 12 and r["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"]


# -- every refused field of issue 12, through the server (the parser's own matrix: tests/server/test_openai_request.py) ---

def _field_cases():
    from tests.server.test_openai_request import BAD_FIELDS

    return BAD_FIELDS


@pytest.mark.parametrize("extra, param", _field_cases())
def test_refused_fields_through_the_server(app_client, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    try:
        r = _post(app_client, json.dumps(body, allow_nan=False).encode())
        named = True
    except ValueError:  # NaN / Infinity: not JSON at all, so the body itself is refused before any field
        r = _post(app_client, json.dumps(body).encode())
        named = False
    assert r.status_code == 400, (extra, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param if named else "not valid JSON" in error["message"]


def test_deep_json_and_huge_seed_through_the_server(app_client):
    assert _post(app_client, b"[" * 100_000).status_code == 400
    r = _post(app_client, {"messages": [{"role": "user", "content": "hi"}], "seed": 4294967296})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
