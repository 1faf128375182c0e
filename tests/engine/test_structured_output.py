"""Structured output (guidance.py): JSON schema, json_object, regex and Lark constraints through the library, the
CLI (run, chat, batch), conversations and the server with the official openai client, on the tiny fixture."""

import json
import re

import pytest
from click.testing import CliRunner

from phi3v_ort.engine import guidance as G
from phi3v_ort.cli import cli
from phi3v_ort.engine.conversation import Conversation
from phi3v_ort.errors import Phi3vError
from phi3v_ort.engine.generation import Notice, generate
from phi3v_ort.inputs.images import load_image
from phi3v_ort.engine.model import load_model
from phi3v_ort.server.openai_request import ApiError, parse_request
from phi3v_ort.engine.settings import GenerationSettings

jsonschema = pytest.importorskip("jsonschema", reason="the structured-output tests validate with jsonschema")

BOOK = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 16},
                                         "author": {"type": "string", "maxLength": 16}},
        "required": ["title", "author"], "additionalProperties": False}
DATE = r"\d{4}-\d{2}-\d{2}"
LARK = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no" | "maybe"\n'
LARK_RE = r"The answer is (yes|no|maybe)\."
Q = "Help me get the title and author information of this book?"
# an object the grammar itself finishes: its one string is bounded
SHORT_TITLE = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 12}}, "required": ["title"],
               "additionalProperties": False}


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from tests.conftest import make_png

    return load_image(str(make_png(tmp_path_factory.mktemp("img") / "book.png", 600, 900, seed=3)))


def guided(model, image, constraint, max_new_tokens=200, question=Q):
    images = [image] if image is not None else []
    return generate(model, question, images, GenerationSettings(max_new_tokens=max_new_tokens, guidance=constraint))


# -- what the runtime adds, and the CLI's options --------------------------------------------------------------------

def test_the_runtime_adds_only_compact_whitespace_to_a_schema():
    assert json.loads(G.json_schema(BOOK).data) == {**BOOK, "x-guidance": {"whitespace_flexible": False}}
    assert BOOK.get("x-guidance") is None  # the user's schema is not changed in place
    mine = {"type": "object", "x-guidance": {"whitespace_flexible": True}}
    assert json.loads(G.json_schema(mine).data) == mine  # the user's choice stands
    other = json.loads(G.json_schema({"type": "object", "x-guidance": {"key_separator": ": "}}).data)
    assert other["x-guidance"] == {"key_separator": ": ", "whitespace_flexible": False}
    assert json.loads(G.json_object().data) == {"type": "object", "x-guidance": {"whitespace_flexible": False}}
    with pytest.raises(Phi3vError, match="must be a JSON object"):
        G.json_schema([1, 2])
    assert G.regex(r"[\d-]+\D\\d").data == r"[0-9-]+[^0-9]\\d"  # \d means [0-9]; an escaped backslash stays
    settings = GenerationSettings(guidance=G.json_object())
    assert hash(settings) == hash(GenerationSettings(guidance=G.json_object()))  # frozen, hashable, picklable
    with pytest.raises(Phi3vError, match="ignore_eos"):
        GenerationSettings(guidance=G.json_object(), ignore_eos=True)


def test_outcome_reports_what_is_not_complete():
    schema = G.json_schema(BOOK)
    assert G.outcome(schema, '{"title":"a","author":"b"}', "stop", 9).parsed == {"title": "a", "author": "b"}
    cut = G.outcome(schema, '{"title":"a', "length", 5)
    assert not cut.complete and cut.problem == ("the answer was cut at 5 tokens before the JSON was complete "
                                                "(raise --max-new-tokens)")
    assert not G.outcome(G.regex(DATE), "2024-01-0", "stop", 9).complete
    assert G.outcome(G.lark_grammar(LARK), "The answer is no.", "stop", 5).complete
    assert G.outcome(None, "anything", "length", 5).complete


