"""The fixture generates through a bare onnxruntime-genai loop: text-only, one image, two images."""

import onnxruntime_genai as og
import pytest


def _greedy(model, inputs, prompt_len, max_new_tokens):
    """og's own loop: the generator's default search (greedy), until done or the budget."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + max_new_tokens)
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def bare_generate(model, prompt, image_paths, max_new_tokens=12):
    """og's loop on og's own processor."""
    processor = model.create_multimodal_processor()
    images = og.Images.open(*map(str, image_paths)) if image_paths else None
    inputs = processor(prompt, images=images)
    ids = inputs["input_ids"].as_numpy()
    return ids, _greedy(model, inputs, ids.shape[1], max_new_tokens)


def bare_generate_arrays(model, arrays, max_new_tokens=12):
    """og's loop fed inputs built in Python (numpy arrays by name)."""
    inputs = og.NamedTensors()
    for name, value in arrays.items():
        inputs[name] = value
    return _greedy(model, inputs, arrays["input_ids"].shape[1], max_new_tokens)


def _prompt(n_images, question):
    tags = "".join(f"<|image_{k}|>\n" for k in range(1, n_images + 1))
    return f"<|user|>\n{tags}{question}<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_generates_and_is_deterministic(tiny_model, png, n_images):
    paths = [png(640, 400, seed=1), png(300, 700, seed=2)][:n_images]
    ids, tokens = bare_generate(tiny_model, _prompt(n_images, "Describe the image."), paths)
    assert 1 <= len(tokens) <= 12
    assert all(0 <= t < 32064 for t in tokens)
    assert len(tokens) == 12 or tokens[-1] == 32007  # stops at max_length or at <|end|>
    for k in range(1, n_images + 1):
        assert (ids == -k).any()
    assert bare_generate(tiny_model, _prompt(n_images, "Describe the image."), paths)[1] == tokens


def test_image_content_changes_the_answer(tiny_model, png):
    """The vision path is really wired: a different image gives different logits, hence (greedy) tokens."""
    _, a = bare_generate(tiny_model, _prompt(1, "What is this?"), [png(640, 400, seed=1)], 8)
    _, b = bare_generate(tiny_model, _prompt(1, "What is this?"), [png(400, 640, seed=7)], 8)
    assert a != b


def test_text_only_prompt_has_no_image_ids(tiny_model):
    ids, _ = bare_generate(tiny_model, _prompt(0, "Hello"), [], 2)
    assert (ids >= 0).all()
