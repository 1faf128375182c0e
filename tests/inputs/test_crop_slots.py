"""Crop slots: a vision model with a dynamic crop axis gets only the slots a request uses (the largest
1 + rows * cols over its images), and that changes nothing: the image features and the greedy tokens equal those
of the same package declared with a fixed 17 slots (all fed, the unused ones zero), for both families, one and
two images, several aspect ratios and crop budgets.

The phi-3 case runs on the committed fixture (int4); the phi-3.5 case on the build tier's synthetic package
(tests/conftest.py SYNTHETIC), so it runs with `-m build`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phi3v_ort.package import contract
from phi3v_ort.engine.model import load_model
from phi3v_ort.package.loading import open_inputs, read_package

from tests.conftest import fixed_crop_twin, make_png, needs_build

S = contract.CROP_SIZE
# (images as (width, height), crop budget): wide, tall, extreme and square aspect ratios; one and two images
CASES = [
    (((640, 400),), 16), (((640, 400),), 4), (((640, 400),), 1),
    (((300, 700),), 16), (((2000, 60),), 8), (((1000, 999),), 16),
    (((640, 400), (300, 700)), 16), (((336, 336), (1344, 1008)), 4), (((50, 2000), (640, 400)), 2),
]


def case_id(case) -> str:
    sizes, crops = case
    return "+".join(f"{w}x{h}" for w, h in sizes) + f"@{crops}"


def test_a_dynamic_axis_gets_the_slots_the_request_uses(tiny_dir, tiny_fixed17_dir, tmp_path):
    """The issue's example: a 640x400 chart takes 13 slots at 16 crops, 5 at 4, 2 at 1; two images take the
    larger count; a fixed axis always takes its 17."""
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.inputs.pixels import prepare_image
    from phi3v_ort.inputs.prompt import build_prompt

    dynamic, fixed = (open_inputs(read_package(d)) for d in (tiny_dir, tiny_fixed17_dir))
    assert dynamic.crop_slots is None and fixed.crop_slots == contract.PIXEL_CROPS
    chart = load_image(str(make_png(tmp_path / "chart.png", 640, 400)))
    tall = load_image(str(make_png(tmp_path / "tall.png", 300, 700)))
    for crops, slots in ((16, 13), (4, 5), (1, 2)):
        prepared = [prepare_image(chart.image, crops)]
        assert dynamic.build(build_prompt("hi", 1), prepared).pixel_values.shape[1] == slots, crops
        assert fixed.build(build_prompt("hi", 1), prepared).pixel_values.shape[1] == contract.PIXEL_CROPS
    both = [prepare_image(chart.image, 4), prepare_image(tall.image, 4)]  # 1 + 2x2 and 1 + 2x1 crops
    assert [len(p.crops) for p in both] == [5, 3]
    pixels = dynamic.build(build_prompt("hi", 2), both).pixel_values
    assert pixels.shape[:2] == (2, 5)
    for k, p in enumerate(both):
        assert np.array_equal(pixels[k, :len(p.crops)], p.crops) and not pixels[k, len(p.crops):].any()


def run_both(dynamic_dir: Path, fixed_dir: Path, png_dir: Path):
    """For every case: (vision features, greedy tokens) of the dynamic package fed the slots it uses, and of its
    fixed-17 twin fed 17."""
    import onnxruntime as ort

    from phi3v_ort.engine.generation import generate, prepare
    from phi3v_ort.engine.settings import GenerationSettings
    from phi3v_ort.inputs.images import load_image

    models = {name: load_model(d, device="cpu") for name, d in (("dynamic", dynamic_dir), ("fixed", fixed_dir))}
    vision = {name: ort.InferenceSession(str(m.info.path / m.info.files.vision), providers=["CPUExecutionProvider"])
              for name, m in models.items()}
    settings = GenerationSettings(max_new_tokens=12)
    for case in CASES:
        sizes, crops = case
        images = [load_image(str(make_png(png_dir / f"{w}x{h}-{k}.png", w, h, seed=k + 3)))
                  for k, (w, h) in enumerate(sizes)]
        out = {}
        for name, model in models.items():
            inputs = prepare(model, "Describe the images.", images, crops=crops)
            (features,) = vision[name].run(None, {"pixel_values": inputs.pixel_values,
                                                  "image_sizes": inputs.image_sizes})
            tokens = generate(model, "Describe the images.", images, settings, crops=crops).token_ids
            out[name] = (inputs.pixel_values.shape[1], features, tokens)
        yield case, out


def assert_same_as_17_slots(dynamic_dir: Path, fixed_dir: Path, png_dir: Path) -> None:
    for case, out in run_both(dynamic_dir, fixed_dir, png_dir):
        (slots, features, tokens), (fixed_slots, fixed_features, fixed_tokens) = out["dynamic"], out["fixed"]
        sizes, crops = case
        used = max(1 + (h // S) * (w // S) for h, w in (contract.hd_size(*size, crops) for size in sizes))
        assert (slots, fixed_slots) == (used, contract.PIXEL_CROPS), case_id(case)
        assert features.shape == fixed_features.shape, case_id(case)
        assert np.array_equal(features, fixed_features), \
            f"{case_id(case)}: features differ by {np.abs(features - fixed_features).max()}"
        assert tokens == fixed_tokens, case_id(case)


def test_phi3_features_and_tokens_equal_the_17_slot_run(tiny_dir, tiny_fixed17_dir, tmp_path):
    assert_same_as_17_slots(tiny_dir, tiny_fixed17_dir, tmp_path)


@needs_build
@pytest.mark.build
@pytest.mark.synthetic("tiny-fp32-cpu-phi35")
def test_phi35_features_and_tokens_equal_the_17_slot_run(synthetic, tmp_path):
    package = synthetic.get("tiny-fp32-cpu-phi35")
    assert open_inputs(read_package(package)).crop_slots is None  # the exporter's axis is dynamic
    assert_same_as_17_slots(package, fixed_crop_twin(package, tmp_path / "fixed17"), tmp_path)
