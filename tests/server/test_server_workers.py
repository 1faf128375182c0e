"""The server over its model worker processes, end to end on loopback: /health stays free during prefills,
disconnects cancel in the worker, a kill -9'd worker fails only its request, SIGTERM drains the queue with 503s,
context_length_exceeded, stop strings across tokens, follow-up routing, --threads, odd images.

Servers here are started with a tiny launcher (`python -c LAUNCHER`) instead of `phi3v-ort serve`, because
`WorkerSpec.prefill_delay_s` (a slow prefill, to observe) is not a CLI option. The launcher also records the
worker's own end-of-request summary (worker index, tokens generated, cancelled) per request id in a JSONL file,
so a test can see what happened inside the worker, not only what the HTTP side says: the tiny model decodes
7000 tokens in about 2 s, so "the worker was idle again within 2 s" alone would not prove a cancel.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
try:
    import httpx2 as httpx  # the maintained successor the openai client itself uses
except ImportError:
    httpx = pytest.importorskip("httpx", reason="the server tests use httpx")

from PIL import Image  # noqa: E402

from phi3v_ort.workers.pool import Worker, WorkerSpec  # noqa: E402
from tests.server.test_server import _free_port, data_uri  # noqa: E402

CONTEXT = 8192  # the fixture's context_length

LAUNCHER = r"""
import json, sys, threading
from phi3v_ort.server.app import ServerLimits, create_app, serve_forever
from dataclasses import asdict
from phi3v_ort.workers.pool import Worker, WorkerPool, WorkerSpec
from phi3v_ort.workers.protocol import End

model_dir, port, workers, delay, grace, log = sys.argv[1:7]
lock = threading.Lock()
submit = Worker.submit

def submit_and_log(self, job, callback):
    def relay(item):
        if isinstance(item, End):
            with lock, open(log, "a") as f:
                f.write(json.dumps({"worker": self.index, "request_id": job.request_id, **asdict(item.summary)}) + "\n")
        callback(item)
    submit(self, job, relay)

Worker.submit = submit_and_log
pool = WorkerPool(WorkerSpec(model_dir, "cpu", threads=1, prefill_delay_s=float(delay)), int(workers)).start()
app = create_app(pool, "tiny", limits=ServerLimits(grace_s=float(grace), max_tokens_limit=8192))
serve_forever(app, "127.0.0.1", int(port), float(grace))
"""


class Server:
    """A real uvicorn server in a subprocess, over `workers` worker processes."""

    def __init__(self, tiny_dir: Path, folder: Path, workers: int, delay: float = 0.0, grace: float = 10.0):
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "ends.jsonl"
        self.stderr_path = folder / "stderr.txt"
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tiny_dir), port, str(workers),
                                          str(delay), str(grace), str(self.log)],
                                         stdout=subprocess.DEVNULL, stderr=err)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.http.get("/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        pytest.fail("the server did not start: " + self.stderr()[-3000:])

    def health(self) -> dict:
        return self.http.get("/health", timeout=5).json()

    def wait_health(self, check, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if check(h):
                return h
            if time.monotonic() > deadline:
                pytest.fail(f"waited {timeout} s for {what}: {h}")
            time.sleep(0.02)

    def ends(self) -> list[dict]:
        """The workers' end-of-request summaries, in order."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines(keepends=True)
        return [json.loads(line) for line in lines if line.endswith("\n")]  # not a line still being written

    def end_of(self, request_id: str | None = None, after: int = 0, timeout: float = 2.0) -> dict:
        """The summary of `request_id` (or the first one after the `after` first), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            ends = self.ends()[after:]
            found = [e for e in ends if request_id is None or e["request_id"] == request_id]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                pytest.fail(f"no end summary for {request_id or 'the request'}: {ends}")
            time.sleep(0.02)

    def chat(self, messages, **fields) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"messages": messages, **fields})

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def srv(tiny_dir, tmp_path_factory):
    """Two workers, no delay: shared by the tests that do not need a slow prefill or their own process."""
    server = Server(tiny_dir, tmp_path_factory.mktemp("srv"), workers=2)
    yield server
    server.stop()


def text_message(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def image_message(text: str, uri: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": uri}}]}]


def sse_data(lines) -> list[str]:
    """The payloads of `data:` lines of an SSE body."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def deltas_of(payloads: list[str]) -> list[str]:
    out = []
    for p in payloads:
        if p == "[DONE]":
            continue
        chunk = json.loads(p)
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content"):
                out.append(choice["delta"]["content"])
    return out


