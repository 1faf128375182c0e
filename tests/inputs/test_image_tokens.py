"""The token-count formula against og's processor, and the vision model's rows against both."""

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import pytest

from phi3v_ort.package import contract

SIZES = [
    (1, 1),        # tiny
    (336, 336),
    (640, 400),    # the contract's example (wide)
    (300, 700),    # the contract's example (tall)
    (2000, 60),    # very wide
    (40, 1500),    # very tall
    (1000, 999),
    (4032, 3024),  # a 12 MP phone photo
    (1344, 1008),  # exactly a 4x3 crop grid
]


@pytest.fixture(scope="module")
def processor(tiny_model):
    return tiny_model.create_multimodal_processor()


@pytest.fixture(scope="module")
def vision(tiny_dir):
    return ort.InferenceSession(str(tiny_dir / contract.PHI3_FILE_NAMES.vision), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("width, height", SIZES)
def test_formula_matches_processor_and_vision_rows(processor, vision, png, width, height):
    path = png(width, height)
    inputs = processor("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", images=og.Images.open(str(path)))
    ids = inputs["input_ids"].as_numpy()
    image_sizes = inputs["image_sizes"].as_numpy()
    pixel_values = inputs["pixel_values"].as_numpy()

    expected = contract.image_tokens_for(width, height)
    assert tuple(int(v) for v in image_sizes[0]) == contract.hd_size(width, height)
    assert int((ids == -1).sum()) == expected
    assert pixel_values.shape == (1, contract.PIXEL_CROPS, 3, 336, 336)

    (features,) = vision.run(None, {"pixel_values": pixel_values, "image_sizes": image_sizes.astype(np.int64)})
    assert features.shape[0] == expected
    assert np.isfinite(features).all()


def test_two_images_rows_are_the_sum(processor, vision, png):
    a, b = png(640, 400, seed=1), png(300, 700, seed=2)
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nWhat is difference in this two images?<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, images=og.Images.open(str(a), str(b)))
    ids = inputs["input_ids"].as_numpy()
    assert int((ids == -1).sum()) == 1921 and int((ids == -2).sum()) == 2377
    (features,) = vision.run(None, {"pixel_values": inputs["pixel_values"].as_numpy(),
                                    "image_sizes": inputs["image_sizes"].as_numpy().astype(np.int64)})
    assert features.shape[0] == 1921 + 2377
