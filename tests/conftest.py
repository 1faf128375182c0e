"""Shared fixtures: the committed tiny package, images made on the fly, and the build-tier gate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-int4-cpu"

BUILD_DEPS = ("torch", "transformers", "onnx", "onnxscript", "tokenizers", "safetensors")
MISSING_BUILD_DEPS = [m for m in BUILD_DEPS if importlib.util.find_spec(m) is None]
needs_build = pytest.mark.skipif(bool(MISSING_BUILD_DEPS),
                                 reason=f"needs the build extra (missing: {', '.join(MISSING_BUILD_DEPS)})")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import onnxruntime_genai as og

    config = og.Config(str(tiny_dir))
    config.clear_providers()
    return og.Model(config)


def make_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A PNG with some structure (gradient + blocks) so different images give different features."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                    np.full_like(x, int(rng.integers(0, 256)))], axis=-1).astype("uint8")
    Image.fromarray(img, "RGB").save(path)
    return path


@pytest.fixture
def png(tmp_path):
    def _make(width: int, height: int, seed: int = 0, name: str | None = None) -> Path:
        return make_png(tmp_path / (name or f"img_{width}x{height}_{seed}.png"), width, height, seed)

    return _make
