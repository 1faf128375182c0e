"""The server's request path under hostile input (issue 21): huge text refused before it is tokenized and never
on the event loop, lone surrogates, a follow-up that changes what the prompt's tokens are, constraints, and the
answer's KV buffer bounded."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
try:
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx", reason="the server tests use httpx")

from starlette.testclient import TestClient  # noqa: E402

from phi3v_ort.server.app import ServerLimits, create_app  # noqa: E402
from phi3v_ort.workers.pool import WorkerSpec  # noqa: E402

CHAT = "/v1/chat/completions"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _raw_post(client, body: dict, **kw):
    """A body with lone surrogates in it: json.dumps writes them as `\\ud800` escapes, as JavaScript does."""
    return client.post(CHAT, content=json.dumps(body).encode(), headers={"content-type": "application/json"}, **kw)


class HealthProbe:
    """Polls /health in a thread while something else runs; records each answer's latency."""

    def __init__(self, get):
        self.get, self.latencies, self.failures = get, [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                status = self.get("/health").status_code
                if status != 200:
                    self.failures.append(status)
            except Exception as exc:  # noqa: BLE001 - a refused or timed-out probe is what the test looks for
                self.failures.append(repr(exc))
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def app(tiny_dir):
    app = create_app(WorkerSpec(str(tiny_dir)), "tiny", limits=ServerLimits(max_body_bytes=40 * 2**20))
    yield app
    app.state.pool.close()


@pytest.fixture(scope="module")
def app_client(app):
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:  # one event loop for every request
        yield client


# -- 3: one large text message --------------------------------------------------------------------------------------

def test_a_30_mb_message_is_refused_at_once_while_health_answers(served):
    url, pid = served.url, served.proc.pid
    before = _rss(pid)
    body = {"messages": [{"role": "user", "content": "lorem ipsum " * (30 * 2**20 // 12)}], "max_tokens": 4}
    with HealthProbe(lambda path: httpx.get(url + path, timeout=5)) as probe:
        started = time.perf_counter()
        r = httpx.post(url + CHAT, json=body, timeout=120)
        took = time.perf_counter() - started
        time.sleep(0.3)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "maximum context length is 8192" in error["message"]
    assert took < 10, took  # 42.5 s before: the whole text was tokenized first
    assert not probe.failures and max(probe.latencies) < 2, (probe.failures, max(probe.latencies))
    assert _rss(pid) - before < 600 * 2**20  # 4.1 GB before (the body and its string are ~60 MB)


def test_the_size_bound_never_refuses_text_that_fits(app_client):
    """Text that fits the context however long it is in characters: whitespace runs tokenize to about one token per
    character, so only the bound's characters-per-token ratio could refuse them wrongly."""
    for text in ("a" * 7000, " " * 7000, "\n" * 7000):
        r = app_client.post(CHAT, json={"messages": [{"role": "user", "content": text}], "max_tokens": 1})
        assert r.status_code == 200 or "messages are" not in r.text, r.text
    r = app_client.post(CHAT, json={"messages": [{"role": "user", "content": "a" * 14000}], "max_tokens": 1})
    assert r.status_code == 200, r.text  # about 7,000 tokens: fits, though longer in characters than the context


def test_tokenizing_runs_off_the_event_loop(app, app_client, monkeypatch):
    """A slow tokenization (a long text on a busy machine) leaves /health answering meanwhile."""
    tokenizer = app.state.service.builder.tokenizer
    real = tokenizer.encode_conversation

    def slow(*args, **kwargs):
        time.sleep(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode_conversation", slow)
    with HealthProbe(app_client.get) as probe:
        r = app_client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert len(probe.latencies) >= 5 and max(probe.latencies) < 1.0, probe.latencies


# -- 4: a lone surrogate anywhere in a request ----------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
S = "\ud800"  # what JavaScript's slice leaves of an emoji; json.dumps sends it as the escape \ud800
SURROGATES = {
    "message text": ({"messages": [{"role": "user", "content": "caf" + S}]}, "messages[0].content"),
    "a text part": ({"messages": [{"role": "user", "content": [{"type": "text", "text": S}]}]},
                    "messages[0].content[0].text"),
    "system": ({"messages": [{"role": "system", "content": S}, *USER]}, "messages[0].content"),
    "an earlier answer": ({"messages": [*USER, {"role": "assistant", "content": "x" + S}, *USER]},
                          "messages[1].content"),
    "json_schema pattern": ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": S}}}}, "response_format.json_schema.schema.pattern"),
    "json_schema key": ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {S: {"type": "string"}}}}}},
        "response_format.json_schema.schema.properties"),
    "regex": ({"messages": USER, "phi3v": {"guidance": {"kind": "regex", "data": "a" + S}}},
              "phi3v.guidance.data"),
    "stop": ({"messages": USER, "stop": ["x", S]}, "stop[1]"),
    "an ignored field": ({"messages": USER, "user": S}, "user"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(SURROGATES))
def test_a_lone_surrogate_anywhere_is_one_sentence(app_client, case, stream):
    body, param = SURROGATES[case]
    r = _raw_post(app_client, {**body, "max_tokens": 2, "stream": stream})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "lone surrogate" in error["message"], error
    assert error["message"].count(". ") == 0 and "Traceback" not in error["message"]
    assert "onnxruntime" not in error["message"] and "(self" not in error["message"]  # og's binding signature


# -- 7: a follow-up that changes what the prompt's tokens are ------------------------------------------------------

def _data_uri(path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.mark.parametrize("change", ["crops", "system"])
def test_a_follow_up_that_changes_the_prompt_inputs_is_prefilled_afresh(served, png, change):
    url = served.url + CHAT
    image = png(900, 600, seed=7)
    system = [{"role": "system", "content": "Be brief."}]
    first = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": _data_uri(image)}}]}]
    r1 = httpx.post(url, json={"messages": system + first, "max_tokens": 4, "crops": 1}, timeout=60)
    assert r1.status_code == 200, r1.text
    follow = first + [{"role": "assistant", "content": r1.json()["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "And the colours?"}]
    same = {"messages": system + follow, "max_tokens": 4, "crops": 1}
    changed = {**same, "crops": 4} if change == "crops" else {**same, "messages": follow}
    r2 = httpx.post(url, json=changed, timeout=60)
    assert r2.status_code == 200, r2.text
    assert r2.headers["x-phi3v-kv-reused"] == "false"
    r2_tokens = r2.json()["usage"]["prompt_tokens"]
    # the same follow-up asked the first time's way continues the kept cache (r2 took none): the control
    r1 = httpx.post(url, json={"messages": system + first, "max_tokens": 4, "crops": 1}, timeout=60)
    follow[1]["content"] = r1.json()["choices"][0]["message"]["content"]
    r3 = httpx.post(url, json={**same, "messages": system + follow}, timeout=60)
    assert r3.headers["x-phi3v-kv-reused"] == "true"
    if change == "crops":  # 4 crops count more image tokens than 1: usage counts what was prefilled
        assert r2_tokens > r3.json()["usage"]["prompt_tokens"]


def test_the_worker_continues_only_a_conversation_made_with_the_same_inputs():
    """The worker's own check, for a resume the parent routed anyway (a kept id from another route)."""
    from types import SimpleNamespace

    from phi3v_ort.engine.settings import GenerationSettings
    from phi3v_ort.workers.process import same_prompt_inputs
    from phi3v_ort.workers.protocol import Job

    kept = SimpleNamespace(system="s", pipeline=SimpleNamespace(name="own", crops=16))
    job = Job("r", "q", [], GenerationSettings(), system="s", processor="own", crops=None)
    assert same_prompt_inputs(kept, job)
    for other in ({"crops": 4}, {"system": None}, {"processor": "og"}):
        assert not same_prompt_inputs(kept, Job("r", "q", [], GenerationSettings(), **{
            "system": "s", "processor": "own", "crops": None, **other}))


# -- 8: constraints and internals ----------------------------------------------------------------------------------

def test_an_unexpected_worker_error_is_logged_not_shown(capsys):
    from phi3v_ort.server.completions import api_error
    from phi3v_ort.workers.protocol import Error

    try:
        raise TypeError("set_inputs(): incompatible function arguments (self: onnxruntime_genai.Generator, ...)")
    except TypeError as exc:
        error = Error.of("r1", exc)
    shown = api_error(error)
    assert shown.status == 500 and "onnxruntime_genai" not in shown.message and "log" in shown.message
    assert "onnxruntime_genai.Generator" in capsys.readouterr().err and "r1" in error.request_id


CONSTRAINTS = {
    "a million repetitions": ({"type": "string", "pattern": "^a{1000000}$"}, "the limit is 100,000"),
    "a $ref loop": ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, "no finite answer"),
    "a required recursive property": ({"$ref": "#/$defs/n", "$defs": {"n": {
        "type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}}}, "no finite answer"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(CONSTRAINTS))
def test_a_constraint_with_no_answer_is_a_400_before_the_prefill(served, case, stream):
    """Through a real server: a plain 400 naming response_format, never a 200 with "" or `{` then an error event,
    never llguidance's parser state; the server's workers are untouched (the next request is answered)."""
    schema, words = CONSTRAINTS[case]
    body = {"messages": USER, "max_tokens": 8, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    r = httpx.post(served.url + CHAT, json=body, timeout=60)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert error["param"].startswith("response_format") and words in error["message"]
    for internal in ("llguidance", "panic", "Parser", "state", "Traceback"):
        assert internal not in error["message"]
    assert httpx.post(served.url + CHAT, json={"messages": USER, "max_tokens": 2}, timeout=60).status_code == 200


# -- 10: max_tokens and the KV buffer it preallocates --------------------------------------------------------------

@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_the_servers_limit_is_a_400_naming_it(app_client, name):
    r = app_client.post(CHAT, json={"messages": USER, name: 130000})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name and "at most 4096" in error["message"] and "--max-tokens-limit" in error["message"]


def test_the_limit_is_a_serve_option(tiny_dir):
    from click.testing import CliRunner

    from phi3v_ort.cli import cli

    assert "--max-tokens-limit" in CliRunner().invoke(cli, ["serve", "--help"]).stdout
    result = CliRunner().invoke(cli, ["serve", "--model-dir", str(tiny_dir), "--max-tokens-limit", "0"])
    assert result.exit_code != 0 and "--max-tokens-limit" in result.stderr and "Traceback" not in result.output


def test_a_kv_buffer_the_machine_cannot_hold_is_a_400(app_client, monkeypatch):
    from phi3v_ort.engine import kv_cache

    monkeypatch.setattr(kv_cache, "available_memory", lambda: 64 * 2**10)  # 64 KiB left on this machine
    r = app_client.post(CHAT, json={"messages": USER, "max_tokens": 64})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_tokens" and "KV cache would need" in error["message"]
    assert "0 MiB available" in error["message"]
    monkeypatch.setattr(kv_cache, "available_memory", lambda: None)  # the system does not say: no refusal
    assert app_client.post(CHAT, json={"messages": USER, "max_tokens": 2}).status_code == 200


def test_the_kv_check_never_refuses_what_fits():
    from phi3v_ort.engine.kv_cache import memory_refusal

    assert memory_refusal(2**30, 4 * 2**30, 1000) is None
    assert memory_refusal(2**30, None, 1000) is None
    assert "1,024 MiB" in memory_refusal(2**30, 2**30, 1000)


# -- 11: --processor og counts image tokens by decoding the image: off the event loop ---------------------------

def test_og_image_counting_leaves_health_answering(tiny_dir, png, monkeypatch):
    from phi3v_ort.inputs.pipeline import OgPipeline

    real = OgPipeline.image_tokens

    def slow(self, image):  # three 9459-px PNGs took 2.45 s to decode, all of it inside the event loop
        time.sleep(1.5)
        return real(self, image)

    monkeypatch.setattr(OgPipeline, "image_tokens", slow)
    app = create_app(WorkerSpec(str(tiny_dir)), "tiny", processor="og")
    try:
        with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
            content = [{"type": "text", "text": "What is this?"},
                       {"type": "image_url", "image_url": {"url": _data_uri(png(400, 300, seed=3))}}]
            with HealthProbe(client.get) as probe:
                r = client.post(CHAT, json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert len(probe.latencies) >= 5 and max(probe.latencies) < 1.0, probe.latencies
    finally:
        app.state.pool.close()