def finish_of(payloads: list[str]) -> str | None:
    finishes = [c["finish_reason"] for p in payloads if p != "[DONE]"
                for c in json.loads(p).get("choices", []) if c["finish_reason"]]
    return finishes[-1] if finishes else None


def assert_openai_error(body: dict, type_: str) -> dict:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == type_ and body["error"]["message"], body
    return body["error"]


# -- 1. /health is never stuck behind a prefill -------------------------------------------------------------------

def test_health_answers_fast_while_every_worker_prefills(tiny_dir, tmp_path, png):
    server = Server(tiny_dir, tmp_path / "slow", workers=2, delay=3.0)
    try:
        uris = [data_uri(png(640, 400, seed=1)), data_uri(png(300, 700, seed=2))]
        statuses: list[int] = []

        def ask(uri):
            statuses.append(httpx.post(server.url + "/v1/chat/completions", timeout=60,
                                       json={"messages": image_message("Describe.", uri), "max_tokens": 4}
                                       ).status_code)

        threads = [threading.Thread(target=ask, args=(u,)) for u in uris]
        for t in threads:
            t.start()
        server.wait_health(lambda h: h["busy"] == 2, 10, "both workers busy")
        # both jobs are now in the workers' 3 s prefill: poll /health through it
        times, reports = [], []
        with httpx.Client(base_url=server.url, timeout=5) as c:
            for _ in range(25):
                t0 = time.perf_counter()
                r = c.get("/health")
                times.append(time.perf_counter() - t0)
                reports.append(r.json())
                time.sleep(0.04)
        for t in threads:
            t.join(timeout=30)
        assert statuses == [200, 200]
        # every poll fell inside the prefill: both workers were busy in each report
        assert all(r["busy"] == 2 and all(w["busy"] and w["alive"] for w in r["workers"]) for r in reports), \
            reports
        times.sort()
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        assert p99 < 0.100, f"/health p99 {p99 * 1000:.0f} ms while both workers prefill: {times}"
    finally:
        server.stop()


# -- 2. a client that goes away cancels its generation in the worker ---------------------------------------------

def test_disconnect_mid_stream_cancels_in_the_worker(srv):
    story = text_message("Tell me a very long story.")
    with srv.http.stream("POST", "/v1/chat/completions",
                         json={"messages": story, "max_tokens": 7000, "stream": True}) as r:
        payloads = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[6:])
            if len(deltas_of(payloads)) >= 3:
                break
        request_id = json.loads(payloads[0])["id"]
    closed = time.monotonic()
    srv.wait_health(lambda h: h["busy"] == 0 and h["running"] == 0, 2.0, "the worker idle after the disconnect")
    assert time.monotonic() - closed < 2.0
    end = srv.end_of(request_id)
    assert end["cancelled"] and end["generated"] < 7000, end  # the worker stopped; it did not run to the end
    r2 = srv.chat(text_message("hi"), max_tokens=2)
    assert r2.status_code == 200 and r2.json()["choices"][0]["finish_reason"] == "length"


def test_disconnect_of_a_non_streaming_request_cancels_in_the_worker(srv):
    """The answer streams out of the worker without a pause: the disconnect must still be noticed mid-decode
    (not only when the worker goes quiet for a while, which for a long answer is at its very end)."""
    before = len(srv.ends())
    with pytest.raises(httpx.TimeoutException):
        srv.http.post("/v1/chat/completions", timeout=0.6,  # decoding 7000 tokens takes ~2 s here
                      json={"messages": text_message("Tell me a very long story."), "max_tokens": 7000})
    closed = time.monotonic()
    srv.wait_health(lambda h: h["busy"] == 0 and h["running"] == 0, 2.0, "the worker idle after the disconnect")
    assert time.monotonic() - closed < 2.0
    end = srv.end_of(after=before)
    assert end["cancelled"] and end["generated"] < 7000, end
    assert srv.chat(text_message("hi"), max_tokens=2).status_code == 200


# -- 3. kill -9 of a worker fails only its request ---------------------------------------------------------------

def _all_alive(h: dict) -> bool:
    return h["alive"] == len(h["workers"]) and h["busy"] == 0


