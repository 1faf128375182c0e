"""openai_request: every field checked before anything runs, images counted before any decoding, stop strings cut
across deltas. Pure: no model, no server."""

from __future__ import annotations

import base64
import json
import time

import pytest

from phi3v_ort.server.openai_request import (ApiError, HistoryTurn, ImageRef, StopStringFilter, parse_json_body,
                                      parse_request)

LIMITS = dict(allow_remote=False, max_images=8, max_image_bytes=16 * 2**20, max_tokens_default=512)
USER = [{"role": "user", "content": "hi"}]
PNG_URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not decoded here").decode()


def parse(body: dict, **limits):
    return parse_request(body, **{**LIMITS, **limits})


def refused(body: dict, **limits) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, **limits)
    return info.value


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# -- bad requests ----------------------------------------------------------------------------------------------------

BAD_FIELDS = [  # (extra fields, the param the error must name)
    ({"n": 2}, "n"), ({"n": 0}, "n"), ({"n": "1"}, "n"), ({"n": True}, "n"),
    ({"logprobs": True}, "logprobs"), ({"logprobs": "no"}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"top_logprobs": 0}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"function_call": "auto"}, "function_call"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"), ({"logit_bias": []}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"presence_penalty": -1}, "presence_penalty"),
    ({"presence_penalty": "0"}, "presence_penalty"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": []}, "max_tokens"),
    ({"max_tokens": [5]}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 5.0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": 2**31}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": False}, "max_completion_tokens"),
    ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": 2.01}, "temperature"),
    ({"temperature": "0.7"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_p": -0.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"), ({"top_p": "1"}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"top_k": 100_001}, "top_k"), ({"top_k": 10**12}, "top_k"), ({"top_k": 5.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"seed": -1}, "seed"), ({"seed": 2**31}, "seed"), ({"seed": 2**32}, "seed"), ({"seed": 4294967296}, "seed"),
    ({"seed": 2**70}, "seed"), ({"seed": True}, "seed"), ({"seed": 1.0}, "seed"), ({"seed": "7"}, "seed"),
    ({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"),
    ({"stream": True, "stream_options": True}, "stream_options"),
    ({"stream": True, "stream_options": ["include_usage"]}, "stream_options"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream, as OpenAI refuses it
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"chunk_size": 3}}, "stream_options.chunk_size"),
    ({"stop": ""}, "stop"), ({"stop": ["a", ""]}, "stop"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 3}, "stop"), ({"stop": [3]}, "stop"), ({"stop": {"s": "x"}}, "stop"),
    ({"response_format": {"type": "json_objekt"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.json_schema.name"),
    ({"response_format": "text"}, "response_format"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy"}}, "audio"),
    ({"crops": 0}, "crops"), ({"crops": 17}, "crops"), ({"crops": "4"}, "crops"), ({"crops": 4.0}, "crops"),
    ({"max_token": 10}, "max_token"), ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"prediction": None}, "prediction"),  # unknown fields are refused whatever their value
    ({"model": 3}, "model"), ({"user": 3}, "user"), ({"metadata": "x"}, "metadata"), ({"store": "no"}, "store"),
    ({"service_tier": 1}, "service_tier"),
]


@pytest.mark.parametrize("extra,param", BAD_FIELDS, ids=[json.dumps(e, default=str)[:60] for e, _ in BAD_FIELDS])
def test_bad_fields_are_a_400_naming_the_field(extra, param):
    error = refused({"messages": USER, **extra})
    assert (error.status, error.param) == (400, param), error.message
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert param.split(".")[0] in body["message"]


BAD_MESSAGES = [  # (messages, param)
    ([], "messages"), ("hi", "messages"), (None, "messages"), ([3], "messages[0]"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"role": "tool", "content": "42", "tool_call_id": "x"}], "messages[0].role"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"), ([{"role": "user", "content": []}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URI, "detail": "max"}}]}],
     "messages[0].content[0].image_url.detail"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
    ([{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}], "messages[0]"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
     "messages[1]"),
    ([{"role": "system", "content": [image_part(PNG_URI)]}, {"role": "user", "content": "a"}], "messages[0]"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": [{"id": "1"}]},
      {"role": "user", "content": "c"}], "messages[1].tool_calls"),
    ([{"role": "user", "content": [image_part("data:image/png;base64,@@@")]}], "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [image_part("data:image/png,rawbytes")]}], "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [image_part("ftp://example.com/a.png")]}], "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [image_part("https://example.com/a.png")]}], "messages[0].content[0].image_url"),
]