@pytest.mark.parametrize("args,message", [
    (["--json-object", "--regex", "x"], "Error: --json-object and --regex cannot be combined"),
    (["--json-schema", "{bad"], "Error: --json-schema is not valid JSON"),
    (["--json-schema", "no-such-schema.json"], "Error: --json-schema: no such file no-such-schema.json"),
    (["--json-schema", '{"type": "objekt"}'], "Error: --json-schema cannot be compiled: Invalid type: objekt"),
    (["--regex", "("], "Error: --regex cannot be compiled:"),
    (["--grammar", "GRAMMAR"], "Error: --grammar cannot be compiled:"),
])
def test_a_bad_constraint_is_one_line_before_any_prefill(tiny_dir, tmp_path, args, message):
    bad_grammar = tmp_path / "bad.lark"
    bad_grammar.write_text("start: undefined_rule\n")
    args = [str(bad_grammar) if a == "GRAMMAR" else a for a in args]
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), *args, "x"])
    assert result.exit_code == 1
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""  # nothing was generated


# -- the library, on the fixture with an image -----------------------------------------------------------------------

def test_schema_with_required_strings_parses_and_validates(model, image):
    finished = guided(model, image, G.json_schema(BOOK))
    assert finished.stats.finish_reason == "stop"
    value = json.loads(finished.text)
    jsonschema.validate(value, BOOK)
    assert set(value) == {"title", "author"}
    assert G.outcome(G.json_schema(BOOK), finished.text, "stop", 1).parsed == value


def test_json_object(model, image):
    # random weights never close a key string after an image: cut by the budget, reported, a valid JSON prefix
    cut = guided(model, image, G.json_object(), max_new_tokens=40)
    assert cut.stats.finish_reason == "length" and cut.text.startswith('{"')
    assert not G.outcome(G.json_object(), cut.text, "length", 40).complete
    # A complete object: random weights almost never choose to close a free string (og masks nothing inside one),
    # so the finished case uses a schema whose string is bounded: the grammar then closes it, and the object.
    done = guided(model, None, G.json_schema(SHORT_TITLE), question="a")
    assert done.stats.finish_reason == "stop" and set(json.loads(done.text)) == {"title"}


def test_regex_fullmatches(model, image):
    finished = guided(model, image, G.regex(DATE), max_new_tokens=30)
    assert finished.stats.finish_reason == "stop"
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", finished.text), finished.text


def test_lark_grammar(model, image):
    finished = guided(model, image, G.lark_grammar(LARK), max_new_tokens=30)
    assert finished.stats.finish_reason == "stop"
    assert re.fullmatch(LARK_RE, finished.text), finished.text


def test_run_json_carries_the_parsed_value(tiny_dir, tmp_path):
    schema = tmp_path / "book.json"
    schema.write_text(json.dumps(BOOK))
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "-i", "tests/data/chart.png",
                                      "--json-schema", str(schema), "--json", Q])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["finish_reason"] == "stop" and out["parsed"] == json.loads(out["text"])
    jsonschema.validate(out["parsed"], BOOK)


def test_budget_cut_is_a_non_zero_exit_and_one_line(tiny_dir):
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "-i", "tests/data/chart.png",
                                      "--json-object", "--max-new-tokens", "12", Q])
    assert result.exit_code == 1
    assert result.stdout.startswith('{"')  # the constrained text was streamed
    assert result.stderr == ("Error: the answer was cut at 12 tokens before the JSON was complete "
                             "(raise --max-new-tokens)\n")
    as_json = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "-i", "tests/data/chart.png",
                                       "--json-object", "--max-new-tokens", "12", "--json", Q])
    assert as_json.exit_code == 1
    out = json.loads(as_json.stdout)
    assert out["finish_reason"] == "length" and "parsed" not in out


# -- conversations ---------------------------------------------------------------------------------------------------

