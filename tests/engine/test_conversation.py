"""Conversations that keep the generator: exactness against a fresh prefill, og's behaviour, budget fallback."""

import numpy as np
import onnxruntime_genai as og
import pytest

from phi3v_ort.engine.conversation import Conversation
from phi3v_ort.engine.generation import Finished, Notice, prepare
from phi3v_ort.inputs.images import load_image
from phi3v_ort.engine.model import load_model
from phi3v_ort.inputs.prompt import user_turn
from phi3v_ort.engine.settings import GenerationSettings

Q1 = "Help me get the title and author information of this book?"


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir, device="cpu")


def run_turn(conv, question, images=()):
    events = list(conv.ask(question, images))
    assert isinstance(events[-1], Finished)
    return events


def fresh_generator(model, images, seq, max_length):
    """A fresh generator prefilled with `seq` (image ids included), the images' pixels from the runtime's pipeline."""
    inputs = prepare(model, "x", images)
    inputs.input_ids = np.asarray(seq, dtype=np.int32)[None]
    params = og.GeneratorParams(model.og_model)
    params.set_search_options(max_length=max_length)
    gen = og.Generator(model.og_model, params)
    gen.set_inputs(inputs.to_og())
    return gen


def fresh_logits(model, images, seq):
    """A fresh generator prefilled with exactly `seq` (image ids included): the logits for the next token.
    (og 0.18's set_inputs runs the prefill at once; get_logits returns its last position.)"""
    gen = fresh_generator(model, images, seq, len(seq) + 2)
    return np.asarray(gen.get_logits()).ravel()


def test_turn_two_equals_a_fresh_prefill_of_the_transcript(model, png):
    image = load_image(str(png(600, 900, seed=3)))
    conv = Conversation(model, GenerationSettings(max_new_tokens=8))
    first = run_turn(conv, Q1, [image])[-1]
    live = conv._live
    cont = conv._continuation_ids(live, user_turn("And the author?", 2, 0))
    assert cont[0] == 32007  # turn 1 was cut by its budget: the transcript closes it with <|end|>
    live.generator.get_logits()  # what Conversation._continue does before appending
    live.generator.append_tokens(np.asarray(cont, dtype=np.int32))
    reused = np.asarray(live.generator.get_logits()).ravel()
    seq = [int(t) for t in live.generator.get_sequence(0)]
    prompt_ids = prepare(model, Q1, [image]).input_ids[0].tolist()
    assert seq == prompt_ids + list(first.token_ids) + cont  # nothing missing, nothing twice
    np.testing.assert_allclose(reused, fresh_logits(model, [image], seq), atol=1e-5)


def test_turn_two_tokens_equal_fresh_greedy_tokens(model, png):
    image = load_image(str(png(600, 900, seed=3)))
    conv = Conversation(model, GenerationSettings(max_new_tokens=8))
    first = run_turn(conv, "What is this?", [image])[-1]
    second = run_turn(conv, "And the author?")[-1]
    assert second.stats.kv_reused and second.stats.prompt_tokens < 30  # only the new turn was fed
    # the same transcript, prefilled from scratch by og and decoded greedily by og itself
    seq = [int(t) for t in conv._live.generator.get_sequence(0)][: -len(second.token_ids)]
    gen = fresh_generator(model, [image], seq, len(seq) + len(second.token_ids))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == list(second.token_ids)
    assert first.stats.image_tokens and not second.stats.image_tokens


@pytest.mark.parametrize("flush", [False, True])
def test_og_computes_the_last_chosen_token_lazily(model, flush):
    """Why Conversation._continue calls get_logits() first: og 0.18 computes the KV of the token
    generate_next_token() chose only when logits are next asked for, and append_tokens() does not ask. Without the
    flush the cache has a hole; with it, appending equals a fresh prefill. If the no-flush case starts matching,
    og changed and the flush is no longer needed."""
    # a short text prompt: the hole is one position of a few dozen, so its effect on the logits is plain to see
    prompt = prepare(model, Q1).input_ids[0].tolist()
    gen = fresh_generator(model, [], prompt, len(prompt) + 64)
    for _ in range(4):
        gen.generate_next_token()
    if flush:
        gen.get_logits()
    cont = [int(t) for t in model.tokenizer.encode("<|end|>\n<|user|>\nAnd?<|end|>\n<|assistant|>\n")]
    gen.append_tokens(np.asarray(cont, dtype=np.int32))
    seq = [int(t) for t in gen.get_sequence(0)]
    assert len(seq) == len(prompt) + 4 + len(cont)  # the chosen tokens are in the sequence either way
    gap = np.abs(np.asarray(gen.get_logits()).ravel() - fresh_logits(model, [], seq)).max()
    assert (gap < 1e-5) if flush else (gap > 1e-5), gap


