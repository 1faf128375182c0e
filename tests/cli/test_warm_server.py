"""A warm model for every command: `serve` records itself (state files, stale ones cleaned), `run` and `chat` answer
through a running server of the same model exactly as in-process (`--server auto|URL`, `--no-server`), fall back
with one note where a server cannot honour an option, `--keep-alive` starts a server that idles out, `ps` and
`stop` manage them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli
from phi3v_ort.engine.settings import GenerationSettings
from phi3v_ort.errors import Phi3vError
from phi3v_ort.client import registry
from phi3v_ort.client.discovery import Wanted, choose, mismatch
from phi3v_ort.server.idle import parse_duration
from phi3v_ort.client.registry import ServerRecord

pytest.importorskip("starlette", reason="the server needs the serve extra")

CHART = Path(__file__).resolve().parents[1] / "data" / "chart.png"


def record(**changes) -> ServerRecord:
    base = ServerRecord(pid=os.getpid(), url="http://127.0.0.1:1", host="127.0.0.1", port=1, model_dir="/m",
                        model_name="m", device="cpu", processor="own", threads=2, workers=1, share_buffer=True,
                        cuda_graph=False, api_key=False, started=time.time(), load_s=1.0, version="0")
    return replace(base, **changes)


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


# -- the state files ---------------------------------------------------------------------------------------------

def test_state_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.STATE_DIR_ENV)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert registry.state_dir() == tmp_path / "run" / "phi3v-ort"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.state_dir() == tmp_path / "home" / ".cache" / "phi3v-ort" / "servers"
    monkeypatch.setenv(registry.STATE_DIR_ENV, str(tmp_path / "mine"))
    assert registry.state_dir() == tmp_path / "mine"


def test_a_record_round_trips_and_stale_ones_are_cleaned(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.STATE_DIR_ENV, str(tmp_path))
    mine = record()
    path = registry.write(mine)
    assert json.loads(path.read_text())["api_key"] is False and "key" not in path.read_text().replace("api_key", "")
    assert registry.recorded() == [mine]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    registry.write(record(pid=dead.pid))
    (tmp_path / "server-999999999.json").write_text("{not json")
    assert registry.recorded() == [mine]  # a dead process and an unreadable file: skipped and deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    # alive, but nothing listens at its address (a pid now used by another program): stale, deleted
    assert registry.running() == [] and not path.exists()


def test_durations():
    assert [parse_duration(t) for t in ("30s", "5m", "1h", "1h30m", "250ms", "90", "1.5m")] == \
        [30, 300, 3600, 5400, 0.25, 90, 90]
    for bad in ("", "5x", "m5", "0", "-1s", "5m junk"):
        with pytest.raises(Phi3vError, match="DURATION"):
            parse_duration(bad)


def test_what_a_server_cannot_honour():
    wanted = Wanted("/m")
    assert mismatch(wanted, record(), None) is None
    assert mismatch(replace(wanted, device="cpu"), record(), None) is None
    assert mismatch(replace(wanted, threads=2), record(), None) is None
    cases = [(replace(wanted, model_dir="/other"), record(), "--model-dir /other"),
             (replace(wanted, device="cuda"), record(), "--device cuda"),
             (replace(wanted, threads=1), record(), "--threads 1"),
             (replace(wanted, processor="og"), record(), "--processor og"),
             (replace(wanted, share_buffer=False), record(), "--no-share-buffer"),
             (replace(wanted, cuda_graph=True), record(), "--cuda-graph"),
             (wanted, record(api_key=True), "API key"),
             (replace(wanted, settings=GenerationSettings(do_sample=True, temperature=3.0)), record(), "--temperature"),
             (replace(wanted, image_bytes=(1,) * 9), record(), "9 images"),
             (replace(wanted, image_bytes=(17 * 2**20,)), record(), "an image over 16 MB")]
    for asked, server, phrase in cases:
        assert phrase in (mismatch(asked, server, None) or ""), phrase
    assert mismatch(wanted, record(api_key=True), "k") is None


# -- one server on the fixture ---------------------------------------------------------------------------------------

class Server:
    """`phi3v-ort serve` on the fixture, recording itself in `state`."""

    def __init__(self, model_dir: Path, state: Path, *args: str):
        self.state = state
        self.log = state.parent / f"serve-{time.monotonic_ns()}.log"
        env = {**os.environ, registry.STATE_DIR_ENV: str(state)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "phi3v_ort", "serve", "--model-dir", str(model_dir),
                                          "--port", "0", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        if not wait_for(lambda: self.record() is not None or self.proc.poll() is not None, 120):
            pytest.fail("the server did not start: " + self.log.read_text())
        if self.record() is None:
            pytest.fail("the server did not start: " + self.log.read_text())
        self.url = self.record().url

    def record(self) -> ServerRecord | None:
        path = self.state / f"server-{self.proc.pid}.json"
        return ServerRecord.from_dict(json.loads(path.read_text())) if path.exists() else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("warm") / "state"


@pytest.fixture(scope="module")
def server(tiny_dir, state):
    served = Server(tiny_dir, state)
    yield served
    served.stop()


def cli_run(state: Path, *args, server: str = "auto", input=None):
    env = {registry.STATE_DIR_ENV: str(state), "PHI3V_ORT_SERVER": server}
    return CliRunner().invoke(cli, [*map(str, args)], env=env, input=input)


def answer(state, tiny_dir, *args, server="auto"):
    return cli_run(state, "run", "--model-dir", tiny_dir, "--max-new-tokens", 12, *args, server=server)


def test_the_server_records_what_clients_match_on(server, tiny_dir):
    r = server.record()
    assert r.model_dir == str(tiny_dir.resolve()) and r.pid == server.proc.pid
    assert (r.device, r.processor, r.share_buffer, r.cuda_graph, r.api_key) == ("cpu", "own", True, False, False)
    assert r.threads >= 1 and r.load_s > 0 and r.url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("images, extra", [((), ()), ((CHART,), ()), ((CHART,), ("--crops", "4", "--system", "Be brief.")),
                                           ((), ("--regex", "[a-z ]{1,20}"))])
def test_json_through_the_server_equals_in_process(server, state, tiny_dir, images, extra):
    args = [*[a for p in images for a in ("-i", p)], *extra, "--json", "What is this?"]
    warm, cold = answer(state, tiny_dir, *args), answer(state, tiny_dir, *args, server="off")
    assert warm.exit_code == cold.exit_code == 0, warm.stderr + cold.stderr
    assert warm.stderr == cold.stderr == ""
    w, c = json.loads(warm.stdout), json.loads(cold.stdout)
    assert set(w) == set(c) and set(w["stats"]) == set(c["stats"])
    for key in ("text", "token_ids", "prompt_tokens", "num_image_tokens", "finish_reason", "parsed"):
        assert w.get(key) == c.get(key), key
    assert w["token_ids"] and w["stats"]["warm"] is True and c["stats"]["warm"] is False
    assert w["stats"]["load_s"] == server.record().load_s


def test_streamed_text_and_stats_equal_in_process(server, state, tiny_dir):
    warm, cold = (answer(state, tiny_dir, "--stats", "-i", CHART, "Describe it.", server=s) for s in ("auto", "off"))
    assert warm.exit_code == cold.exit_code == 0
    assert warm.stdout == cold.stdout and warm.stdout.strip()
    labels = [line[:19] for line in warm.stderr.splitlines()]
    assert labels == [line[:19] for line in cold.stderr.splitlines()]  # in-process too reports its model's load
    assert labels[-1] == "model              "
    assert "warm: a running server had it loaded" in warm.stderr
    assert "loaded in" in cold.stderr and "warm" not in cold.stderr


@pytest.mark.parametrize("args, needle", [
    (("hello " * 9000,), "context is 8192"),
    (("--grammar", "{bad}", "x"), None),
    (("<|image_9|> what?",), "no image was given"),
    (("-i", "/nonexistent.png", "x"), "not found"),
])
def test_errors_through_the_server_equal_in_process(server, state, tiny_dir, tmp_path, args, needle):
    if args[0] == "--grammar":
        grammar = tmp_path / "bad.lark"
        grammar.write_text("start: (((\n")
        args = ("--grammar", grammar, "x")
    warm, cold = answer(state, tiny_dir, *args), answer(state, tiny_dir, *args, server="off")
    assert warm.exit_code == cold.exit_code == 1
    assert warm.stdout == cold.stdout and warm.stderr == cold.stderr, (warm.stderr, cold.stderr)
    assert warm.stderr.startswith("Error: ") and len(warm.stderr.strip().splitlines()) == 1
    assert needle is None or needle in warm.stderr


def test_an_option_a_server_cannot_honour_falls_back_with_one_note(server, state, tiny_dir):
    threads = server.record().threads + 1
    result = answer(state, tiny_dir, "--threads", threads, "--json", "Hi")
    assert result.exit_code == 0
    note = f"Note: the server at {server.url} for this model cannot honour --threads {threads}"
    assert result.stderr.startswith(note) and result.stderr.count("\n") == 1
    assert json.loads(result.stdout)["stats"]["warm"] is False
    given = answer(state, tiny_dir, "--threads", threads, "Hi", server=server.url)
    assert given.exit_code == 1 and given.stderr.startswith(f"Error: the server at {server.url} cannot honour")


def test_more_new_tokens_than_the_server_allows_is_answered_in_process_never_cut(server, state, tiny_dir):
    """A warm `run` never gets a silently shorter answer: asking more than the server's --max-tokens-limit falls
    back to in-process with one note (and is an error with --server URL)."""
    limit = server.record().max_tokens_limit
    assert limit is not None
    result = answer(state, tiny_dir, "--max-new-tokens", limit + 1, "--json", "Hi")
    assert result.exit_code == 0 and json.loads(result.stdout)["stats"]["warm"] is False
    assert result.stderr.startswith(f"Note: the server at {server.url} for this model cannot honour "
                                    f"--max-new-tokens {limit + 1}")
    given = answer(state, tiny_dir, "--max-new-tokens", limit + 1, "Hi", server=server.url)
    assert given.exit_code == 1 and "--max-new-tokens" in given.stderr


def test_a_given_url_and_no_server(server, state, tiny_dir, tmp_path):
    given = json.loads(answer(state, tiny_dir, "--json", "Hi", server=server.url + "/v1").stdout)
    assert given["stats"]["warm"] is True
    off = cli_run(state, "run", "--model-dir", tiny_dir, "--no-server", "--json", "Hi")
    assert json.loads(off.stdout)["stats"]["warm"] is False
    other = tmp_path / "copy"  # another folder (even with the same files) is another model: in-process, no note
    shutil.copytree(tiny_dir, other)
    result = answer(state, other, "--json", "Hi")
    assert result.stderr == "" and json.loads(result.stdout)["stats"]["warm"] is False


def test_a_server_gone_quiet_is_never_used(tiny_dir, tmp_path, monkeypatch):
    """A state file whose process lives but whose address answers nothing: run answers in-process, silently, and
    the file is gone."""
    stale = tmp_path / "stale-state"
    monkeypatch.setenv(registry.STATE_DIR_ENV, str(stale))
    registry.write(record(model_dir=str(tiny_dir.resolve()), url="http://127.0.0.1:9", port=9))
    result = answer(stale, tiny_dir, "--json", "Hi")
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout)["stats"]["warm"] is False and not list(stale.glob("server-*.json"))


def test_chat_through_the_server_equals_in_process(server, state, tiny_dir):
    script = "What is this?\nAnd the title?\n/stats\n"
    args = ["chat", "--model-dir", tiny_dir, "--max-new-tokens", 8, "-i", CHART]
    warm, cold = (cli_run(state, *args, server=s, input=script) for s in ("auto", "off"))
    assert warm.exit_code == cold.exit_code == 0
    assert warm.stdout == cold.stdout and warm.stdout.count("\n") == 2
    assert "warm: a running server had it loaded" in warm.stderr
    assert "continued the kept KV cache" in warm.stderr  # the server continued its kept generator


def test_choose_auto_prefers_a_matching_server(server, state, tiny_dir, monkeypatch):
    monkeypatch.setenv(registry.STATE_DIR_ENV, str(state))
    assert choose("auto", Wanted(str(tiny_dir.resolve()))).url == server.url
    assert choose("off", Wanted(str(tiny_dir.resolve()))).url is None
    assert choose("auto", Wanted(str(tiny_dir.resolve()), processor="og")).note.startswith("Note: the server at")


# -- keep-alive, idle exit, ps, stop -------------------------------------------------------------------------------

def test_keep_alive_starts_a_server_that_idles_out(tiny_dir, tmp_path):
    state = tmp_path / "state"
    first = cli_run(state, "run", "--model-dir", tiny_dir, "--max-new-tokens", 5, "--keep-alive", "4s", "--json", "Hi")
    assert first.exit_code == 0, first.stderr
    assert first.stderr.startswith("Note: started a server for tiny-int4-cpu at http://127.0.0.1:")
    assert json.loads(first.stdout)["stats"]["warm"] is True
    (started,) = [ServerRecord.from_dict(json.loads(p.read_text())) for p in state.glob("server-*.json")]
    assert started.idle_exit_s == 4 and started.log and Path(started.log).exists()
    listed = cli_run(state, "ps")
    assert listed.exit_code == 0 and str(started.pid) in listed.stdout and started.url in listed.stdout
    second = cli_run(state, "run", "--model-dir", tiny_dir, "--max-new-tokens", 5, "--keep-alive", "4s", "--json", "Hi")
    assert second.stderr == "" and json.loads(second.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]
    assert wait_for(lambda: not registry.pid_alive(started.pid), 60), "the server did not exit when idle"
    assert not list(state.glob("server-*.json"))  # it removed its own file


def test_stop_ends_a_server_and_its_state_file(tiny_dir, tmp_path):
    state = tmp_path / "state"
    server = Server(tiny_dir, state, "--idle-exit", "10m")
    try:
        assert server.record().idle_exit_s == 600
        many = cli_run(state, "stop", "nothing-like-it")
        assert many.exit_code == 1 and "no running phi3v-ort server matches" in many.stderr
        stopped = cli_run(state, "stop", str(server.proc.pid))
        assert stopped.exit_code == 0 and f"pid {server.proc.pid}" in stopped.stderr
        assert server.proc.wait(timeout=5) == -signal.SIGTERM  # as before: uvicorn re-raises the signal
        assert not list(state.glob("server-*.json"))
        assert "no phi3v-ort server is running" in cli_run(state, "ps").stderr
    finally:
        server.stop()


def test_the_request_extension_is_checked():
    from phi3v_ort.server.openai_request import ApiError, parse_request

    def parse(phi3v, **body):
        return parse_request({"messages": [{"role": "user", "content": "Hi"}], "phi3v": phi3v, **body},
                             allow_remote=False, max_images=8, max_image_bytes=2**20, max_tokens_default=16)

    req = parse({"token_ids": True, "stats": True, "cap_max_tokens": True,
                 "guidance": {"kind": "regex", "data": "[a-z]+", "label": "--regex"}})
    assert req.phi3v.token_ids and req.phi3v.cap_max_tokens and req.settings.guidance.kind == "regex"
    for bad, param in [({"tokens": True}, "phi3v.tokens"), ({"stats": 1}, "phi3v.stats"), ([], "phi3v"),
                       ({"guidance": {"kind": "sql", "data": "x"}}, "phi3v.guidance")]:
        with pytest.raises(ApiError) as caught:
            parse(bad)
        assert caught.value.status == 400 and caught.value.param == param
    with pytest.raises(ApiError, match="either response_format or phi3v.guidance"):
        parse({"guidance": {"kind": "regex", "data": "a"}}, response_format={"type": "json_object"})
