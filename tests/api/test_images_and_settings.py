"""Every image kind the API takes, and every keyword setting, each checked by what it does to the answer."""

from __future__ import annotations

import http.server
import json
import re
import threading
import numpy as np
import pytest
from PIL import Image

import phi3v_ort

DATE = r"\d{4}-\d{2}-\d{2}"
LARK = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no" | "maybe"\n'
SHORT_TITLE = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 12}}, "required": ["title"],
               "additionalProperties": False}


def tokens(model, images, **settings) -> tuple[int, ...]:
    return model.ask("What is this?", images=images, max_new_tokens=6, **settings).token_ids


# -- images ----------------------------------------------------------------------------------------------------------

def test_every_image_kind_gives_the_same_answer(model, chart):
    expected = tokens(model, [str(chart)])
    pil = Image.open(chart)
    assert tokens(model, [chart]) == expected  # pathlib.Path
    assert tokens(model, [chart.read_bytes()]) == expected  # bytes
    assert tokens(model, [pil]) == expected  # a PIL image
    assert tokens(model, [np.asarray(pil.convert("RGB"))]) == expected  # HxWx3 uint8
    assert tokens(model, str(chart)) == expected  # one image, not in a list
    assert tokens(model, [pil.convert("RGBA")]) == expected  # any mode: converted as a file's would be


def test_two_images_of_different_kinds(model, chart):
    a, b = chart.parent / "a.png", Image.open(chart.parent / "b.png")
    answer = model.ask("What is difference in this two images?", images=[a, b], max_new_tokens=4)
    assert len(answer.num_image_tokens) == 2


class _OneImage(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_url(chart):
    _OneImage.body = chart.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/chart.png"
    server.shutdown()
    server.server_close()


def test_a_url_needs_allow_remote(model, image_url):
    with pytest.raises(phi3v_ort.ImageError, match="pass allow_remote=True"):
        model.ask("What is this?", images=[image_url])


def test_a_url_goes_through_the_servers_guarded_fetcher(model, image_url, chart, monkeypatch):
    # the server's rule: never a private address (this one is loopback), the same neutral sentence
    with pytest.raises(phi3v_ort.ImageError, match="the address is not allowed"):
        model.ask("What is this?", images=[image_url], allow_remote=True)
    from phi3v_ort.inputs import remote

    monkeypatch.setattr(remote, "is_blocked_address", lambda ip: False)  # as if the address were public
    answer = model.ask("What is this?", images=[image_url], allow_remote=True, max_new_tokens=6)
    assert answer.token_ids == tokens(model, [chart])


# -- settings --------------------------------------------------------------------------------------------------------

def test_max_new_tokens(model):
    assert len(model.ask("Hi", max_new_tokens=3).token_ids) == 3


def test_sampling_settings(model, chart):
    greedy = tokens(model, [chart])
    sampled = {tokens(model, [chart], temperature=1.0, seed=s) for s in (1, 2, 3)}
    assert tokens(model, [chart], temperature=1.0, seed=1) in sampled  # a seed repeats its answer
    assert len(sampled | {greedy}) > 1  # sampling is on
    assert tokens(model, [chart], top_k=1, seed=5) == greedy  # the single likeliest token: greedy again
    assert tokens(model, [chart], top_p=1e-6, seed=5) == greedy  # likewise


def test_crops(model, chart):
    full = model.ask("Hi", images=[chart], max_new_tokens=1)
    few = model.ask("Hi", images=[chart], max_new_tokens=1, crops=1)
    assert few.num_image_tokens[0] < full.num_image_tokens[0] and few.prompt_tokens < full.prompt_tokens
    assert model.prepare("Hi", images=[chart], crops=1)["num_image_tokens"] == list(few.num_image_tokens)


def test_json_schema_as_a_dict_or_text(model):
    answer = model.ask("a", json_schema=SHORT_TITLE, max_new_tokens=200)
    assert answer.finish_reason == "stop" and set(answer.parsed) == {"title"} and answer.problem is None
    assert json.loads(answer.text) == answer.parsed
    assert model.ask("a", json_schema=json.dumps(SHORT_TITLE), max_new_tokens=200).token_ids == answer.token_ids


def test_json_object_cut_by_the_budget_says_so(model):
    answer = model.ask("a", json_object=True, max_new_tokens=12)
    assert answer.text.startswith("{") and answer.finish_reason == "length" and answer.parsed is None
    assert answer.problem == "the answer was cut at 12 tokens before the JSON was complete (raise max_new_tokens)"


def test_regex(model, chart):
    answer = model.ask("When?", images=[chart], regex=DATE, max_new_tokens=30)
    assert answer.finish_reason == "stop" and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", answer.text)


def test_grammar(model):
    answer = model.ask("Is it?", grammar=LARK, max_new_tokens=30)
    assert re.fullmatch(r"The answer is (yes|no|maybe)\.", answer.text), answer.text


def test_stop_cuts_the_answer_before_the_string(model):
    full = model.ask("Describe.", max_new_tokens=30)
    stop = full.text[6:9]
    cut = model.ask("Describe.", max_new_tokens=30, stop=[stop, "never there"])
    assert cut.text == full.text[:full.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.stats is None
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    streamed = "".join(model.stream("Describe.", max_new_tokens=30, stop=stop))
    assert streamed == cut.text


def test_chat_takes_the_same_settings(model, chart):
    chat = model.chat()
    first = chat.ask("When?", images=[chart], regex=DATE, max_new_tokens=30)
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", first.text)
    second = chat.ask("And?", max_new_tokens=4, crops=2)
    assert len(second.token_ids) == 4 and any("output constraint changed" in n for n in second.notices)
    third = chat.ask("More?", images=[chart], crops=1, max_new_tokens=1)
    assert third.num_image_tokens[0] < first.num_image_tokens[0]  # the turn's own crop budget
    assert third.stats.image_tokens == first.num_image_tokens + third.num_image_tokens  # re-prefilled, both images