def test_new_image_re_prefills_and_says_so(model, png):
    conv = Conversation(model, GenerationSettings(max_new_tokens=4))
    run_turn(conv, "What is this?", [load_image(str(png(640, 400, seed=1)))])
    events = run_turn(conv, "And this one?", [load_image(str(png(300, 700, seed=2)))])
    assert any(isinstance(e, Notice) and "new image" in e.message for e in events)
    stats = events[-1].stats
    assert not stats.kv_reused and stats.reprefill_reason and stats.image_tokens == (1921, 2377)
    assert run_turn(conv, "Compare them.")[-1].stats.kv_reused  # and continues from there


def test_budget_fallback_drops_oldest_turns(model, png):
    # context 8192: two 2509-token images (1x1 -> 16 crops) fit, three do not with 512 new tokens
    conv = Conversation(model, GenerationSettings(max_new_tokens=512), reserve_tokens=0)
    run_turn(conv, "one", [load_image(str(png(1, 1, seed=1)))])
    events = run_turn(conv, "two")  # no room left in the generator's own budget: re-prefill
    assert any(isinstance(e, Notice) and "budget" in e.message for e in events)
    run_turn(conv, "three", [load_image(str(png(2, 2, seed=2)))])
    events = run_turn(conv, "four", [load_image(str(png(3, 3, seed=3)))])
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("dropped" in n for n in notices)
    assert events[-1].stats.prompt_tokens + 512 <= 8192
    assert conv.turns[-1].question == "four" and conv.turns[0].question != "one"


def test_reset_and_transcript(model):
    conv = Conversation(model, GenerationSettings(max_new_tokens=3), system="Be brief.")
    run_turn(conv, "Hello")
    saved = conv.to_dict()
    assert saved["system"] == "Be brief." and saved["turns"][0]["question"] == "Hello"
    assert len(saved["turns"][0]["answer_ids"]) == 3
    conv.reset()
    assert conv.turns == [] and conv.to_dict()["turns"] == []
    assert not run_turn(conv, "Hi again")[-1].stats.kv_reused


def test_changed_sampling_settings_re_prefill(model):
    conv = Conversation(model, GenerationSettings(max_new_tokens=3))
    run_turn(conv, "Hello")
    conv.settings = GenerationSettings(max_new_tokens=3, do_sample=True, temperature=0.7, seed=1)
    events = run_turn(conv, "Again, but creative")
    assert any(isinstance(e, Notice) and "sampling settings changed" in e.message for e in events)
    assert not events[-1].stats.kv_reused
    assert run_turn(conv, "Once more")[-1].stats.kv_reused  # same settings again: continues


@pytest.mark.parametrize("ending", ["budget", "end-token"])
def test_turn_two_cache_equals_a_fresh_prefill_for_both_endings(model, png, ending):
    """After turn 2, every position of the kept cache equals a fresh prefill of the sequence: the logits after
    feeding its last token match. Covers a turn cut by its budget (last token fed lazily) and one ended by <|end|>
    (og leaves <|end|> out of the sequence). Random weights never choose <|end|>, so that ending is forced with
    set_logits, exactly where og would have chosen it."""
    image = load_image(str(png(600, 900, seed=3)))
    conv = Conversation(model, GenerationSettings(max_new_tokens=3))
    run_turn(conv, "What is this?", [image])
    live = conv._live
    if ending == "end-token":
        gen = live.generator
        gen.get_logits()  # og computes the logits the next choice is made from
        forced = np.full((1, 32064), -10.0, dtype=np.float32)
        forced[0, 32007] = 10.0
        gen.set_logits(forced)
        gen.generate_next_token()
        assert gen.is_done() and int(gen.get_next_tokens()[0]) == 32007
        live.unfed_last_token = False  # what Conversation._decode records when a turn ends on <|end|>
    second = run_turn(conv, "And then?")[-1]
    assert second.stats.kv_reused and second.stats.generated_tokens == 3
    gen = live.generator
    seq = [int(t) for t in gen.get_sequence(0)]
    assert seq.count(32007) == 3  # question 1's <|end|>, turn 1 closed once, question 2's <|end|>
    gen.get_logits()  # feed turn 2's last token, then compare the whole cache through the next logits
    np.testing.assert_allclose(np.asarray(gen.get_logits()).ravel(), fresh_logits(model, [image], seq), atol=1e-5)