def test_switching_the_constraint_between_turns_re_prefills(model, image):
    conv = Conversation(model, GenerationSettings(max_new_tokens=30, guidance=G.regex(DATE)))
    events = list(conv.ask(Q, [image]))
    first = events[-1]
    assert re.fullmatch(r"[0-9-]{10}", first.text) and first.stats.finish_reason == "stop"

    events = list(conv.ask("And the date again?"))  # the same constraint, the last answer complete: continues
    assert not any(isinstance(e, Notice) for e in events)
    assert events[-1].stats.kv_reused and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", events[-1].text)

    from dataclasses import replace

    conv.settings = replace(conv.settings, guidance=G.lark_grammar(LARK))
    events = list(conv.ask("Is it a book?"))
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert notices == ["re-prefilling the conversation: the output constraint changed, and og fixes it when a "
                       "generator is created"]
    assert not events[-1].stats.kv_reused and re.fullmatch(LARK_RE, events[-1].text)

    conv.settings = replace(conv.settings, guidance=None, max_new_tokens=4)  # turned off: re-prefills too
    events = list(conv.ask("Say more."))
    assert [e.message for e in events if isinstance(e, Notice)] == notices

    conv.settings = replace(conv.settings, guidance=G.json_object(), max_new_tokens=6)  # cut mid-structure
    assert list(conv.ask("As JSON?"))[-1].stats.finish_reason == "length"
    events = list(conv.ask("As JSON, again?"))
    assert [e.message for e in events if isinstance(e, Notice)] == [
        "re-prefilling the conversation: the last answer was cut before its output constraint was complete"]
    assert events[-1].text.startswith("{")


def test_chat_format_command_switches_the_constraint(tiny_dir, tmp_path):
    script = "\n".join(["What is this?", f"/format regex {DATE}", "The date?", "/format text", "More?"]) + "\n"
    empty = tmp_path / "empty.lark"
    empty.write_text("")
    result = CliRunner().invoke(cli, ["chat", "--model-dir", str(tiny_dir), "--max-new-tokens", "20", "-i",
                                      "tests/data/chart.png", "--grammar", str(empty)], input=script)
    assert result.exit_code == 1 and result.stderr.startswith("Error: --grammar is empty")  # refused before loading
    result = CliRunner().invoke(cli, ["chat", "--model-dir", str(tiny_dir), "--max-new-tokens", "20", "-i",
                                      "tests/data/chart.png", "--json-object"], input=script)
    assert result.exit_code == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert answers[0].startswith('{"') and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", answers[1])
    assert "Error: the answer was cut at 20 tokens before the JSON was complete" in result.stderr
    assert result.stderr.count("re-prefilling the conversation: the output constraint changed") == 2


# -- batch -----------------------------------------------------------------------------------------------------------

def test_batch_with_a_schema_over_several_items(tiny_dir, png, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"b{i}", "images": [str(png(600, 900, seed=3))],
                                         "question": q}) + "\n"
                             for i, q in enumerate([Q, "Who wrote this book?", "What is the title?"])))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["batch", str(items), "-o", str(out), "--model-dir", str(tiny_dir),
                                      "--json-schema", json.dumps(BOOK), "--max-new-tokens", "200"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["b0", "b1", "b2"]
    for row in rows:
        assert row["parsed"] == json.loads(row["answer"])
        jsonschema.validate(row["parsed"], BOOK)

    cut = tmp_path / "cut.jsonl"  # cut by the budget: error lines (retried by the next run), exit 3
    result = CliRunner().invoke(cli, ["batch", str(items), "-o", str(cut), "--model-dir", str(tiny_dir),
                                      "--json-object", "--max-new-tokens", "5"])
    assert result.exit_code == 3
    rows = [json.loads(line) for line in cut.read_text().splitlines()]
    assert all(r["error"].startswith("the answer was cut at 5 tokens") and "answer" not in r for r in rows)

    bad = tmp_path / "bad.jsonl"  # a schema og cannot compile stops the run with one line, nothing written
    result = CliRunner().invoke(cli, ["batch", str(items), "-o", str(bad), "--model-dir", str(tiny_dir),
                                      "--json-schema", '{"type": "objekt"}'])
    assert result.exit_code == 1
    assert "Error: --json-schema cannot be compiled: Invalid type: objekt" in result.stderr
    assert not bad.exists() or bad.read_text() == ""


# -- the server --------------------------------------------------------------------------------------------------

def _parse(body):
    return parse_request({"messages": [{"role": "user", "content": "hi"}], **body}, allow_remote=False,
                         max_images=8, max_image_bytes=2**20, max_tokens_default=64)


def test_response_format_is_parsed_into_the_settings():
    assert _parse({"response_format": {"type": "text"}}).settings.guidance is None
    assert _parse({"response_format": {"type": "json_object"}}).settings.guidance.data == G.json_object().data
    req = _parse({"response_format": {"type": "json_schema", "json_schema": {"name": "book", "schema": BOOK,
                                                                              "strict": True}}})
    assert json.loads(req.settings.guidance.data)["required"] == ["title", "author"]
    for rf, param in [({"type": "json"}, "response_format.type"), ({"type": 3}, "response_format"),
                      ({"type": "json_object", "schema": {}}, "response_format.schema"),
                      ({"type": "json_schema"}, "response_format.json_schema"),
                      ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
                       "response_format.json_schema.name"),
                      ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format.json_schema.schema"),
                      ({"type": "json_schema", "json_schema": {"name": "a", "schema": []}},
                       "response_format.json_schema.schema"),
                      ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}},
                       "response_format.json_schema.strict")]:
        with pytest.raises(ApiError) as info:
            _parse({"response_format": rf})
        assert (info.value.status, info.value.param) == (400, param), info.value.message