@pytest.mark.parametrize("messages,param", BAD_MESSAGES, ids=[str(i) for i in range(len(BAD_MESSAGES))])
def test_bad_messages_are_a_400_naming_the_place(messages, param):
    error = refused({"messages": messages})
    assert (error.status, error.param) == (400, param), error.message


def test_remote_images_need_allow_remote():
    body = {"messages": [{"role": "user", "content": [image_part("https://example.com/a.png")]}]}
    assert "--allow-remote-images" in refused(body).message
    req = parse(body, allow_remote=True)
    assert req.images == [ImageRef(0, url="https://example.com/a.png")]  # address checks happen when fetching


def test_an_image_too_large_is_a_413_from_its_base64_length():
    uri = "data:image/png;base64," + "A" * (4 * 2**20 // 3 + 8)  # just over 1 MiB once decoded
    error = refused({"messages": [{"role": "user", "content": [image_part(uri)]}]}, max_image_bytes=2**20)
    assert (error.status, error.param) == (413, "messages[0].content[0].image_url")


def test_images_are_counted_before_anything_is_decoded(monkeypatch):
    """20 large data URIs (about 6 MB of body) are refused for their number alone: no base64 or image decoding."""
    import binascii

    import PIL.Image

    def no_decoding(*args, **kwargs):
        raise AssertionError("nothing may be decoded before the images are counted")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    monkeypatch.setattr(base64, "b64decode", no_decoding)
    monkeypatch.setattr(binascii, "a2b_base64", no_decoding)
    payload = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(220_000)).decode()  # ~300 KB each, valid base64
    history = [{"role": "user", "content": [image_part("data:image/png;base64," + payload)] * 10},
               {"role": "assistant", "content": "ok"}]
    body = {"messages": history + [{"role": "user", "content": [image_part("data:image/png;base64," + payload)] * 10}]}
    assert len(json.dumps(body)) > 5_000_000
    start = time.perf_counter()
    error = refused(body)
    assert time.perf_counter() - start < 0.2
    assert (error.status, error.param) == (400, "messages") and "too many images" in error.message


def test_images_in_history_count_too():
    messages = [{"role": "user", "content": [image_part(PNG_URI)] * 2}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [image_part(PNG_URI)] * 2}]
    assert "too many images" in refused({"messages": messages}, max_images=3).message
    assert len(parse({"messages": messages}, max_images=4).images) == 2


# -- the JSON body ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"null", b'{"temperature": NaN}',
                                 b'{"a": Infinity}', b"\xff\xfe{", b"[" * 100_000, b'{"a": ' * 50_000,
                                 b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", b'{"n": 1' + b"0" * 5000 + b"}"])
def test_bad_json_bodies_are_a_400(raw):
    with pytest.raises(ApiError) as info:
        parse_json_body(raw)
    assert info.value.status == 400


def test_a_good_json_body():
    body = parse_json_body(json.dumps({"messages": USER, "metadata": {"a": [{"b": {"c": 1}}]}}).encode())
    assert parse(body).question == "hi"


# -- good requests ---------------------------------------------------------------------------------------------------

def test_a_string_message_with_defaults():
    req = parse({"messages": USER})
    assert (req.system, req.history, req.question, req.images) == (None, [], "hi", [])
    assert (req.stream, req.include_usage, req.stop, req.crops, req.response_format) == (False, False, [], None, None)
    s = req.settings
    assert (s.max_new_tokens, s.do_sample, s.seed) == (512, False, None)


def test_content_parts_history_system_and_developer():
    raw = b"\x89PNG\r\n\x1a\n not decoded here"
    req = parse({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "answer in French"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is"}, image_part(PNG_URI),
                                     {"type": "text", "text": "this?"}], "name": "ann"},
        {"role": "assistant", "content": [{"type": "text", "text": "a chart"}]},
        {"role": "user", "content": "and the title?"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URI, "detail": "high"}}]},
    ]})
    assert req.system == "be brief\nanswer in French"
    assert req.history == [HistoryTurn("what is\nthis?", [ImageRef(2, data=raw)], "a chart")]
    assert req.question == "and the title?\n" and req.images == [ImageRef(5, data=raw)]


