"""The exported vision model computes with any crop count: nothing of the 2-crop example it was traced on is baked
into the graph. The committed fixture's vision model (exported by components.export_vision, crop axis dynamic)
against the torch module it was exported from, for every slot count from 1 to 17: each layout that fits the slots
(1 + rows * cols <= slots), tight and padded, one and two images. Needs torch and transformers (the build extra)
but no build: the fixture's checkpoint is written again from its seed (tests/synthetic pins that it is the same).
"""

from __future__ import annotations

import numpy as np
import pytest

from phi3v_ort.package import contract

from tests.conftest import needs_build

pytestmark = needs_build
S = contract.CROP_SIZE


@pytest.fixture(scope="module")
def modules(tmp_path_factory, tiny_dir):
    import onnxruntime as ort

    from phi3v_ort.export.checkpoint import Checkpoint
    from phi3v_ort.export.components import load_modules
    from phi3v_ort.synthetic.presets import PRESETS
    from phi3v_ort.synthetic.random_checkpoint import write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", PRESETS["tiny"])
    image_module, _ = load_modules(Checkpoint.open(ckpt))
    session = ort.InferenceSession(str(tiny_dir / contract.PHI3_FILE_NAMES.vision), providers=["CPUExecutionProvider"])
    return image_module, session


def grids(used_at_most: int) -> list[tuple[int, int]]:
    """Every (rows, cols) crop grid of at most `used_at_most - 1` sub-crops."""
    return [(r, c) for r in range(1, 17) for c in range(1, 17) if 1 + r * c <= used_at_most]


def layouts(slots: int) -> list[list[tuple[int, int]]]:
    """A grid of one image that fills `slots` exactly, one that leaves padding, and a pair of images."""
    tight = [g for g in grids(slots) if 1 + g[0] * g[1] == slots]
    out = [[g] for g in tight[:1]]
    if slots > 2:
        out.append([(1, 1)])  # 2 slots used, the rest padding
        out.append([tight[0] if tight else (1, 1), (1, 1)])
    return out


def run_both(modules, pixel_values: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    image_module, session = modules
    (onnx_out,) = session.run(None, {"pixel_values": pixel_values, "image_sizes": sizes})
    with torch.no_grad():
        torch_out = image_module(torch.from_numpy(pixel_values), torch.from_numpy(sizes)).numpy()
    return onnx_out, torch_out


def test_the_fixture_declares_the_crop_axis_dynamic(tiny_dir):
    from phi3v_ort.package.onnx_header import read_input_spec

    spec = read_input_spec(tiny_dir / contract.PHI3_FILE_NAMES.vision, "pixel_values")
    assert spec.shape == ("num_images", "max_num_crops", 3, "height", "width")


@pytest.mark.parametrize("slots", range(2, contract.PIXEL_CROPS + 1))
def test_vision_onnx_equals_the_torch_module_with_every_slot_count(modules, slots):
    rng = np.random.default_rng(slots)
    for images in layouts(slots):
        pixel_values = np.zeros((len(images), slots, 3, S, S), dtype=np.float32)
        for k, (r, c) in enumerate(images):
            pixel_values[k, : 1 + r * c] = rng.normal(size=(1 + r * c, 3, S, S))
        sizes = np.array([[r * S, c * S] for r, c in images], dtype=np.int64)
        onnx_out, torch_out = run_both(modules, pixel_values, sizes)
        expected_rows = sum(contract.image_token_count(r * S, c * S) for r, c in images)
        assert onnx_out.shape == torch_out.shape == (expected_rows, torch_out.shape[1]), (slots, images)
        np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-4, atol=1e-5, err_msg=f"{slots} slots {images}")


def test_one_slot_is_refused_by_both(modules):
    """One slot holds only the global view, but every image has at least one sub-crop (image_sizes >= 336x336):
    no valid input has one slot, and both the graph and the module refuse it rather than read past the crops."""
    pixel_values = np.zeros((1, 1, 3, S, S), dtype=np.float32)
    sizes = np.array([[S, S]], dtype=np.int64)
    import torch

    image_module, session = modules
    with pytest.raises(Exception, match="out of data bounds"):
        session.run(None, {"pixel_values": pixel_values, "image_sizes": sizes})
    with pytest.raises(IndexError), torch.no_grad():
        image_module(torch.from_numpy(pixel_values), torch.from_numpy(sizes))
