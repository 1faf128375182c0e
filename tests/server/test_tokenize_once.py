"""The server tokenizes each request's prompt once: the HTTP process tokenizes the transcript (to check the context),
the job carries those ids, and the worker feeds them without tokenizing again."""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")

from starlette.testclient import TestClient  # noqa: E402

from phi3v_ort.inputs.tokens import PromptTokenizer  # noqa: E402
from phi3v_ort.server.app import create_app  # noqa: E402
from phi3v_ort.workers.pool import Worker  # noqa: E402
from phi3v_ort.workers.protocol import End, Error, Event, WorkerSpec  # noqa: E402


class TokenizerCalls:
    """Counts calls to the runtime's prompt tokenizer (both of its public entry points) in this process."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("encode", "encode_conversation"):
            real = getattr(PromptTokenizer, name)
            monkeypatch.setattr(PromptTokenizer, name, self._counting(real))

    def _counting(self, real):
        def counted(tokenizer, *args, **kwargs):
            self.count += 1
            return real(tokenizer, *args, **kwargs)
        return counted

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


class Pipe:
    """The worker's end of the pipe, in this process: what it sends is kept; nothing arrives."""

    def __init__(self):
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)

    def poll(self) -> bool:
        return False


@pytest.fixture
def served(tiny_dir, monkeypatch):
    """The app over one worker process; every job it submits is kept."""
    jobs: list = []
    submit = Worker.submit

    def keeping(worker, job, callback):
        jobs.append(job)
        submit(worker, job, callback)

    monkeypatch.setattr(Worker, "submit", keeping)
    app = create_app(WorkerSpec(str(tiny_dir), "cpu", threads=1), "tiny")
    yield TestClient(app, base_url="http://localhost"), jobs
    app.state.pool.close()


def test_a_request_is_tokenized_once_across_the_process_boundary(served, png, tiny_dir, monkeypatch):
    client, jobs = served
    calls = TokenizerCalls(monkeypatch)
    uri = "data:image/png;base64," + base64.b64encode(png(320, 200).read_bytes()).decode()
    first = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": uri}}]}]
    r1 = client.post("/v1/chat/completions", json={"messages": first, "max_tokens": 4})
    assert r1.status_code == 200, r1.text
    assert calls.take() == 1  # the HTTP process: once, to count the context
    answer = r1.json()["choices"][0]["message"]["content"]
    follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    r2 = client.post("/v1/chat/completions", json={"messages": follow, "max_tokens": 4})
    assert r2.status_code == 200, r2.text
    assert calls.take() == 1
    assert r2.headers["X-Phi3v-KV-Reused"] == "true"  # the worker continued its kept generator

    job1, job2 = jobs
    assert len(job1.tokens.ids) == r1.json()["usage"]["prompt_tokens"] and job1.tokens.continuation is None
    assert len(job2.tokens.ids) == r2.json()["usage"]["prompt_tokens"]
    assert job2.tokens.continuation[0] == 32007  # the follow-up's own tokens start with the last answer's <|end|>

    # The worker's side, in this process: the same two jobs through the worker's own loop feed the ids they carry
    from phi3v_ort.engine.model import load_model
    from phi3v_ort.workers.process import JobRunner

    runner = JobRunner(load_model(tiny_dir, "cpu", threads=1), WorkerSpec(str(tiny_dir), "cpu", threads=1), Pipe())
    for job, response, fed in ((job1, r1, len(job1.tokens.ids)), (job2, r2, len(job2.tokens.continuation))):
        runner.conn.sent.clear()
        runner.run(job)
        assert calls.take() == 0  # the worker never tokenizes a prompt the server already tokenized
        replies = runner.conn.sent
        assert not [r for r in replies if isinstance(r, Error)], replies
        assert isinstance(replies[-1], End) and replies[-1].summary.prompt_tokens == fed
        text = "".join(r.event.text for r in replies if isinstance(r, Event) and hasattr(r.event, "token_id"))
        assert text == response.json()["choices"][0]["message"]["content"]  # the same answer as the worker gave
