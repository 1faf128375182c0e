"""Build tier: regenerate synthetic packages with scripts/make_synthetic_model.py and check them.

The packages come from the `synthetic` fixture (conftest.py): each is built once per test run by the script
(exit 0, stdout the package folder) and shared with tests/reference/test_torch_parity.py.
Skipped with a reason when the build extra (torch, transformers, onnx, ...) is not installed.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import pytest

from phi3v_ort.package import contract

from tests.conftest import needs_build
from tests.engine.test_bare_generation import _prompt, bare_generate

pytestmark = [needs_build, pytest.mark.build]
ROOT = Path(__file__).resolve().parents[2]


def _cpu_model(path: Path):
    config = og.Config(str(path))
    config.clear_providers()
    return og.Model(config)


@pytest.fixture(scope="module")
def rebuilt(synthetic):
    return synthetic.get("tiny-int4-cpu")


@pytest.mark.synthetic("tiny-int4-cpu")
def test_regenerated_fixture_matches_the_committed_one(rebuilt, tiny_dir, tiny_model, png):
    for name in contract.SIDE_FILES:
        assert (rebuilt / name).read_text() == (tiny_dir / name).read_text(), name
    # Same seed, same weights: the rebuilt package answers exactly like the committed fixture.
    image = [png(640, 400, seed=3)]
    expected = bare_generate(tiny_model, _prompt(1, "Describe the chart."), image)[1]
    assert bare_generate(_cpu_model(rebuilt), _prompt(1, "Describe the chart."), image)[1] == expected, \
        "the committed fixture is stale: rebuild it with scripts/make_synthetic_model.py --preset tiny"
    ckpt = rebuilt.with_name(rebuilt.name + ".checkpoint")
    config = json.loads((ckpt / "config.json").read_text())
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert config["model_type"] == "phi3_v" and config["rope_scaling"]["type"] == "su"
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    assert any(k.startswith("model.vision_embed_tokens.img_processor.vision_model.") for k in index["weight_map"])


@pytest.mark.parametrize("size", [(640, 400), (300, 700), (1, 1)])
def test_vision_onnx_equals_the_torch_module(tiny_dir, tiny_model, png, size, tmp_path):
    """The exported vision model computes exactly what reference.Phi3VImageEmbedding does, HD layout included."""
    import torch

    from phi3v_ort.export.checkpoint import Checkpoint
    from phi3v_ort.export.components import load_modules
    from phi3v_ort.synthetic.presets import PRESETS
    from phi3v_ort.synthetic.random_checkpoint import write_random_checkpoint

    # the committed fixture's checkpoint (seed 0), written again: the test above pins that it is the same
    image_module, _ = load_modules(Checkpoint.open(write_random_checkpoint(tmp_path / "ckpt", PRESETS["tiny"])))
    processor = tiny_model.create_multimodal_processor()
    inputs = processor(_prompt(2, "x"), images=og.Images.open(str(png(*size, seed=1)), str(png(336, 700, seed=2))))
    pixel_values = inputs["pixel_values"].as_numpy()
    image_sizes = inputs["image_sizes"].as_numpy().astype(np.int64)
    sess = ort.InferenceSession(str(tiny_dir / contract.PHI3_FILE_NAMES.vision), providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {"pixel_values": pixel_values, "image_sizes": image_sizes})
    with torch.no_grad():
        torch_out = image_module(torch.from_numpy(pixel_values), torch.from_numpy(image_sizes)).numpy()
    assert onnx_out.shape == torch_out.shape == (contract.image_tokens_for(*size) + contract.image_tokens_for(336, 700),
                                                 PRESETS["tiny"].hidden_size)
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-4, atol=1e-5)


def test_layout_puts_separators_where_phi3v_does():
    """Independent check of the HD layout on a 2x3 grid: per row 3*12 crop tokens then sub_GN; glb_GN; global."""
    import torch

    from phi3v_ort.reference.modules import layout_index

    sub, glb = 10_000, 10_001
    index = layout_index(torch.tensor([[672, 1008]]), num_crops=17, sub_row=sub, glb_row=glb).tolist()
    assert len(index) == contract.image_token_count(672, 1008)
    rows, width = 2 * 12, 3 * 12 + 1
    for r in range(rows):
        row = index[r * width:(r + 1) * width]
        assert row[-1] == sub
        crop_row, tok_row = divmod(r, 12)
        for c, value in enumerate(row[:-1]):
            crop = 1 + crop_row * 3 + c // 12
            assert value == crop * 144 + tok_row * 12 + c % 12
    assert index[rows * width] == glb
    global_part = index[rows * width + 1:]
    assert len(global_part) == 12 * 13
    assert all(global_part[r * 13 + 12] == sub for r in range(12))
    assert [v for v in global_part if v != sub] == list(range(144))


def test_embedding_places_image_features_at_negative_ids(tiny_dir):
    sess = ort.InferenceSession(str(tiny_dir / contract.PHI3_FILE_NAMES.embedding),
                                providers=["CPUExecutionProvider"])
    hidden = sess.get_inputs()[1].shape[1]
    feats = np.random.default_rng(0).normal(size=(5, hidden)).astype(np.float32)
    ids = np.array([[1, 32010, -1, -1, -1, 29871, -2, -2, 13]], dtype=np.int64)
    (embeds,) = sess.run(None, {"input_ids": ids, "image_features": feats})
    np.testing.assert_array_equal(embeds[0, [2, 3, 4, 6, 7]], feats)
    (text_only,) = sess.run(None, {"input_ids": np.array([[1, 29871, 13]]),
                                   "image_features": np.zeros((0, hidden), np.float32)})
    np.testing.assert_array_equal(text_only[0, 0], embeds[0, 0])  # same token, same row
    assert not np.allclose(text_only[0, 1], text_only[0, 2])


@pytest.mark.synthetic("tiny-int4-cuda")
def test_cuda_package_builds_without_gpu_and_loads_on_cpu(synthetic, png):
    out = synthetic.get("tiny-int4-cuda")
    cfg = json.loads((out / "genai_config.json").read_text())
    assert "cuda" in cfg["model"]["decoder"]["session_options"]["provider_options"][0]
    sess = ort.InferenceSession(str(out / contract.PHI3_FILE_NAMES.vision), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float16)"  # fp16 I/O, like the GPU release
    assert sess.get_outputs()[0].type == "tensor(float16)"
    model = _cpu_model(out)
    assert model.device_type == "CPU"
    _, tokens = bare_generate(model, _prompt(1, "What is this?"), [png(640, 400)], 6)
    assert len(tokens) >= 1
    # the runtime's own pipeline reads the fp16 input from the vision model and feeds it in that dtype
    from phi3v_ort.engine.generation import generate, prepare
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.engine.model import load_model
    from phi3v_ort.engine.settings import GenerationSettings

    loaded = load_model(out, "cpu")
    image = load_image(str(png(640, 400)))
    assert loaded.builder.pixel_dtype == np.float16 and prepare(loaded, "What is this?", [image]).pixel_values.dtype == np.float16
    assert generate(loaded, "What is this?", [image], GenerationSettings(max_new_tokens=4)).stats.image_tokens == (1921,)


@pytest.mark.synthetic("tiny-fp32-cpu-phi35")
def test_phi35_names_and_fp32(synthetic, png):
    out = synthetic.get("tiny-fp32-cpu-phi35")
    names = contract.PHI35_FILE_NAMES
    for f in (names.vision, names.embedding, names.decoder):
        assert (out / f).exists() and (out / (f + ".data")).exists()
    model = _cpu_model(out)
    _, tokens = bare_generate(model, _prompt(2, "Compare."), [png(640, 400), png(300, 700)], 4)
    assert len(tokens) >= 1


def test_bad_options_fail_with_one_sentence(tmp_path):
    out = tmp_path / "x"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_model.py"), "--preset", "huge",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "huge" in proc.stderr
    assert not out.exists()