def test_worker_killed_mid_stream_gets_an_error_event_then_done_and_restarts(srv):
    srv.wait_health(_all_alive, 15, "all workers alive and idle")
    restarts_before = {w["index"]: w["restarts"] for w in srv.health()["workers"]}
    with srv.http.stream("POST", "/v1/chat/completions",
                         json={"messages": text_message("Tell me a very long story."), "max_tokens": 7000,
                               "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        payloads = []
        while not deltas_of(payloads):
            line = next(lines)
            if line.startswith("data: "):
                payloads.append(line[6:])
        busy = [w for w in srv.health()["workers"] if w["busy"]]
        assert len(busy) == 1, busy
        victim = busy[0]
        os.kill(victim["pid"], signal.SIGKILL)
        payloads += sse_data(lines)  # the rest of the stream, to its end
    assert payloads[-1] == "[DONE]", payloads[-3:]
    error = assert_openai_error(json.loads(payloads[-2]), "server_error")
    assert "signal 9" in error["message"], error
    assert finish_of(payloads) is None  # no normal ending was made up for the cut answer

    h = srv.wait_health(_all_alive, 20, "the killed worker restarted")
    worker = h["workers"][victim["index"]]
    assert worker["restarts"] >= restarts_before[victim["index"]] + 1 and worker["pid"] != victim["pid"]
    assert "signal 9" in worker["last_exit"], worker
    assert srv.chat(text_message("hi"), max_tokens=3).status_code == 200


def test_worker_killed_during_a_non_streaming_request_is_a_500(srv):
    srv.wait_health(_all_alive, 20, "all workers alive and idle")
    got = {}

    def ask():
        got["r"] = srv.http.post("/v1/chat/completions", timeout=30,
                                 json={"messages": text_message("Tell me a very long story."), "max_tokens": 7000})

    t = threading.Thread(target=ask)
    t.start()
    h = srv.wait_health(lambda h: h["busy"] == 1, 5, "the request on a worker")
    victim = next(w for w in h["workers"] if w["busy"])
    os.kill(victim["pid"], signal.SIGKILL)
    t.join(timeout=30)
    r = got["r"]
    assert r.status_code == 500, r.text
    error = assert_openai_error(r.json(), "server_error")
    assert "signal 9" in error["message"]
    srv.wait_health(_all_alive, 20, "the killed worker restarted")
    assert srv.chat(text_message("hi"), max_tokens=3).status_code == 200


# -- 4. SIGTERM: the queue gets 503s at once, the running answer finishes ----------------------------------------

def test_sigterm_drains_the_queue_with_503s_and_finishes_the_running_answer(tiny_dir, tmp_path):
    server = Server(tiny_dir, tmp_path / "term", workers=1, delay=2.0, grace=10.0)
    results: dict[int, tuple] = {}

    def ask(i: int, stream: bool):
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                              json={"messages": text_message(f"Question {i}?"), "max_tokens": 16,
                                    "stream": stream}) as r:
                body = r.read().decode()
                results[i] = (r.status_code, r.headers.get("content-type", ""), body, time.monotonic())
        except httpx.HTTPError as exc:
            results[i] = ("error", "", repr(exc), time.monotonic())

    try:
        first = threading.Thread(target=ask, args=(0, True))
        first.start()
        server.wait_health(lambda h: h["busy"] == 1, 10, "the first request on the worker")
        queued = [threading.Thread(target=ask, args=(i, i != 2)) for i in (1, 2, 3)]  # 2 streaming, 1 not
        for t in queued:
            t.start()
        server.wait_health(lambda h: h["waiting"] == 3, 10, "three requests queued")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for t in [first, *queued]:
            t.join(timeout=15)
        try:
            server.proc.wait(timeout=15 - (time.monotonic() - signalled))
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not exit within 15 s of SIGTERM")
    finally:
        server.stop()

    status, ctype, body, _ = results[0]
    assert status == 200 and ctype.startswith("text/event-stream"), results[0]
    payloads = sse_data(body.splitlines())
    assert payloads[-1] == "[DONE]" and finish_of(payloads) == "length", body[-500:]
    assert not any('"error"' in p for p in payloads), body[-500:]
    for i in (1, 2, 3):
        status, ctype, body, ended = results[i]
        assert status == 503 and ctype.startswith("application/json"), results[i]
        error = assert_openai_error(json.loads(body), "server_error")
        assert "shutting down" in error["message"]
        assert ended - signalled < 1.0, f"request {i} got its 503 {ended - signalled:.2f} s after SIGTERM"
    assert server.proc.returncode in (0, -signal.SIGTERM), server.stderr()[-2000:]
    assert "Traceback" not in server.stderr(), server.stderr()[-3000:]


# -- 5. context_length_exceeded ------------------------------------------------------------------------------------

def _history(pairs: int, words: int = 250) -> list[dict]:
    messages = []
    for i in range(pairs):
        messages += [{"role": "user", "content": f"Turn {i}: " + "hello " * words},
                     {"role": "assistant", "content": f"Answer {i}: " + "hello " * words}]
    return messages


def _requested(message: str) -> tuple[int, int, int]:
    m = re.search(r"maximum context length is (\d+) tokens\. However, you requested (\d+) tokens "
                  r"\((\d+) in the messages, (\d+) in the completion\)", message)
    assert m, message
    allowed, requested, prompt, completion = map(int, m.groups())
    assert allowed == CONTEXT and requested == prompt + completion, message
    return requested, prompt, completion


def test_context_length_exceeded(srv):
    # the prompt size of a conversation grows by the same count per (identical) pair: measure it on ones that fit
    question = [{"role": "user", "content": "And now?"}]
    sizes = {}
    for pairs in (2, 3):
        r = srv.chat(_history(pairs) + question, max_tokens=2)
        assert r.status_code == 200, r.text
        assert r.headers["x-phi3v-kv-reused"] == "false"
        sizes[pairs] = r.json()["usage"]["prompt_tokens"]
    per_pair = sizes[3] - sizes[2]
    assert 900 <= per_pair <= 1100  # ~1,000 tokens of history per pair, as meant
    expected_prompt = sizes[3] + 7 * per_pair  # 10 pairs

    r = srv.chat(_history(10) + question)  # no max_tokens: refused for the messages alone
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    requested, prompt, completion = _requested(error["message"])
    assert prompt == expected_prompt > CONTEXT and requested > CONTEXT

    # messages that fit, and an explicit max_tokens one token too many
    small = sizes[2]
    r = srv.chat(_history(2) + question, max_tokens=CONTEXT - small + 1)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert _requested(r.json()["error"]["message"]) == (CONTEXT + 1, small, CONTEXT - small + 1)

    # exactly the context: answered, to the last token
    r = srv.chat(_history(2) + question, max_tokens=CONTEXT - small)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == small and usage["total_tokens"] <= CONTEXT
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


# -- 6. a stop string across a token boundary ----------------------------------------------------------------------

def test_stop_string_spanning_two_tokens(srv):
    body = {"messages": text_message("Say something."), "max_tokens": 12}
    with srv.http.stream("POST", "/v1/chat/completions",
                         json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        payloads = sse_data(r.iter_lines())
    deltas, prompt_tokens = deltas_of(payloads), json.loads(payloads[-2])["usage"]["prompt_tokens"]
    text = "".join(deltas)
    assert text == srv.chat(**body).json()["choices"][0]["message"]["content"]  # greedy: the same answer
    stop, cut = None, None
    for i in range(2, len(deltas) - 1):  # from the third token on: some answer comes before the stop
        a, b = deltas[i], deltas[i + 1]
        if len(a) >= 3 and len(b) >= 2:  # and some of its token's text too
            boundary = len("".join(deltas[:i + 1]))
            candidate = a[-2:] + b[:2]
            if text.find(candidate) == boundary - 2:  # its first occurrence is the one across the boundary
                stop, cut = candidate, boundary - 2
                break
    assert stop is not None, f"no stop string across a token boundary in {deltas}"
    expected = text[:cut]
    # a long budget: the stop cancels the generation in the worker long before its end (and before its Finished
    # event, which is where the worker otherwise learns the prompt's size): usage must still be right
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": i + 2, "total_tokens": prompt_tokens + i + 2}
    cut_body = {**body, "max_tokens": 2000}
    ends_before = len(srv.ends())

    r = srv.chat(**cut_body, stop=[stop]).json()
    assert r["choices"][0]["message"]["content"] == expected
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"] == usage

    with srv.http.stream("POST", "/v1/chat/completions",
                         json={**cut_body, "stream": True, "stop": stop,
                               "stream_options": {"include_usage": True}}) as s:
        payloads = sse_data(s.iter_lines())
    got = deltas_of(payloads)
    # exactly the text before the stop: its first half, which came as the end of a token of its own, was held
    # back and never sent (sending it would have made the joined text longer than `expected`)
    assert "".join(got) == expected, (deltas, got, stop)
    assert finish_of(payloads) == "stop" and payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["usage"] == usage
    for end in srv.ends()[ends_before:]:  # both stopped in the worker, not run to 2000 tokens
        assert end["cancelled"] and end["generated"] < 2000, end


# -- 7. a follow-up goes to the worker that keeps its conversation -----------------------------------------------

def test_follow_up_is_routed_to_the_worker_that_keeps_it(srv, png):
    srv.wait_health(_all_alive, 20, "all workers alive and idle")
    uri = data_uri(png(600, 900, seed=5))
    # keep worker 0 busy with a long answer, so the first turn lands on worker 1 ...
    with srv.http.stream("POST", "/v1/chat/completions",
                         json={"messages": text_message("A long story."), "max_tokens": 7000, "stream": True}) as r:
        lines = r.iter_lines()
        blocker = json.loads(next(line for line in lines if line.startswith("data: "))[6:])["id"]
        first = image_message("What is the title of this book?", uri)
        r1 = srv.chat(first, max_tokens=6)
        assert r1.status_code == 200
    srv.wait_health(_all_alive, 5, "both workers idle again")
    a1 = srv.end_of(r1.json()["id"])
    assert a1["worker"] != srv.end_of(blocker)["worker"]
    # ... then another conversation runs, on the other worker (the first idle one) ...
    other = srv.chat(text_message("Something else entirely?"), max_tokens=6)
    assert srv.end_of(other.json()["id"])["worker"] != a1["worker"]
    # ... and the follow-up still goes to the worker that keeps the first conversation, and continues it
    follow = first + [{"role": "assistant", "content": r1.json()["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "And the author?"}]
    r2 = srv.chat(follow, max_tokens=6)
    assert r2.status_code == 200
    assert r2.headers["x-phi3v-kv-reused"] == "true"
    a2 = srv.end_of(r2.json()["id"])
    assert a2["worker"] == a1["worker"] and a2["kv_reused"]
    assert a2["prompt_tokens"] < 30 < a1["prompt_tokens"]  # the worker prefilled only the new turn


# -- 8. --threads reaches the onnxruntime sessions -----------------------------------------------------------------

def _os_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_threads_reach_the_sessions(tiny_dir, tmp_path):
    """og creates three sessions (vision, embedding, decoder); each gets an intra-op pool of `threads` threads,
    the calling thread being one of them: every extra thread is one more OS thread per session. And `serve
    --threads` gives its workers exactly that (a count other than the default, so the default cannot pass)."""
    from phi3v_ort.package.loading import default_threads

    counts = {}
    for threads in (1, 2, 3):
        worker = Worker(0, WorkerSpec(str(tiny_dir), "cpu", threads=threads))
        worker.start()
        try:
            assert worker.info["threads"] == threads
            counts[threads] = _os_threads(worker.info["pid"])
        finally:
            worker.close()
    assert counts[2] - counts[1] == 3 and counts[3] - counts[2] == 3, counts

    threads = 1 if default_threads(1) != 1 else 2
    port = _free_port()
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "phi3v_ort", "serve", "--model-dir", str(tiny_dir), "--port",
                                 str(port), "--workers", "1", "--threads", str(threads)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline, health = time.monotonic() + 60, None
        while health is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert _os_threads(health["workers"][0]["pid"]) == counts[threads], (threads, counts)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- 9. images the runtime reads itself, and bytes that are no image -----------------------------------------------

def _image_bytes(width: int, height: int, fmt: str) -> bytes:
    import numpy as np

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    out = io.BytesIO()
    Image.fromarray(pixels.astype("uint8"), "RGB").save(out, format=fmt)
    return out.getvalue()


def test_odd_images_are_answered_and_non_images_refused_without_hurting_a_worker(srv):
    srv.wait_health(_all_alive, 20, "all workers alive and idle")
    before = {w["index"]: (w["pid"], w["restarts"]) for w in srv.health()["workers"]}
    cases = {
        "webp": ("data:image/webp;base64,", _image_bytes(320, 200, "WEBP")),
        "16500x40 png": ("data:image/png;base64,", _image_bytes(16500, 40, "PNG")),
    }
    for name, (prefix, raw) in cases.items():
        for stream in (False, True):
            r = srv.chat(image_message("What is this?", prefix + base64.b64encode(raw).decode()), max_tokens=4,
                         stream=stream)
            assert r.status_code == 200, (name, r.text)
            if stream:
                payloads = sse_data(r.text.splitlines())
                assert payloads[-1] == "[DONE]" and finish_of(payloads) == "length", (name, r.text[-400:])
            else:
                usage = r.json()["usage"]
                assert usage["completion_tokens"] == 4 and usage["prompt_tokens"] > 100, (name, usage)
    text = "data:image/png;base64," + base64.b64encode(b"hello, I am only text").decode()
    for stream in (False, True):
        r = srv.chat(image_message("What is this?", text), max_tokens=4, stream=stream)
        assert r.status_code == 400, r.text
        assert "not an image" in assert_openai_error(r.json(), "invalid_request_error")["message"]
    after = {w["index"]: (w["pid"], w["restarts"]) for w in srv.health()["workers"]}
    assert after == before  # no worker died or was restarted
