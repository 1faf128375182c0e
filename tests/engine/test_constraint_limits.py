"""What an output constraint may ask for (constraint_limits.py), checked before og compiles it: counts, lengths,
regex repetitions, Lark repetitions and %json schemas, size, nesting, enums and properties; schemas without a
finite answer; lone surrogates; and llguidance's internals kept out of messages. Through the library, the CLI and
the server's test client."""

import json

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli
from phi3v_ort.engine import constraint_limits as L
from phi3v_ort.engine import guidance as G

ITEMS = {"type": "array", "items": {"type": "integer"}}
OBJECT = {"type": "object"}
STRING = {"type": "string"}


def _schema_error(schema) -> str:
    with pytest.raises(G.GuidanceError) as info:
        G.json_schema(schema, "response_format.json_schema.schema")
    message = str(info.value)
    assert message.startswith("response_format.json_schema.schema ") and "\n" not in message
    return message


@pytest.mark.parametrize("base,key,limit", [
    *[(ITEMS, k, L.MAX_COUNT) for k in ("minItems", "maxItems", "minContains", "maxContains")],
    *[(OBJECT, k, L.MAX_COUNT) for k in ("minProperties", "maxProperties")],
    *[(STRING, k, L.MAX_LENGTH) for k in ("minLength", "maxLength")],
])
def test_every_count_and_length_is_bounded_at_any_depth(base, key, limit):
    G.json_schema({**base, key: limit})  # at the limit: fine
    for value in (limit + 1, 10**9, 1e7 if limit < 1e7 else 1e9, 10**30):
        message = _schema_error({**base, key: value})
        assert f"asks for {key}" in message and f"the limit is {limit:,}" in message
    nested = {"type": "object", "properties": {"deep": {"type": "array", "items": {**base, key: 10**9}}}}
    assert "at #/properties/deep/items" in _schema_error(nested)
    assert "at #/$defs/x" in _schema_error({"$defs": {"x": {**base, key: 10**9}}, "$ref": "#/$defs/x"})


def test_values_that_are_data_are_not_read_as_keywords():
    G.json_schema({"type": "object", "const": {"maxItems": 10**9}, "default": {"minLength": 10**12},
                   "examples": [{"maxItems": 10**9}], "enum": [{"minItems": 10**9}]})


@pytest.mark.parametrize("pattern,ok", [
    ("a{100000}", True), ("(a{300}){300}", True), (r"\d{4}-\d{2}-\d{2}", True), ("[{]{5}x{2,}", True),
    ("a{1000000}", False), ("^a{1000000}$", False), ("(a{1000}){1000}", False), ("((ab){400}c){400}", False),
    ("x{3,200000}", False), ("(?:[a-z]{10}){20000}", False), ("a{100001,}", False),
])
def test_regex_repetitions_are_bounded_through_nested_groups(pattern, ok):
    schema = {"type": "string", "pattern": pattern}
    keyed = {"type": "object", "patternProperties": {pattern: {"type": "integer"}}}
    if ok:
        G.regex(pattern)
        G.json_schema(schema)
        return
    with pytest.raises(G.GuidanceError, match=f"the limit is {L.MAX_REPEAT:,}"):
        G.regex(pattern, "--regex")
    assert "has a pattern at #" in _schema_error(schema)
    assert "has a pattern at #" in _schema_error(keyed)


@pytest.mark.parametrize("grammar,ok", [
    ('start: "a"~10000', True),
    ('start: %json {"type": "array", "items": {"type": "integer"}, "maxItems": 100}', True),
    ('start: "a"~100000', False),
    ('start: "a"~2..100000', False),
    ('start: A\nA: /a{1000000}/', False),
    ('start: %json{"type": "array", "items": {"type": "integer"}, "minItems": 1000000000}', False),
    ('start: "x" %json {"$ref": "#"}', False),
])
def test_lark_repetitions_and_embedded_json_schemas_are_bounded(grammar, ok):
    if ok:
        G.lark_grammar(grammar)
        return
    with pytest.raises(G.GuidanceError) as info:
        G.lark_grammar(grammar, "--grammar")
    assert str(info.value).startswith("--grammar ") and ("limit" in str(info.value) or "finite" in str(info.value))


def test_size_nesting_enum_and_property_count_are_bounded():
    big = {"type": "string", "description": "x" * L.MAX_CHARS}
    assert f"the limit is {L.MAX_CHARS:,}" in _schema_error(big)
    with pytest.raises(G.GuidanceError, match="characters long"):
        G.regex("a" * (L.MAX_CHARS + 1))
    deep: dict = {"type": "integer"}
    for _ in range(L.MAX_DEPTH):
        deep = {"type": "array", "items": deep}
    assert f"nests deeper than {L.MAX_DEPTH} levels" in _schema_error(deep)
    very_deep: dict = {}
    for _ in range(5000):  # deeper than Python's recursion: still one sentence
        very_deep = {"items": very_deep}
    assert "nests deeper" in _schema_error(very_deep)
    assert "an enum of 1,001 values" in _schema_error({"enum": list(range(L.MAX_ENUM + 1))})
    props = {"type": "object", "properties": {f"p{i}": {} for i in range(L.MAX_PROPERTIES + 1)}}
    assert f"more than {L.MAX_PROPERTIES:,} properties" in _schema_error(props)


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]},
    {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}},
     "type": "object", "properties": {"head": {"$ref": "#/$defs/n"}}},  # optional, but a head the model starts never ends
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    {"definitions": {"t": {"allOf": [{"$ref": "#/definitions/t"}]}}, "$ref": "#/definitions/t"},
    {"anyOf": [{"$ref": "#"}, {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}]},
])
def test_schemas_without_a_finite_answer_are_refused(schema):
    message = _schema_error(schema)
    assert "has no finite answer" in message and "$ref" in message


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"child": {"$ref": "#"}}},  # optional: {} ends it
    {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
     "required": ["children"]},  # [] ends it
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                         "next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                                            {"type": "null"}]}},
                        "required": ["v", "next"]}}, "$ref": "#/$defs/node"},
    {"type": ["object", "string"], "properties": {"x": {"$ref": "#"}}, "required": ["x"]},  # a string ends it
    {"$ref": "#/$defs/missing"},  # og says what is wrong with it
])
def test_recursive_schemas_with_a_way_out_pass(schema):
    G.json_schema(schema)