MODEL = "tiny-int4-cpu"  # the id the shared server of the fixture's folder serves (others are a 404)


@pytest.fixture(scope="module")
def server(served):
    """The shared `phi3v-ort serve` on the fixture (conftest.py)."""
    return served.url


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def _user(text):
    import base64

    uri = "data:image/png;base64," + base64.b64encode(open("tests/data/chart.png", "rb").read()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": uri}}]}]


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "book", "schema": BOOK, "strict": True}}


def test_server_json_schema_with_the_openai_client(client, tiny_dir):
    response = client.chat.completions.create(model=MODEL, messages=_user(Q), max_tokens=200,
                                              response_format=SCHEMA_FORMAT)
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), BOOK)
    cli_run = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "-i", "tests/data/chart.png",
                                       "--json-schema", json.dumps(BOOK), "--max-new-tokens", "200", "--json", Q])
    assert json.loads(cli_run.stdout)["text"] == choice.message.content  # the same constraint, the same answer

    chunks = list(client.chat.completions.create(model=MODEL, messages=_user(Q), max_tokens=200, stream=True,
                                                 response_format=SCHEMA_FORMAT))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_server_json_object_is_cut_with_finish_reason_length(client):
    response = client.chat.completions.create(model=MODEL, messages=_user(Q), max_tokens=16,
                                              response_format={"type": "json_object"})
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content.startswith('{"')
    chunks = list(client.chat.completions.create(model=MODEL, messages=_user(Q), max_tokens=16, stream=True,
                                                 response_format={"type": "json_object"}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == response.choices[0].message.content
    bounded = {"type": "json_schema", "json_schema": {"name": "title", "schema": SHORT_TITLE}}
    text_only = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}],
                                               max_tokens=50, response_format=bounded)
    assert text_only.choices[0].finish_reason == "stop"
    assert set(json.loads(text_only.choices[0].message.content)) == {"title"}


@pytest.mark.parametrize("stream", [False, True])
def test_server_schema_og_cannot_compile_is_a_400(client, stream):
    import openai

    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as info:
        result = client.chat.completions.create(model=MODEL, messages=_user(Q), max_tokens=20, response_format=bad,
                                                stream=stream)
        list(result) if stream else None
    error = info.value.body
    assert error["param"] == "response_format" and "Invalid type: objekt" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_user(Q), response_format={"type": "xml"})
    assert info.value.body["param"] == "response_format.type"
    ok = client.chat.completions.create(model=MODEL, messages=_user(Q), max_tokens=3)  # the worker is fine after
    assert ok.choices[0].finish_reason == "length"