def test_sampling_fields_and_extensions():
    req = parse({"messages": USER, "model": "anything", "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                 "seed": 2**31 - 1, "max_completion_tokens": 7, "max_tokens": 99, "stream": True,
                 "stream_options": {"include_usage": True}, "stop": "\n\n", "crops": 4, "n": 1, "logprobs": False,
                 "tools": [], "tool_choice": "none", "logit_bias": {}, "frequency_penalty": 0,
                 "presence_penalty": 0.0, "parallel_tool_calls": False, "modalities": ["text"],
                 "response_format": {"type": "text"}, "user": "u1", "metadata": {"k": "v"}, "store": False,
                 "service_tier": "auto", "top_logprobs": None})
    s = req.settings
    assert (s.do_sample, s.temperature, s.top_p, s.top_k, s.seed, s.max_new_tokens) == (True, 0.7, 0.9, 40,
                                                                                          2**31 - 1, 7)
    assert (req.stream, req.include_usage, req.stop, req.crops) == (True, True, ["\n\n"], 4)
    assert req.response_format == {"type": "text"}


@pytest.mark.parametrize("temperature,sampled", [(0, False), (0.0, False), (None, False), (1e-3, True), (2, True)])
def test_temperature_zero_is_greedy(temperature, sampled):
    assert parse({"messages": USER, "temperature": temperature}).settings.do_sample is sampled


def test_max_tokens_and_nulls():
    assert parse({"messages": USER, "max_tokens": 3}).settings.max_new_tokens == 3
    nulls = {k: None for k in ("max_tokens", "temperature", "top_p", "seed", "stream", "stop", "n", "crops",
                               "stream_options", "response_format", "tools", "logit_bias")}
    assert parse({"messages": USER, **nulls}, max_tokens_default=9).settings.max_new_tokens == 9
    assert parse({"messages": USER, "stop": ["a", "b", "c", "d"]}).stop == ["a", "b", "c", "d"]


# -- stop strings ----------------------------------------------------------------------------------------------------

def run_filter(deltas: list[str], stops: list[str]) -> tuple[str, bool, list[str]]:
    f = StopStringFilter(stops)
    pieces = [f.feed(d) for d in deltas]
    if not f.stopped:
        pieces.append(f.flush())
    return "".join(pieces), f.stopped, pieces


@pytest.mark.parametrize("deltas,stops,text,stopped", [
    (["zr", " tp", "w e", "oo", " d", "x"], ["oo d"], "zr tpw e", True),  # the leak the server had
    (["zr tpw eoo dx"], ["oo d"], "zr tpw e", True),
    (["aaab"], ["aab"], "a", True),  # overlapping prefix
    (["a", "a", "a", "b"], ["aab"], "a", True),
    (["a", "a", "a", "c"], ["aab"], "aaac", False),
    (["S", "T", "O", "P!"], ["STOP"], "", True),  # at the very start, across 4 deltas
    (["STOP", "more"], ["STOP"], "", True),
    (["x<|", "en", "d|", ">", "y"], ["<|end|>"], "x", True),
    (["one two", " thr", "ee four"], ["four", "two"], "one ", True),  # several stops: the earliest wins
    (["ab", "cd"], ["bcd", "abc"], "", True),  # two stops starting at different places: the earlier one wins
    (["hello wor", "ld"], ["world", "wor"], "hello ", True),
    (["café ", "naï", "ve ", "résumé"], ["naïve"], "café ", True),  # unicode
    (["日本", "語で", "す"], ["語で"], "日本", True),
    (["no", " stop ", "here"], ["xyz"], "no stop here", False),
    (["ab", "c"], [], "abc", False),
])
def test_stop_filter(deltas, stops, text, stopped):
    assert run_filter(deltas, stops)[:2] == (text, stopped)


def test_stop_filter_holds_back_only_what_could_start_a_stop():
    f = StopStringFilter(["oo d"])
    assert [f.feed(d) for d in ["zr", " tp", "w e", "oo", " "]] == ["zr", " tp", "w e", "", ""]
    assert f.feed("x") == "oo x" and not f.stopped  # the held tail was not a stop after all
    f = StopStringFilter(["</s>"])
    assert (f.feed("a<"), f.feed("/"), f.flush()) == ("a", "", "</")  # generation ended: the tail goes out
    assert f.feed("more") == "more"


def test_stop_filter_without_stops_passes_everything_through():
    f = StopStringFilter([])
    assert [f.feed(d) for d in ["a", "", "bc", "d"]] == ["a", "", "bc", "d"] and f.flush() == ""


def test_stop_filter_after_a_stop_emits_nothing():
    f = StopStringFilter(["x"])
    assert (f.feed("abxcd"), f.feed("more"), f.flush(), f.stopped) == ("ab", "", "", True)