def test_a_lone_surrogate_in_a_constraint_is_one_sentence():
    assert "lone surrogate" in _schema_error({"type": "string", "enum": ["caf\udce9"]})
    with pytest.raises(G.GuidanceError, match="lone surrogate"):
        G.regex("a\ud800")
    with pytest.raises(G.GuidanceError, match="lone surrogate"):
        G.lark_grammar('start: "\ud800"')


def test_library_internals_stay_out_of_messages():
    constraint = G.regex("abc", "response_format")
    panic = RuntimeError("Error creating grammar: panic: assertion failed: grammar.symbols.len() < u16::MAX as "
                         "usize - 10\n<backtrace>\n 0: llguidance::panic_utils::catch_unwind at panic_utils.rs:40")
    message = str(G.compile_error(constraint, panic))
    assert message == ("response_format cannot be compiled: it is too large or too complex for onnxruntime-genai's "
                       "constraint compiler")
    dump = RuntimeError("Error computing mask: lexer error: too many expressions constructed <state> Tokens: ⟦⟧ 0 "
                        "tokens, 0 bytes; grm_prefix: \"\" Flags: Parser: { \"compute_time_us\": 0 }")
    failed = str(G.decode_failure(dump, 0))
    assert "lexer error: too many expressions constructed" in failed
    assert not any(marker in failed for marker in ("<state>", "Tokens", "Parser", "grm_prefix"))
    ordinary = RuntimeError("Error creating grammar: Invalid type: objekt")
    assert str(G.compile_error(constraint, ordinary)) == "response_format cannot be compiled: Invalid type: objekt"


# -- the CLI and the server ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [
    ("--json-schema", json.dumps({**ITEMS, "minItems": 1_000_000_000})),
    ("--json-schema", json.dumps({**ITEMS, "maxItems": 10_000_000})),
    ("--json-schema", json.dumps({"type": "string", "pattern": "^a{1000000}$"})),
    ("--json-schema", json.dumps({"$ref": "#"})),
    ("--json-schema", "[" * 100_000),
    ("--regex", "a{1000000}"),
    ("--grammar", 'start: %json{"type": "array", "items": {"type": "integer"}, "maxItems": 10000000}\n'),
    ("--grammar", 'start: "a"~1000000\n'),
])
def test_the_cli_refuses_what_is_over_a_limit_in_one_line(tiny_dir, tmp_path, option, value):
    if option == "--grammar":
        path = tmp_path / "g.lark"
        path.write_text(value)
        value = str(path)
    result = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), option, value, "x"])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: {option}") and len(result.stderr.strip().splitlines()) == 1
    assert len(result.stderr) < 400 and result.stdout == ""


@pytest.fixture(scope="module")
def app_client(tiny_dir):
    from starlette.testclient import TestClient

    from phi3v_ort.server.app import create_app
    from phi3v_ort.workers.pool import WorkerSpec

    app = create_app(WorkerSpec(str(tiny_dir)), "tiny")
    yield TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    app.state.pool.close()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("schema,words", [
    ({**ITEMS, "minItems": 1_000_000_000}, "minItems"),
    ({**ITEMS, "maxItems": 100_000}, "maxItems"),
    ({"type": "string", "pattern": "^a{1000000}$"}, "the limit is 100,000"),
    ({"$ref": "#"}, "no finite answer"),
    ({"type": "object", "properties": {"c": {"$ref": "#"}}, "required": ["c"]}, "no finite answer"),
    ({"type": "string", "enum": ["\ud800"]}, "lone surrogate"),
])
def test_the_server_answers_400_naming_response_format(app_client, schema, words, stream):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    text = json.dumps(body)  # a lone surrogate travels as the JSON escape \ud800, as a browser sends it
    r = app_client.post("/v1/chat/completions", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith("response_format") and words in error["message"]
    assert "panic" not in error["message"] and "llguidance" not in error["message"]


@pytest.mark.parametrize("backwards", [False, True])
def test_long_reference_chains_are_decided_quickly_in_any_order(backwards):
    import time

    n = 1000  # about 94,000 characters: the size limit allows no more
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}, "required": ["x"]}
            for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    order = list(defs.items())[::-1] if backwards else list(defs.items())
    started = time.perf_counter()
    G.json_schema({"$defs": dict(order), "$ref": "#/$defs/d0"})  # ends in a string: fine
    defs[f"d{n}"] = {"$ref": "#/$defs/d0"}  # a loop of 1,001 references
    assert "no finite answer" in _schema_error({"$defs": defs, "$ref": "#/$defs/d0"})
    assert time.perf_counter() - started < 2.0  # a fixed point over passes took 4.5 s for the first alone
